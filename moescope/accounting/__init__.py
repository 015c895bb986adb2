"""Accounting: total and active parameters, FLOPs, memory and KV cache per checkpoint (params), and the
comparison with published figures (published).

The package imports nothing itself: import the module you need (``import moescope`` stays cheap).
"""
