"""wsg.analysis"""
