"""wsg.train"""
