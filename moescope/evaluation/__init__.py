"""Evaluation: perplexity (perplexity), run-time routing overrides (override), and moescope sweep
(sweep, settings, sweep_plot).

The package imports nothing itself: import the module you need (``import moescope`` stays cheap).
"""
