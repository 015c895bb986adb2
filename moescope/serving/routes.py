"""Per-token routes of a trace directory, in token order: the input of every serving what-if.

What: :func:`load_routes` reads ``routes/part-*.parquet`` (written by ``moescope trace
--save-routes``) into a :class:`Routes`: per MoE layer the top-k expert ids of every token,
in the order the corpus was traced, with each token's document and domain.

How: chunks are read with pyarrow (only the id columns), concatenated and sorted by
``(window, position)``, which is the order of the packed token stream (windows are
consecutive cuts of it, shards keep their global window numbers). A trace without
``routes/`` is refused with a one-line error naming ``--save-routes``: aggregate counts do
not say in which order experts were needed, which every cache and batch what-if depends on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moescope.errors import TraceError
from moescope.tracedir.files import ROUTE_GLOB, ROUTES, TraceDir, read_trace_dir

__all__ = ["Routes", "load_routes", "routes_from_arrays"]


@dataclass(frozen=True)
class Routes:
    """Routing of every traced token, in stream order.

    Attributes:
        layers: MoE layer indices (decoder layer numbers), ascending.
        experts: ``[layers, tokens, k]`` logical expert ids (top-1 first; ``-1`` = empty slot).
        doc: ``[tokens]`` document index per token.
        domain: ``[tokens]`` domain name per token, or None when the corpus had no domains.
        num_experts: routed experts per MoE layer.
        model: the model reference the trace was recorded on (None if unknown).
    """

    layers: list[int]
    experts: np.ndarray
    doc: np.ndarray
    domain: np.ndarray | None
    num_experts: int
    model: str | None = None

    @property
    def tokens(self) -> int:
        """Tokens routed."""
        return int(self.doc.shape[0])

    @property
    def top_k(self) -> int:
        """Expert slots per token."""
        return int(self.experts.shape[2])

    def layer(self, layer: int) -> np.ndarray:
        """``[tokens, k]`` expert ids of one MoE layer."""
        try:
            return self.experts[self.layers.index(layer)]
        except ValueError:
            raise TraceError(f"layer {layer} is not an MoE layer of this trace ({self.layers}).") from None

    def half(self) -> np.ndarray:
        """``[tokens]`` corpus half of each token (its document's parity, as the trace's
        expert-parallel what-if splits the corpus)."""
        return (self.doc & 1).astype(np.int8)

    def head(self, tokens: int) -> Routes:
        """The first ``tokens`` tokens (a quick look at a long trace)."""
        return Routes(
            self.layers,
            self.experts[:, :tokens],
            self.doc[:tokens],
            None if self.domain is None else self.domain[:tokens],
            self.num_experts,
            self.model,
        )


def routes_from_arrays(
    experts: np.ndarray,
    num_experts: int,
    *,
    doc: np.ndarray | None = None,
    layers: list[int] | None = None,
    domain: np.ndarray | None = None,
) -> Routes:
    """A :class:`Routes` from an array ``[tokens, layers, k]`` (or ``[tokens, k]`` for one layer).

    For notebooks and tests: ``doc`` defaults to one document, ``layers`` to ``0..L-1``.
    """
    ids = np.asarray(experts)
    if ids.ndim == 2:
        ids = ids[:, None, :]
    n, n_l, _k = ids.shape
    return Routes(
        layers=list(range(n_l)) if layers is None else list(layers),
        experts=np.ascontiguousarray(ids.transpose(1, 0, 2)).astype(np.int16),
        doc=np.zeros(n, dtype=np.int64) if doc is None else np.asarray(doc, dtype=np.int64),
        domain=domain,
        num_experts=num_experts,
    )


def load_routes(trace: str | Path | TraceDir, max_tokens: int | None = None) -> Routes:
    """Read a trace directory's per-token routes, in token order.

    Args:
        trace: a trace directory written with ``moescope trace ... --save-routes`` (or its
            :class:`~moescope.tracedir.files.TraceDir`).
        max_tokens: keep only the first this many tokens of the stream.

    Returns:
        A :class:`Routes`.

    Raises:
        TraceError: the directory is not a complete trace, has no ``routes/`` (traced
            without ``--save-routes``), or its route chunks do not match its summary.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    td = trace if isinstance(trace, TraceDir) else read_trace_dir(trace)
    parts = sorted((td.path / ROUTES).glob(ROUTE_GLOB)) if (td.path / ROUTES).is_dir() else []
    if not parts:
        raise TraceError(
            f"{td.path}: no per-token routes (routes/); rerun `moescope trace MODEL CORPUS --save-routes "
            f"--out {td.path}`: the serving what-ifs need token order."
        )
    layers = td.layers
    want = ["window", "position", "doc", *(f"layer{layer}_experts" for layer in layers)]
    tables = []
    for part in parts:
        try:
            schema = pq.read_schema(part)
        except (OSError, pa.ArrowInvalid) as exc:
            raise TraceError(f"{part}: unreadable route chunk ({exc}); retrace with --save-routes.") from None
        missing = [c for c in want if c not in schema.names]
        if missing:
            raise TraceError(
                f"{part}: no column {missing[0]}; the routes do not match {td.path}/summary.json."
            )
        cols = want + (["domain"] if "domain" in schema.names else [])
        tables.append(pq.read_table(part, columns=cols))
    table = pa.concat_tables(tables)
    order = np.lexsort((table["position"].to_numpy(), table["window"].to_numpy()))
    if max_tokens is not None:
        order = order[:max_tokens]
    k = td.top_k
    ids = np.empty((len(layers), len(order), k), dtype=np.int16)
    for i, layer in enumerate(layers):
        col = table[f"layer{layer}_experts"].combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False)
        if flat.size != len(col) * k:
            raise TraceError(f"{td.path}: layer {layer} routes are not top-{k}; retrace with --save-routes.")
        ids[i] = flat.reshape(-1, k)[order]
    domain = None
    if "domain" in table.column_names and td.state.domains:
        domain = np.asarray(table["domain"].to_numpy(zero_copy_only=False), dtype=object)[order]
    return Routes(
        layers=layers,
        experts=ids,
        doc=table["doc"].to_numpy()[order].astype(np.int64),
        domain=domain,
        num_experts=td.num_experts,
        model=td.model,
    )
