"""Merge the ``--shard i/n`` trace directories of one run into what one run would have written.

What: :func:`merge_traces` reads every shard (:func:`moescope.tracedir.files.read_trace_dir`),
refuses duplicates, copies of one trace, mixed runs and missing or repeated shards, adds
the raw sums and writes the merged directory with
:func:`~moescope.tracing.write.write_trace_dir`, route chunks copied alongside.

How: every shard reads the same token stream and runs the batches ``b`` with
``b mod n == i``; integer and fixed-point sums add exactly, and the capacity groups each
shard saw only in part are added up and then closed
(:meth:`~moescope.tracedir.files.TraceState.close_groups`), so the merged files equal an
unsharded run's byte for byte (timings and run ids aside). Shards of different state
versions (an older moescope) or capacity groups are refused.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moescope.errors import TraceError
from moescope.outdir import atomic_output, check_destination
from moescope.tracedir.files import KIND, ROUTES, TraceDir, read_trace_dir
from moescope.tracedir.state import STATE_VERSION, TraceState
from moescope.tracing.routes import merge_routes
from moescope.tracing.write import write_trace_dir

#: settings that must agree between the traces merged
MERGE_KEYS = (
    "model",
    "model_type",
    "fingerprint",
    "corpus",
    "corpus_fingerprint",
    "split",
    "seq_len",
    "batch_size",
    "max_tokens",
    "dtype",
    "packing",
    "capacity_group",
)


def _check_distinct(trace_dirs: Sequence[Path], states: Sequence[TraceState]) -> None:
    """Each directory once, and no two copies of one trace."""
    seen: dict[Path, Path] = {}
    for d in trace_dirs:
        key = d.resolve()
        if key in seen:
            raise TraceError(f"{d} is given twice (as {seen[key]} and {d}); pass each shard once.")
        seen[key] = d
    run_ids: dict[str, Path] = {}
    for d, s in zip(trace_dirs, states, strict=True):
        rid = s.meta.get("run_id")
        if rid is not None and rid in run_ids:
            raise TraceError(
                f"{d} and {run_ids[rid]} are copies of one trace (run id {rid[:8]}); pass it once."
            )
        if rid is not None:
            run_ids[rid] = d


def _check_mergeable(trace_dirs: Sequence[Path], states: Sequence[TraceState]) -> dict[str, Any]:
    """Refuse duplicates, overlaps and mixed runs; return the merged ``shard`` record."""
    _check_distinct(trace_dirs, states)
    first = states[0]
    versions = sorted({s.version for s in states})
    if versions != [STATE_VERSION]:
        detail = (
            "mix state versions " + " and ".join(map(str, versions))
            if len(versions) > 1
            else (f"have state version {versions[0]}")
        )
        raise TraceError(
            f"the traces {detail}, and merge needs version {STATE_VERSION} (older versions counted "
            "capacity per batch); retrace every shard with this moescope."
        )
    for d, s in zip(trace_dirs[1:], states[1:], strict=True):
        for key in MERGE_KEYS:
            a, b = s.meta.get(key), first.meta.get(key)
            if a != b:
                raise TraceError(
                    f"{d}: {key} is {a!r}, not {b!r} as in {trace_dirs[0]}; merge only shards of one run."
                )
    shards = [s.meta.get("shard") or {"index": 0, "count": 1} for s in states]
    counts = {int(sh.get("count", 1)) for sh in shards}
    if counts == {1}:
        raise TraceError(
            f"{trace_dirs[0]} is a complete (unsharded) trace, so merging it would count its corpus "
            "twice; merge only the --shard i/n parts of one run."
        )
    if len(counts) != 1:
        raise TraceError(
            f"the traces mix shard counts {sorted(counts)} (a full run overlaps every shard); "
            "merge only the --shard i/n parts of one run."
        )
    n = counts.pop()
    indices = [int(sh.get("index", 0)) for sh in shards]
    if sorted(indices) != list(range(n)):
        missing = sorted(set(range(n)) - set(indices))
        raise TraceError(
            f"shards {sorted(indices)} of {n} given; "
            + (f"missing {missing}" if missing else "some repeated")
            + " — pass every --shard i/n directory exactly once."
        )
    return {"index": 0, "count": 1, "merged_from": n}


def _timing(trace: TraceDir, key: str) -> float:
    return float((trace.summary.get("timings") or {}).get(key) or 0.0)


def merge_traces(
    trace_dirs: Sequence[str | Path], out_dir: str | Path, *, plots: bool = True
) -> dict[str, Any]:
    """Combine the shard trace directories of one run into what an unsharded run would have written.

    Args:
        trace_dirs: shard directories (``--shard i/n`` for every ``i`` of one ``n``), each once.
        out_dir: where to write the merged trace (not one of the inputs, nor an ancestor).
        plots: draw the plots.

    Returns:
        The merged summary.

    Raises:
        TraceError: a directory is incomplete; the traces disagree on model, corpus or
            settings; shards are missing, repeated, or mixed with full runs.
        OutputError: ``out_dir`` is refused.
    """
    if not trace_dirs:
        raise TraceError("nothing to merge; pass two or more trace directories.")
    dirs = [Path(d).expanduser() for d in trace_dirs]
    check_destination(out_dir, KIND, inputs=dirs)
    traces = [read_trace_dir(d) for d in dirs]
    states = [t.state for t in traces]
    merged_shard = _check_mergeable(dirs, states)
    first = states[0]
    total = TraceState(
        layers=list(first.layers),
        num_experts=first.num_experts,
        top_k=first.top_k,
        capacity_group=first.capacity_group,
    )
    for s in states:
        total.add(s)
    total.close_groups()  # every shard's parts are in: the groups are whole
    meta = dict(first.meta)
    meta["shard"] = merged_shard
    meta["run_id"] = uuid.uuid4().hex
    meta["merged_run_ids"] = [s.meta.get("run_id") for s in states]
    meta.pop("load_seconds", None)
    total.meta = meta
    timings = {
        "trace_seconds": sum(_timing(t, "trace_seconds") for t in traces),
        "forward_seconds": sum(_timing(t, "forward_seconds") for t in traces),
    }
    with atomic_output(out_dir, KIND, inputs=dirs) as tmp:
        summary = write_trace_dir(tmp, total, timings=timings, plots=plots)
        merge_routes(dirs, tmp / ROUTES)
        if (tmp / ROUTES).exists():
            summary["files"].append(f"{ROUTES}/")
    return summary
