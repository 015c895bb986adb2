"""Reporting: the self-contained HTML report (page) and its sections (sections).

The package imports nothing itself: import the module you need (``import moescope`` stays cheap).
"""
