"""torchrun: combine the ranks of one trace into what a single process would have written.

Every rank runs batches ``b mod n == rank`` of the same stream; :func:`combine_ranks`
all-reduces the integer sums (exact) and gathers on rank 0 the route chunks and each
rank's open capacity groups (the parts of token groups it saw), which rank 0 adds and
closes as one process would; rank 0 alone writes the output directory.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moescope.tracedir.state import TraceState


def current_ranks() -> tuple[int, int] | None:
    """``(rank, world)`` when a torch.distributed process group of several ranks is up."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A throwaway directory for ranks that do not write the output."""
    with tempfile.TemporaryDirectory(prefix="moescope-rank-") as tmp:
        yield Path(tmp)


def combine_ranks(state: TraceState, timings: dict[str, Any], routes: Path | None) -> dict[str, Any]:
    """All-reduce the sums into every rank's ``state``; rank 0 also receives every rank's routes.

    Integer sums are exact, so the result is a single-process run's. Timings are the
    slowest rank's (the wall time of the run). Capacity drops of the groups no rank saw
    whole are only complete on rank 0 (the one that writes).
    """
    from moescope.execution import distributed
    from moescope.tracedir.state import STATE_ARRAYS

    arrays = {name: getattr(state, name) for name in STATE_ARRAYS}
    arrays["_counters"] = [state.tokens, state.windows, state.batches]
    summed = distributed.all_reduce_sum(arrays, device=str(state.meta.get("device") or "cpu"))
    for name in STATE_ARRAYS:
        setattr(state, name, summed[name])
    state.tokens, state.windows, state.batches = (int(v) for v in summed["_counters"])
    gathered = distributed.gather_to_rank0(
        {
            "timings": timings,
            "lacks": state.meta.get("lacks", []),
            "open_groups": state.open_arrays(),
            "routes": {p.name: p.read_bytes() for p in sorted(routes.glob("*.parquet"))} if routes else {},
        }
    )
    state.meta["shard"] = {"index": 0, "count": 1}  # the whole corpus, as one process would
    if gathered is None:
        return timings
    state.cap_open = {}
    for g in gathered:  # every rank's parts of the capacity groups: together they are whole
        parts = g["open_groups"]
        state.add_open(parts["cap_open_ids"], parts["cap_open_tokens"], parts["cap_open_counts"])
    state.close_groups()
    state.meta["lacks"] = sorted({x for g in gathered for x in g["lacks"]})
    state.meta["execution"] = {**state.meta.get("execution", {}), "ranks": len(gathered)}
    if routes is not None:
        routes.mkdir(parents=True, exist_ok=True)
        for g in gathered[1:]:
            for name, data in g["routes"].items():
                (routes / name).write_bytes(data)  # chunk names carry the global batch index
    return {key: max(float(g["timings"][key]) for g in gathered) for key in timings}
