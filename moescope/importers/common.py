"""What every importer shares: the model's routing shape, normalised routing, and the sink.

What:

- :func:`model_shape` reads MoE layers, experts, top-k (and hidden size, dtype, fingerprint)
  from ``--model`` through the header-only accounting (:func:`moescope.checkpoint.ref.open_checkpoint`,
  :func:`moescope.arch.moe.moe_spec`); no weights are read.
- :func:`to_moe_layers` and :func:`normalise` turn recorded expert ids ``[tokens, layers, K]``
  (all decoder layers or only the MoE ones, any ``K``, ``-1`` for empty slots, optionally
  physical ids with a physical-to-logical map) into logical ids ``[tokens, moe_layers, top_k]``,
  refusing ids outside the model, more than ``top_k`` experts per token, or repeats.
- :class:`RouteSink` feeds normalised routing to :class:`moescope.tracing.reduce.Reducer`,
  either one forward pass at a time (:meth:`RouteSink.batch`) or as a token stream packed
  like ``moescope trace`` packs (:meth:`RouteSink.stream`: ``seq_len`` windows,
  ``batch_size`` windows per batch), so the online sums are the ones a trace computes.

How: adjacency (for expert reuse) is carried as a *segment* id per token: neighbours in the
stream are adjacent only when they share a segment. Where the source does not know token
order, every token gets its own segment, so no adjacent pair is ever invented, and the
trace records ``token_order`` in ``lacks``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import MoescopeError, NotMoEError
from moescope.tracedir.state import TraceState

#: names recorded in ``summary.json`` ``lacks`` (what an imported source does not carry)
LACKS_GATE_WEIGHTS = "gate_weights"
LACKS_OUT_NORMS = "out_norms"
LACKS_DOMAINS = "domains"
#: token adjacency unknown: reuse statistics are not computed
LACKS_TOKEN_ORDER = "token_order"
#: counts only (SGLang ``stat`` mode): the per-token statistics below cannot be derived
LACKS_PER_TOKEN = "per_token"
LACKS_COACTIVATION = "coactivation"
LACKS_CAPACITY = "capacity"
LACKS_EXPERT_PARALLEL = "expert_parallel"


class RoutingImportError(MoescopeError):
    """Routing recorded elsewhere cannot be imported (malformed, unsafe, or for another model)."""


@dataclass(frozen=True)
class ModelShape:
    """The routing shape of ``--model``, read from its config (no weights).

    Attributes:
        ref: the reference as given.
        model_type: the config's ``model_type``.
        num_layers: decoder layers (what serving engines count, dense layers included).
        moe_layers: MoE layer indices, as in the checkpoint.
        num_experts: routed experts per MoE layer.
        top_k: experts per token.
        hidden_size: the model's hidden size (for all-to-all estimates), when known.
        dtype: the config's dtype, when given (serving dtype unknown).
        fingerprint: the checkpoint's fingerprint when it is local (what a trace records).
        local_path: the local checkpoint path (an input of the import), or None.
        seq_len: the window ``moescope trace`` would use on this model (512, or its context
            when shorter): the default packing of streamed imports.
    """

    ref: str
    model_type: str
    num_layers: int
    moe_layers: list[int]
    num_experts: int
    top_k: int
    hidden_size: int | None = None
    dtype: str | None = None
    fingerprint: str | None = None
    local_path: str | None = None
    seq_len: int = 512


def model_shape(ref: str, revision: str | None = None) -> ModelShape:
    """Read the routing shape of a model reference from its config (header-only, no weights).

    Raises:
        ModelNotFoundError, ConfigError: the reference or its config is unusable.
        NotMoEError: the model routes no experts.
        RoutingImportError: a bare ``.safetensors`` file without a config.
    """
    from moescope.arch.moe import moe_spec, text_config
    from moescope.arch.specfile import is_raw_spec, spec_to_config
    from moescope.arch.validate import validate_config
    from moescope.checkpoint.identity import fingerprint_ref
    from moescope.checkpoint.ref import open_checkpoint, resolve_ref
    from moescope.corpus.packing import default_seq_len

    resolved = resolve_ref(ref, revision)  # decoded once for the headers, the fingerprint and the path
    ck = open_checkpoint(resolved)
    cfg = ck.config
    if cfg is None:
        raise RoutingImportError(
            f"{ref}: no config.json beside the weights, so its MoE layers are unknown; pass the "
            "checkpoint directory or its config.json as --model."
        )
    where = ck.config_where
    if is_raw_spec(cfg):
        cfg = spec_to_config(cfg, where)
    validate_config(cfg, where)
    spec = moe_spec(cfg, where)
    if not spec.is_moe:
        raise NotMoEError(f"{ref} has no routed experts, so there is no routing to import; pass a MoE model.")
    text = text_config(cfg)
    hidden = text.get("hidden_size", text.get("d_model"))
    dtype = text.get("dtype") or text.get("torch_dtype") or cfg.get("dtype") or cfg.get("torch_dtype")
    return ModelShape(
        ref=ref,
        model_type=spec.model_type,
        num_layers=spec.num_layers,
        moe_layers=sorted(spec.moe_layers),
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        hidden_size=hidden if isinstance(hidden, int) else None,
        dtype=str(dtype) if isinstance(dtype, str) else None,
        fingerprint=fingerprint_ref(resolved),
        local_path=str(resolved.path) if resolved.path is not None else None,
        seq_len=default_seq_len(text),
    )


# --------------------------------------------------------------------------- normalising ids


def to_moe_layers(ids: np.ndarray, shape: ModelShape, where: str) -> np.ndarray:
    """``[N, L_src, K]`` → ``[N, len(moe_layers), K]``: the MoE layers' rows of the recording.

    ``L_src`` is either every decoder layer (SGLang's convention: dense layers hold ``-1``
    and are dropped) or only the MoE layers, in order.

    Raises:
        RoutingImportError: another layer count.
    """
    n_moe, n_all = len(shape.moe_layers), shape.num_layers
    if ids.ndim != 3:
        raise RoutingImportError(
            f"{where}: expected expert ids shaped [tokens, layers, k], found {ids.ndim} dimension(s) "
            f"{list(ids.shape)}."
        )
    n_src = ids.shape[1]
    if n_src == n_moe:
        return ids
    if n_src == n_all:
        return ids[:, shape.moe_layers, :]
    raise RoutingImportError(
        f"{where}: routing for {n_src} layers, but {shape.ref} has {n_all} decoder layers of which "
        f"{n_moe} are MoE; pass the --model the routing was recorded on."
    )


def normalise(ids: np.ndarray, shape: ModelShape, where: str) -> np.ndarray:
    """Logical ids ``[N, L, K]`` (``-1`` empty, any ``K``) → ``[N, L, top_k]`` int64, checked.

    Each token's valid ids keep their slot order and move to the front; ``-1`` pads the rest.

    Raises:
        RoutingImportError: an id outside ``0..E-1``, more than ``top_k`` experts for one token
            and layer, or one expert twice for one token and layer.
    """
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise RoutingImportError(f"{where}: expert ids must be integers, found {ids.dtype}.")
    ids = ids.astype(np.int64, copy=False)
    n_e, k = shape.num_experts, shape.top_k
    bad = (ids < -1) | (ids >= n_e)
    if bad.any():
        value = int(ids[bad].flat[0])
        raise RoutingImportError(
            f"{where}: expert id {value} is outside 0..{n_e - 1} ({shape.ref} has {n_e} routed experts; "
            "-1 marks an empty slot); pass the --model the routing was recorded on."
        )
    valid = ids >= 0
    per_token = valid.sum(axis=-1)
    if per_token.size and int(per_token.max()) > k:
        t, li = np.unravel_index(int(per_token.argmax()), per_token.shape)
        raise RoutingImportError(
            f"{where}: token {t} has {int(per_token.max())} experts at layer {shape.moe_layers[li]}, but "
            f"{shape.ref} routes top_k={k}; pass the --model the routing was recorded on (with SGLang, "
            "launch without shared-experts fusion)."
        )
    if ids.shape[-1] != k:
        order = np.argsort(~valid, axis=-1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=-1)
        if ids.shape[-1] > k:
            ids = ids[..., :k]
        else:
            pad = np.full((*ids.shape[:-1], k - ids.shape[-1]), -1, dtype=np.int64)
            ids = np.concatenate([ids, pad], axis=-1)
    srt = np.sort(ids, axis=-1)
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    if dup.any():
        tok, lay, _ = (int(v[0]) for v in np.nonzero(dup))
        raise RoutingImportError(
            f"{where}: token {tok} is routed to one expert twice at layer {shape.moe_layers[lay]}; the "
            "recording is corrupt (each slot must name a different expert)."
        )
    return ids


def physical_to_logical(ids: np.ndarray, phys_map: np.ndarray | None, where: str) -> np.ndarray:
    """Map physical expert ids ``[N, L_src, K]`` through ``phys_map`` ``[L_src, P]`` (``-1`` kept).

    Raises:
        RoutingImportError: a physical id outside ``0..P-1`` or a map of another layer count.
    """
    if phys_map is None:
        return ids
    if phys_map.ndim != 2 or phys_map.shape[0] != ids.shape[1]:
        raise RoutingImportError(
            f"{where}: last_physical_to_logical_map is {list(phys_map.shape)}, expected "
            f"[{ids.shape[1]}, num_physical_experts] (one row per recorded layer)."
        )
    n_p = phys_map.shape[1]
    bad = (ids < -1) | (ids >= n_p)
    if bad.any():
        raise RoutingImportError(
            f"{where}: physical expert id {int(ids[bad].flat[0])} is outside 0..{n_p - 1} of "
            "last_physical_to_logical_map; the dump is corrupt."
        )
    layer = np.arange(ids.shape[1])[None, :, None]
    mapped = phys_map[layer, np.clip(ids, 0, None)]
    return np.where(ids >= 0, mapped, -1).astype(np.int64)


# --------------------------------------------------------------------------- feeding the reducer


@dataclass
class _Record:
    """One MoE layer of one batch, shaped as :class:`moescope.execution.routing.RoutingRecorder` records it."""

    ids: Any
    weights: Any
    norms: Any = None
    weighted_norms: Any = None


@dataclass
class Piece:
    """Normalised routing of some tokens, in stream order.

    Attributes:
        ids: ``[N, L, top_k]`` logical ids (``-1`` empty), MoE layers in the model's order.
        weights: ``[N, L, top_k]`` gate weights, or None when the source has none.
        segments: ``[N]``: neighbours with equal segments are adjacent tokens of one document;
            None when token order is unknown (no adjacency at all).
        domain_codes: ``[N]`` index into ``domain_names`` per token (``-1``: none), or None.
        domain_names: the domain names the codes index.
    """

    ids: np.ndarray
    weights: np.ndarray | None = None
    segments: np.ndarray | None = None
    domain_codes: np.ndarray | None = None
    domain_names: Sequence[str] = ()


@dataclass
class RouteSink:
    """Reduces imported routing into a :class:`TraceState` through the trace's own reducer.

    Attributes:
        state: the sums being filled.
        seq_len / batch_size: the packing of :meth:`stream` (the what-if batch is
            ``batch_size`` windows of ``seq_len`` tokens, as ``moescope trace`` runs).
        progress: called with the tokens reduced so far.
        documents: distinct segments seen (documents, or tokens when order is unknown).
    """

    state: TraceState
    seq_len: int = 512
    batch_size: int = 8
    progress: Callable[[int], None] | None = None
    documents: int = 0
    _reducer: Any = None
    _buf: list[tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]] = field(default_factory=list)
    _buffered: int = 0
    _next_doc: int = 0
    _hash: Any = field(default_factory=lambda: hashlib.sha256(b"import\0"))
    _done: int = 0

    def __post_init__(self) -> None:
        from moescope.tracing.reduce import Reducer

        self._reducer = Reducer(self.state)

    @property
    def fingerprint(self) -> str:
        """``sha256:`` over the imported ids and adjacency, in stream order."""
        return "sha256:" + self._hash.hexdigest()

    def _encode(self, piece: Piece) -> tuple[np.ndarray, np.ndarray]:
        """Per-token document ids (continuing across pieces) and domain indices."""
        n = len(piece.ids)
        if piece.segments is None:
            docs = self._next_doc + np.arange(n, dtype=np.int64)
            self.documents += n
        else:
            seg = np.asarray(piece.segments)
            new = np.ones(n, dtype=bool)
            new[1:] = seg[1:] != seg[:-1]
            docs = self._next_doc - 1 + np.cumsum(new, dtype=np.int64)
            self.documents += int(new.sum())
        self._next_doc += n
        dom = np.full(n, -1, dtype=np.int64)
        if piece.domain_codes is not None:
            lookup = np.array([self.state.domain_index(str(d)) for d in piece.domain_names] + [-1])
            codes = np.asarray(piece.domain_codes, dtype=np.int64)
            dom = lookup[np.where(codes >= 0, codes, len(piece.domain_names))]
        self._hash.update(
            piece.ids.astype(np.int16 if self.state.num_experts < 2**15 else np.int64).tobytes()
        )
        self._hash.update(docs.tobytes())
        return docs, dom

    def batch(self, piece: Piece) -> None:
        """Reduce ``piece`` as one batch (a forward pass of a serving engine)."""
        docs, dom = self._encode(piece)
        n = len(piece.ids)
        if n == 0:
            return
        width = max(16, 1 << (n - 1).bit_length())  # bucketed, so equal widths reduce together
        self._emit(piece.ids, piece.weights, docs, dom, rows=1, width=width)

    def stream(self, piece: Piece) -> None:
        """Append ``piece`` to the token stream; full batches are reduced as they fill."""
        docs, dom = self._encode(piece)
        if len(piece.ids) == 0:
            return
        self._buf.append((piece.ids, piece.weights, docs, dom))
        self._buffered += len(piece.ids)
        full = self.seq_len * self.batch_size
        if self._buffered >= full:
            ids, wts, d, m = self._take()
            whole = (len(ids) // full) * full
            for s in range(0, whole, full):
                self._emit(
                    ids[s : s + full],
                    None if wts is None else wts[s : s + full],
                    d[s : s + full],
                    m[s : s + full],
                    rows=self.batch_size,
                    width=self.seq_len,
                )
            if whole < len(ids):
                self._buf = [(ids[whole:], None if wts is None else wts[whole:], d[whole:], m[whole:])]
                self._buffered = len(ids) - whole

    def _take(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        parts, self._buf, self._buffered = self._buf, [], 0
        ids = np.concatenate([p[0] for p in parts])
        wts = None
        if any(p[1] is not None for p in parts):
            # a file without weights next to one with them: zeros (the trace then lacks gate_weights)
            wts = np.concatenate([np.zeros(p[0].shape) if p[1] is None else p[1] for p in parts])
        return ids, wts, np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])

    def _emit(
        self,
        ids: np.ndarray,
        wts: np.ndarray | None,
        docs: np.ndarray,
        dom: np.ndarray,
        *,
        rows: int,
        width: int,
    ) -> None:
        """Reduce ``n <= rows * width`` tokens laid out as ``[rows, width]`` (the rest masked)."""
        import torch

        n, n_l, k = ids.shape
        rows = min(rows, -(-n // width))
        cells = rows * width
        pad = cells - n
        ids_p = np.concatenate([ids, np.full((pad, n_l, k), -1, dtype=np.int64)])
        w = np.zeros((n, n_l, k)) if wts is None else np.asarray(wts, dtype=np.float64)
        w_p = np.concatenate([w, np.zeros((pad, n_l, k))])
        mask = torch.zeros(cells, dtype=torch.bool)
        mask[:n] = True
        doc_t = torch.from_numpy(np.concatenate([docs, np.full(pad, -1, dtype=np.int64)]))
        dom_t = torch.from_numpy(np.concatenate([dom, np.full(pad, -1, dtype=np.int64)]))
        ids_t = torch.from_numpy(ids_p)
        w_t = torch.from_numpy(w_p)
        records = [_Record(ids_t[:, i, :], w_t[:, i, :]) for i in range(n_l)]
        self._reducer.update(
            records, mask.reshape(rows, width), doc_t.reshape(rows, width), dom_t.reshape(rows, width)
        )
        self._done += n
        if self.progress is not None:
            self.progress(self._done)

    def close(self) -> None:
        """Reduce what the stream still holds (the last, partly filled batch) and flush."""
        if self._buffered:
            ids, wts, d, m = self._take()
            self._emit(ids, wts, d, m, rows=self.batch_size, width=self.seq_len)
        self._reducer.flush()


def check_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Every input exists, is a file, and is given once.

    Raises:
        RoutingImportError: nothing given, a missing path, a directory, or a repeat.
    """
    if not paths:
        raise RoutingImportError("no input given; pass one or more files to import.")
    seen: dict[Path, Path] = {}
    out = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise RoutingImportError(f"{p}: no such file; check the path.")
        if not p.is_file():
            raise RoutingImportError(f"{p}: not a regular file; pass the recorded files themselves.")
        key = p.resolve()
        if key in seen:
            raise RoutingImportError(f"{p} is given twice (as {seen[key]} and {p}); pass each file once.")
        seen[key] = p
        if p.stat().st_size == 0:
            raise RoutingImportError(f"{p}: the file is empty; pass a complete recording.")
        out.append(p)
    return out
