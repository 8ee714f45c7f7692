"""wsg.sweep"""
