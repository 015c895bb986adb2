"""Checkpoints: model references resolved to a config and a tensor inventory (ref), the one validated
safetensors header reader (header), many shards at once (shards, forksplit), the hub (hub,
download), config and index files (jsonfiles), model and corpus fingerprints (identity).

The package imports nothing itself: import the module you need (``import moescope`` stays cheap).
"""
