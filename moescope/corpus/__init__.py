"""Corpora: corpus specs read into documents (read) and the one token-packing rule (packing).

The package imports nothing itself: import the module you need (``import moescope`` stays cheap).
"""
