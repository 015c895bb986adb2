"""Statistics of a trace: the report's tables and what-ifs (report), the co-activation null model
(nullmodel), expert-parallel placement (placement), each statistic's definition (definitions) and
the trace plots (plots).

The package imports nothing itself: import the module you need (``import moescope`` stays cheap).
"""
