"""Trace a MoE model's routing over a corpus into a trace directory, and merge shard traces.

What: :func:`run_trace` loads a model and reads a corpus; :func:`trace_model` runs an
already-loaded model over documents; both aggregate routing online into a
:class:`~moescope.tracedir.files.TraceState` and write the trace directory (contract in
``DESIGN.md``, files and schemas in :mod:`moescope.tracedir.files`): ``summary.json``,
``expert_load.csv``, ``coactivation.csv``, ``domain_load.csv`` (when the corpus has
domains), ``capacity.csv``, ``state.npz`` (the mergeable raw sums), ``plots/*.png`` and,
with ``save_routes``, ``routes/part-*.parquet``. :func:`merge_traces` sums shard states
and writes exactly what one run would have written.

How, in stages (one module each):

- :mod:`moescope.corpus.packing`: documents → token windows (one convention with eval and
  similarity);
- :mod:`moescope.tracing.run`: the model, the hooks and the batch loop (shards run the
  batches ``b`` with ``b mod n == i`` of one stream);
- :mod:`moescope.tracing.reduce`: each batch's routing → fixed-size sums (memory does not
  grow with the corpus; fixed-point float sums make merges exact);
- :mod:`moescope.tracing.routes`: optional per-token routes as Parquet chunks;
- :mod:`moescope.tracing.write`: state → every file of the directory;
- :mod:`moescope.tracing.merge`: shard directories → one directory.

This package re-exports the public names, so ``from moescope.tracing import ...`` keeps
working for the directory's constants and loader too.
"""

from moescope.corpus.packing import PACKING
from moescope.tracedir.files import TraceDir, load_trace, read_trace_dir
from moescope.tracedir.state import (
    CAPACITY_FACTORS,
    EP_DEGREES,
    FIXED_SCALE,
    HIST_BINS,
    STATE_VERSION,
    TraceState,
)
from moescope.tracing.merge import merge_traces
from moescope.tracing.reduce import Reducer
from moescope.tracing.run import TraceResult, parse_shard, run_trace, trace_model
from moescope.tracing.write import write_trace_dir

__all__ = [
    "CAPACITY_FACTORS",
    "EP_DEGREES",
    "FIXED_SCALE",
    "HIST_BINS",
    "PACKING",
    "STATE_VERSION",
    "Reducer",
    "TraceDir",
    "TraceResult",
    "TraceState",
    "load_trace",
    "merge_traces",
    "parse_shard",
    "read_trace_dir",
    "run_trace",
    "trace_model",
    "write_trace_dir",
]
