"""Redundancy: expert-to-expert similarity (run), its outputs measure (outputs), its files and heatmaps
(files), and hidden-neuron alignment (align).

The package imports nothing itself: import the module you need (``import moescope`` stays cheap).
"""
