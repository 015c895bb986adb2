"""Execution: loading a checkpoint with transformers (load), planning in-memory, streamed or
device-mapped runs (plan, stream), dequantisation (quant), torchrun (distributed), and the hooks
that record routing (routing, normcapture).

The package imports nothing itself: import the module you need (``import moescope`` stays cheap).
"""
