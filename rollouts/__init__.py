"""wsg.rollouts"""
