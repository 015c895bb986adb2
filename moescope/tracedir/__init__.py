"""Trace directories: files, schemas and the one loader (files), and the mergeable raw sums (state).

The package imports nothing itself: import the module you need (``import moescope`` stays cheap).
"""
