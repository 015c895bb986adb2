"""The streamed pass of a trace: this shard's batches run layer-major through a StreamedModel.

A batch's routing records are complete once the last MoE layer has run on it; it is
reduced right then, and batches reach that point in order, so the sums are exactly the
in-memory run's (see :mod:`moescope.execution.stream`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from moescope.corpus.packing import batched, collate
from moescope.errors import TraceError
from moescope.tracing.reduce import Reducer

if TYPE_CHECKING:
    from moescope.tracing.loop import Loop


def run_batches_streamed(loop: Loop, windows: Iterable[Any], batch_size: int, seq_len: int) -> str:
    """The streamed pass: this shard's batches run layer-major, reduced in batch order.

    A batch's records are complete once the last MoE layer has run on it; it is reduced
    right then, and batches reach that point in order, so the sums are the in-memory run's.
    """
    from moescope.checkpoint.identity import StreamHasher
    from moescope.execution.routing import RoutingRecorder

    streamer = loop.target.runner
    hasher = StreamHasher(seq_len)
    mine: list[tuple[int, int, Any, int]] = []  # (batch index, first window, collated batch, first token)
    window0 = token0 = 0
    for b, group in enumerate(batched(windows, batch_size)):
        for w in group:
            hasher.update(w.tokens.tobytes(), w.domains.tobytes())
        if b % loop.shard[1] == loop.shard[0]:
            mine.append((b, window0, collate(group, loop.pad_id), token0))
        window0 += len(group)
        token0 += sum(len(w.tokens) for w in group)
    reducer = Reducer(loop.state, whole=loop.shard[1] == 1)
    site_of = {site.layer: i for i, site in enumerate(loop.target.sites)}
    last_moe = max(site_of)
    pending: dict[int, list[Any]] = {}
    inputs = [{"input_ids": x.tokens, "attention_mask": x.mask.long()} for _b, _w, x, _t in mine]
    f0 = time.perf_counter()
    with RoutingRecorder(loop.target.sites) as rec:

        def after_layer(layer: int, i: int) -> None:
            if layer not in site_of:
                return
            pending.setdefault(i, [None] * len(site_of))[site_of[layer]] = rec.records[site_of[layer]]
            rec.clear()
            if layer != last_moe:
                return
            records = pending.pop(i)
            if any(r is None for r in records):
                raise TraceError(f"{loop.model_ref}: a MoE layer did not run in the forward pass.")
            b, w0, batch, t0 = mine[i]
            reducer.update(records, batch.mask, batch.docs, batch.domains, token0=t0)
            if loop.routes is not None:
                loop.routes.add(b, w0, batch.tokens, batch.mask, batch.docs, records, batch.domains)
            if loop.progress is not None:
                loop.traced += int(batch.mask.sum())
                loop.progress(loop.traced, None)

        streamer.run(inputs, after_layer=after_layer, max_hidden_bytes=loop.hidden_budget)
    loop.forward_s += time.perf_counter() - f0
    reducer.flush()
    if loop.routes is not None:
        loop.routes.flush()
    if reducer.lacks_norms:
        loop.state.meta["lacks"] = sorted({*loop.state.meta.get("lacks", []), "out_norms"})
    loop.state.meta["execution"] = {
        **loop.state.meta.get("execution", {}),
        "bytes_read": streamer.bytes_read,
        "passes": streamer.passes,
        # seconds the background reader spent reading, and the pass waited for it
        "read_seconds": round(streamer.read_s, 3),
        "read_wait_seconds": round(streamer.read_wait_s, 3),
    }
    return hasher.hexdigest()
