"""``routes/`` for an import: imported routing in token order, as ``trace --save-routes`` writes it.

What: :class:`ImportRoutes` keeps the pieces of an ordered import (responses, vLLM requests,
ids with documents) and writes them as one ``routes/part-0000000.parquet`` chunk with the
columns of :mod:`moescope.tracing.routes`: ``window`` and ``position`` (the stream cut into
``seq_len`` windows, as the import packs it), ``doc`` (one per document: a response, a
request, or a segment of an ids file), ``domain``, ``token_id`` (``-1``: not recorded) and
per MoE layer ``layer{L}_experts`` (``-1``: empty slot) and ``layer{L}_weights`` (NaN where
the source has no gate weights). ``moescope offload`` and ``fit --trace`` read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moescope.importers.common import Piece

__all__ = ["ImportRoutes"]


@dataclass
class ImportRoutes:
    """Pieces kept for ``routes/`` (see the module docstring)."""

    layers: list[int]
    top_k: int
    seq_len: int
    pieces: list[Piece] = field(default_factory=list)
    unordered: bool = False

    def add(self, piece: Piece) -> None:
        """Keep one piece (a piece without token order marks the whole import unordered)."""
        if piece.segments is None:
            self.unordered = True
        self.pieces.append(piece)

    def write(self, folder: Path) -> bool:
        """Write ``folder/routes/part-0000000.parquet``; False (nothing written) when unordered."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from moescope.tracedir.files import ROUTE_CHUNK, ROUTES

        if self.unordered or not self.pieces:
            return False
        docs, domains, ids, weights = [], [], [], []
        base = 0
        for p in self.pieces:
            assert p.segments is not None
            _u, local = np.unique(p.segments, return_inverse=True)
            docs.append(base + local)
            base += int(local.max()) + 1 if local.size else 0
            if p.domain_codes is not None and p.domain_names:
                names = np.array([*p.domain_names, None], dtype=object)
                domains.append(names[p.domain_codes])
            else:
                domains.append(np.full(len(p.ids), None, dtype=object))
            ids.append(p.ids)
            weights.append(p.weights if p.weights is not None else np.full(p.ids.shape, np.nan))
        all_ids = np.concatenate(ids)
        all_w = np.concatenate(weights).astype(np.float32)
        n = len(all_ids)
        t = np.arange(n, dtype=np.int64)
        cols = {
            "window": pa.array(t // self.seq_len),
            "position": pa.array((t % self.seq_len).astype(np.int32)),
            "doc": pa.array(np.concatenate(docs).astype(np.int64)),
            "domain": pa.array(np.concatenate(domains), type=pa.string()),
            "token_id": pa.array(np.full(n, -1, dtype=np.int64)),
        }
        for i, layer in enumerate(self.layers):
            flat = all_ids[:, i, :].astype(np.int16).reshape(-1)
            cols[f"layer{layer}_experts"] = pa.FixedSizeListArray.from_arrays(pa.array(flat), self.top_k)
            wflat = all_w[:, i, :].reshape(-1)
            cols[f"layer{layer}_weights"] = pa.FixedSizeListArray.from_arrays(pa.array(wflat), self.top_k)
        (folder / ROUTES).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), folder / ROUTES / ROUTE_CHUNK.format(batch=0))
        return True
