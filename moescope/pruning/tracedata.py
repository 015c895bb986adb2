"""Trace directories for pruning: the shared loader, under the prune package's names.

There is one loader, :func:`moescope.tracedir.files.read_trace_dir`, with one strictness level
(a complete moescope trace: ``summary.json`` marked complete and a matching
``state.npz``). :func:`read_trace` and :class:`TraceData` are that loader and its
:class:`~moescope.tracedir.files.TraceDir`, kept importable from :mod:`moescope.pruning` for
existing callers. What a trace could not record is listed in :attr:`TraceDir.lacks`
(its columns are NaN); :func:`moescope.pruning.expert_scores` refuses criteria that need it.
"""

from __future__ import annotations

from moescope.tracedir.files import TraceDir, read_trace_dir

#: a complete trace directory (:class:`moescope.tracedir.files.TraceDir`)
TraceData = TraceDir

#: read a complete trace directory (:func:`moescope.tracedir.files.read_trace_dir`)
read_trace = read_trace_dir

__all__ = ["TraceData", "read_trace"]
