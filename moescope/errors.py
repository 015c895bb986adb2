"""Typed errors for bad input and failed work.

Every error the library raises for user input is a :class:`MoescopeError`; the CLI
prints its message as one ``Error: ...`` line on stderr and exits 1. Messages name
the input, the problem and the fix.
"""

from __future__ import annotations


class MoescopeError(Exception):
    """Base class: bad data or failed work (CLI exit code 1)."""


class ModelNotFoundError(MoescopeError):
    """A model reference resolves to nothing (no path, no hub repo, not in the cache)."""


class CheckpointError(MoescopeError):
    """A checkpoint exists but cannot be read (truncated, malformed, inconsistent)."""


class ConfigError(MoescopeError):
    """A config is malformed or contradicts the checkpoint's tensors."""


class CorpusError(MoescopeError):
    """A corpus cannot be read."""


class TraceError(MoescopeError):
    """A trace directory is missing, incomplete or from another model."""


class PruneError(MoescopeError):
    """A pruning request cannot be carried out."""


class NotMoEError(MoescopeError):
    """The model has no routed experts, so there is nothing to route or prune."""


class OutputError(MoescopeError):
    """An output destination moescope must not write to or replace (see ``moescope.outdir``)."""
