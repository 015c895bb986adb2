"""Per-token routes of a trace (``--save-routes``): Parquet chunks under ``routes/``.

What: :class:`RoutesWriter` buffers, for every real (non-padding) token of the traced
batches, its window, position, document, domain, token id and, per MoE layer, the top-k
expert ids and gate weights, and writes them as ``routes/part-NNNNNNN.parquet`` chunks;
:func:`merge_routes` copies the chunks of shard traces into one directory.

How: a chunk is named by the global index of its first batch, so shard chunks never
collide and a merged directory holds exactly the chunks of an unsharded run's batches.
Buffers are flushed every ``chunk_tokens`` tokens, so memory stays bounded.

Columns (plain Parquet, queryable as is by DuckDB, polars or pandas): ``window`` int64,
``position`` int32, ``doc`` int64, ``domain`` string (null without domains), ``token_id``
int64, then per MoE layer ``L``: ``layer{L}_experts`` (list of k int16 logical expert ids,
top-1 first) and ``layer{L}_weights`` (list of k float32 gate weights). For example, the
tokens per domain, layer and expert in DuckDB::

    WITH long AS (UNPIVOT (SELECT domain, COLUMNS('^layer[0-9]+_experts$')
                           FROM 'routes/*.parquet')
                  ON COLUMNS('^layer[0-9]+_experts$') INTO NAME col VALUE experts)
    SELECT domain, CAST(regexp_extract(col, '[0-9]+') AS INT) AS layer,
           UNNEST(experts) AS expert, count(*) AS tokens FROM long GROUP BY ALL
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import TraceError
from moescope.tracedir.files import ROUTE_CHUNK, ROUTE_GLOB, ROUTES


class RoutesWriter:
    """Buffers per-token routes and writes them as Parquet chunks under ``routes/``."""

    def __init__(
        self,
        folder: Path,
        layers: list[int],
        top_k: int,
        chunk_tokens: int = 65536,
        domains: Sequence[str] | None = None,
    ) -> None:
        self.domains = domains  # the trace's domain names (grows as the corpus is read)
        self.folder = folder
        self.layers = layers
        self.top_k = top_k
        self.chunk_tokens = chunk_tokens
        self.tables: list[Any] = []
        self.rows = 0
        self.first_batch: int | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def add(
        self,
        batch_index: int,
        window0: int,
        tokens: Any,
        mask: Any,
        doc: Any,
        records: Sequence[Any],
        domains: Any = None,
    ) -> None:
        """Buffer one batch (``window0``: global index of its first window; ``domains``: the
        batch's domain indices into the writer's ``domains`` names, ``-1`` for none)."""
        import pyarrow as pa
        import torch

        bsz, seq = tokens.shape
        flat_mask = mask.reshape(-1).cpu()
        vidx = flat_mask.nonzero().squeeze(1)
        win = (torch.arange(bsz)[:, None].expand(bsz, seq).reshape(-1) + window0)[vidx]
        pos = torch.arange(seq)[None, :].expand(bsz, seq).reshape(-1)[vidx]
        cols: dict[str, Any] = {
            "window": pa.array(win.numpy().astype(np.int64)),
            "position": pa.array(pos.numpy().astype(np.int32)),
            "doc": pa.array(doc.reshape(-1).cpu()[vidx].numpy().astype(np.int64)),
        }
        if domains is not None and self.domains is not None:
            idx = domains.reshape(-1).cpu()[vidx].numpy()
            names = np.array([*self.domains, None], dtype=object)  # -1 picks the None
            cols["domain"] = pa.array(names[idx], type=pa.string())
        cols["token_id"] = pa.array(tokens.reshape(-1).cpu()[vidx].numpy().astype(np.int64))
        for layer, rec in zip(self.layers, records, strict=True):
            ids = rec.ids.reshape(bsz * seq, -1).cpu()[vidx].numpy().astype(np.int16).reshape(-1)
            w = rec.weights.reshape(bsz * seq, -1).float().cpu()[vidx].numpy().astype(np.float32).reshape(-1)
            cols[f"layer{layer}_experts"] = pa.FixedSizeListArray.from_arrays(pa.array(ids), self.top_k)
            cols[f"layer{layer}_weights"] = pa.FixedSizeListArray.from_arrays(pa.array(w), self.top_k)
        if self.first_batch is None:
            self.first_batch = batch_index
        self.tables.append(pa.table(cols))
        self.rows += int(vidx.numel())
        if self.rows >= self.chunk_tokens:
            self.flush()

    def flush(self) -> None:
        """Write the buffered batches as one chunk."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.tables or self.first_batch is None:
            return
        name = ROUTE_CHUNK.format(batch=self.first_batch)
        pq.write_table(pa.concat_tables(self.tables), self.folder / name)
        self.tables, self.rows, self.first_batch = [], 0, None


def merge_routes(trace_dirs: Sequence[str | Path], dest: Path) -> None:
    """Copy every shard's route chunks into ``dest`` (created only when some shard has routes).

    Raises:
        TraceError: two shards hold a chunk of the same name.
    """
    for d in trace_dirs:
        src = Path(d) / ROUTES
        if not src.is_dir():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        for part in sorted(src.glob(ROUTE_GLOB)):
            if part.is_symlink() or not part.is_file():
                continue
            if (dest / part.name).exists():
                raise TraceError(f"{part}: a route chunk of this name came from another input; retrace.")
            shutil.copyfile(part, dest / part.name)
