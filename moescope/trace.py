"""Trace a MoE model's routing over a corpus into a trace directory, and merge shard traces.

What: :func:`run_trace` loads a model and reads a corpus; :func:`trace_model` runs an
already-loaded model over documents; both aggregate routing online into a
:class:`TraceState` and write the trace directory (contract in ``DESIGN.md``):
``summary.json``, ``expert_load.csv``, ``coactivation.csv``, ``domain_load.csv`` (when the
corpus has domains), ``capacity.csv``, ``state.npz`` (the mergeable raw sums),
``plots/*.png`` and, with ``save_routes``, ``routes/part-*.parquet``.
:func:`merge_traces` sums shard states and writes exactly what one run would have written.

How:

- **Packing**: each document is tokenised without special tokens and followed by the
  tokenizer's EOS token; documents are concatenated into one stream that is cut into
  consecutive ``seq_len`` windows, so a window may span a document boundary (attention is
  not masked across it, as in pretraining packing). Every token keeps its document index
  and domain. Only the last window can be short; it is padded and the padding masked out.
  ``max_tokens`` truncates the stream.
- **Batches and shards**: windows are grouped ``batch_size`` at a time; batch ``b`` belongs
  to shard ``b mod n``. Every shard reads and tokenises the whole stream (cheap next to the
  forward passes) but runs only its batches, so each batch is bit-identical to the same
  batch of an unsharded run and per-batch quantities (capacity drops) merge exactly.
- **Online aggregation**: hooks from :mod:`moescope.routing` record each MoE layer's ids,
  weights and routed-expert output norms for one batch; the batch is reduced with
  vectorised ``bincount`` calls (all layers at once) into fixed-size sums, then dropped.
  Memory does not grow with the corpus (routes, when saved, are flushed in chunks).
- **Exact merges**: integer sums are integers; float sums are accumulated per batch in
  float64 and added to the state as fixed-point integers (resolution 2**-20), so
  addition is associative and merging shards reproduces an unsharded run bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moescope import __version__
from moescope.errors import CorpusError, TraceError
from moescope.outdir import atomic_output, check_destination, write_json_atomic

#: capacity factors whose drops are counted online (what-if, per batch)
CAPACITY_FACTORS: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0)
#: expert-parallel degrees tracked online (contiguous placement)
EP_DEGREES: tuple[int, ...] = (2, 4, 8)
#: bins of the top-1 share histogram over [0, 1]
HIST_BINS = 20
#: fixed-point scale of float sums in the state
FIXED_SCALE = float(2**20)
STATE_VERSION = 1

PACKING = (
    "eos-joined stream: each document tokenised without special tokens, EOS appended, "
    "documents concatenated and cut into consecutive seq_len windows (a window may span "
    "documents; tokens keep their document index); the last window padded and masked"
)

_ARRAYS = (
    "counts",
    "weight_fx",
    "out_norm_fx",
    "wout_norm_fx",
    "coact",
    "top1_fx",
    "top1_hist",
    "reuse",
    "reuse_pairs",
    "cap_dropped",
    "ep_distinct",
    "ep_batch_max",
    "router_dropped",
    "dom_counts",
    "dom_weight_fx",
)


# --------------------------------------------------------------------------- state


@dataclass
class TraceState:
    """Mergeable raw sums of a trace: everything else is derived from these.

    Arrays are indexed by position in :attr:`layers` (``L``) and expert (``E``). Float
    sums are fixed-point int64 (divide by :data:`FIXED_SCALE`); see :meth:`floats`.

    Attributes:
        layers: MoE decoder layer indices as in the checkpoint.
        num_experts: routed experts per layer.
        top_k: experts per token.
        meta: run description (model, corpus, settings, shard, corpus statistics).
        domains: domain names, aligned with the first axis of ``dom_counts``.
        tokens: traced (non-padding) tokens.
        windows: traced windows; batches: traced batches.
        counts: ``[L, E]`` tokens that had the expert in their top-k.
        weight_fx / out_norm_fx / wout_norm_fx: ``[L, E]`` sums of gate weight, routed
            expert output norm and norm of the weighted contribution.
        coact: ``[L, E, E]`` tokens choosing both ``a < b`` (upper triangle).
        top1_fx: ``[L]`` sum of each token's largest gate weight.
        top1_hist: ``[L, HIST_BINS]`` histogram of top-1 weight / sum of the token's weights.
        reuse / reuse_pairs: ``[L]`` experts shared by adjacent tokens of one document and
            window, and the number of such adjacent pairs.
        cap_dropped: ``[L, len(CAPACITY_FACTORS)]`` assignments over capacity, per batch.
        ep_distinct: ``[L, len(EP_DEGREES)]`` sum over tokens of distinct devices hit
            (contiguous placement).
        ep_batch_max: ``[L, len(EP_DEGREES)]`` sum over batches of the busiest device's
            load (contiguous placement).
        router_dropped: ``[L]`` tokens the model itself dropped (switch capacity).
        dom_counts / dom_weight_fx: ``[D, L, E]`` per-domain counts and weight sums.
    """

    layers: list[int]
    num_experts: int
    top_k: int
    meta: dict[str, Any] = field(default_factory=dict)
    domains: list[str] = field(default_factory=list)
    tokens: int = 0
    windows: int = 0
    batches: int = 0
    counts: np.ndarray = field(default=None)  # type: ignore[assignment]
    weight_fx: np.ndarray = field(default=None)  # type: ignore[assignment]
    out_norm_fx: np.ndarray = field(default=None)  # type: ignore[assignment]
    wout_norm_fx: np.ndarray = field(default=None)  # type: ignore[assignment]
    coact: np.ndarray = field(default=None)  # type: ignore[assignment]
    top1_fx: np.ndarray = field(default=None)  # type: ignore[assignment]
    top1_hist: np.ndarray = field(default=None)  # type: ignore[assignment]
    reuse: np.ndarray = field(default=None)  # type: ignore[assignment]
    reuse_pairs: np.ndarray = field(default=None)  # type: ignore[assignment]
    cap_dropped: np.ndarray = field(default=None)  # type: ignore[assignment]
    ep_distinct: np.ndarray = field(default=None)  # type: ignore[assignment]
    ep_batch_max: np.ndarray = field(default=None)  # type: ignore[assignment]
    router_dropped: np.ndarray = field(default=None)  # type: ignore[assignment]
    dom_counts: np.ndarray = field(default=None)  # type: ignore[assignment]
    dom_weight_fx: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for name, shape in self.shapes().items():
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(shape, dtype=np.int64))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every array, from the layers, experts and domains."""
        n_l, n_e = len(self.layers), self.num_experts
        return {
            "counts": (n_l, n_e),
            "weight_fx": (n_l, n_e),
            "out_norm_fx": (n_l, n_e),
            "wout_norm_fx": (n_l, n_e),
            "coact": (n_l, n_e, n_e),
            "top1_fx": (n_l,),
            "top1_hist": (n_l, HIST_BINS),
            "reuse": (n_l,),
            "reuse_pairs": (n_l,),
            "cap_dropped": (n_l, len(CAPACITY_FACTORS)),
            "ep_distinct": (n_l, len(EP_DEGREES)),
            "ep_batch_max": (n_l, len(EP_DEGREES)),
            "router_dropped": (n_l,),
            "dom_counts": (len(self.domains), n_l, n_e),
            "dom_weight_fx": (len(self.domains), n_l, n_e),
        }

    # -- derived floats ---------------------------------------------------------------------
    def floats(self, name: str) -> np.ndarray:
        """A fixed-point sum as float64 (``weight``, ``out_norm``, ``wout_norm``, ``top1``, ``dom_weight``)."""
        return getattr(self, f"{name}_fx").astype(np.float64) / FIXED_SCALE

    def domain_index(self, name: str) -> int:
        """Index of a domain, adding it (with zero sums) when new."""
        if name not in self.domains:
            self.domains.append(name)
            pad = np.zeros((1, len(self.layers), self.num_experts), dtype=np.int64)
            self.dom_counts = np.concatenate([self.dom_counts, pad])
            self.dom_weight_fx = np.concatenate([self.dom_weight_fx, pad.copy()])
        return self.domains.index(name)

    def canonical(self) -> TraceState:
        """Domains sorted by name, so runs that met domains in another order compare equal."""
        order = sorted(range(len(self.domains)), key=lambda i: self.domains[i])
        self.domains = [self.domains[i] for i in order]
        self.dom_counts = self.dom_counts[order] if order else self.dom_counts
        self.dom_weight_fx = self.dom_weight_fx[order] if order else self.dom_weight_fx
        return self

    # -- merge / io ---------------------------------------------------------------------------
    def add(self, other: TraceState) -> None:
        """Add another state's sums into this one (same layers, experts and top-k).

        Raises:
            TraceError: the states describe different models.
        """
        if (other.layers, other.num_experts, other.top_k) != (self.layers, self.num_experts, self.top_k):
            raise TraceError(
                "cannot merge traces of different models "
                f"(layers/experts/top-k {self.layers}/{self.num_experts}/{self.top_k} vs "
                f"{other.layers}/{other.num_experts}/{other.top_k}); merge shards of one run."
            )
        for name in other.domains:
            self.domain_index(name)
        for name in _ARRAYS:
            if name.startswith("dom_"):
                continue
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for j, name in enumerate(other.domains):
            i = self.domains.index(name)
            self.dom_counts[i] += other.dom_counts[j]
            self.dom_weight_fx[i] += other.dom_weight_fx[j]
        self.tokens += other.tokens
        self.windows += other.windows
        self.batches += other.batches

    def save(self, path: Path) -> None:
        """Write the state as one ``.npz`` (arrays plus a JSON header)."""
        header = {
            "version": STATE_VERSION,
            "layers": self.layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "domains": self.domains,
            "tokens": self.tokens,
            "windows": self.windows,
            "batches": self.batches,
            "meta": self.meta,
            "capacity_factors": list(CAPACITY_FACTORS),
            "ep_degrees": list(EP_DEGREES),
            "hist_bins": HIST_BINS,
            "fixed_scale": FIXED_SCALE,
        }
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        with open(path, "wb") as fh:
            np.savez_compressed(fh, header=np.array(json.dumps(header, sort_keys=True)), **arrays)

    @classmethod
    def load(cls, path: Path) -> TraceState:
        """Read a state written by :meth:`save`.

        Raises:
            TraceError: the file is missing, unreadable or from an incompatible version.
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                arrays = {name: data[name] for name in _ARRAYS}
        except FileNotFoundError:
            raise TraceError(
                f"{path.parent}: no state.npz; it is not a complete trace — rerun `moescope trace`."
            ) from None
        except Exception as exc:  # zipfile, numpy and json each raise their own types
            raise TraceError(
                f"{path}: unreadable trace state ({type(exc).__name__}: {exc}); rerun `moescope trace`."
            ) from None
        if not isinstance(header, dict):
            raise TraceError(f"{path}: corrupt trace state header; rerun `moescope trace`.")
        if header.get("version") != STATE_VERSION or header.get("fixed_scale") != FIXED_SCALE:
            raise TraceError(
                f"{path}: trace state version {header.get('version')} is not supported; retrace."
            )
        try:
            state = cls(
                layers=[int(v) for v in header["layers"]],
                num_experts=int(header["num_experts"]),
                top_k=int(header["top_k"]),
                meta=dict(header["meta"]),
                domains=[str(v) for v in header["domains"]],
                tokens=int(header["tokens"]),
                windows=int(header["windows"]),
                batches=int(header["batches"]),
                **arrays,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceError(f"{path}: corrupt trace state header ({exc}); rerun `moescope trace`.") from None
        bad = [n for n, shape in state.shapes().items() if getattr(state, n).shape != shape]
        if bad:
            raise TraceError(f"{path}: trace state arrays do not match its header; rerun `moescope trace`.")
        return state


# --------------------------------------------------------------------------- online reduction


class _Reducer:
    """Reduces recorded routing into a :class:`TraceState` (torch, vectorised).

    Batches are queued and reduced ``group`` at a time, so the fixed cost of the ~50 small
    tensor ops is paid once per group; sums are still binned per batch (the batch is part
    of every bincount code), so per-batch quantities and fixed-point rounding are exactly
    what reducing each batch alone would give.
    """

    def __init__(self, state: TraceState, group: int = 8) -> None:
        self.state = state
        self.group = group
        self._pending: list[tuple[Any, ...]] = []

    def update(self, records: Sequence[Any], mask: Any, doc: Any, dom: Any) -> None:
        """Queue one batch (``records`` from :class:`~moescope.routing.RoutingRecorder`)."""
        import torch

        bsz, seq = mask.shape
        k = self.state.top_k
        ids = torch.stack([r.ids.reshape(bsz, seq, -1) for r in records])  # [L, B, S, k]
        if ids.shape[-1] != k:
            raise TraceError(f"the model routed {ids.shape[-1]} experts per token, expected top_k={k}.")
        wts = torch.stack([r.weights.reshape(bsz, seq, -1) for r in records])
        has_norms = all(r.norms is not None for r in records)
        nrm = torch.stack([r.norms.reshape(bsz, seq, -1) for r in records]) if has_norms else None
        wnrm = torch.stack([r.weighted_norms.reshape(bsz, seq, -1) for r in records]) if has_norms else None
        if self._pending and self._pending[0][4].shape[1] != seq:
            self.flush()
        self._pending.append(
            (ids, wts, nrm, wnrm, mask.to(ids.device), doc.to(ids.device), dom.to(ids.device))
        )
        if len(self._pending) >= self.group:
            self.flush()

    def flush(self) -> None:
        """Reduce every queued batch."""
        if self._pending:
            pending, self._pending = self._pending, []
            self._reduce(pending)

    def _reduce(self, pending: list[tuple[Any, ...]]) -> None:
        import torch

        st = self.state
        n_l, n_e, k = len(st.layers), st.num_experts, st.top_k
        n_g = len(pending)
        ids4 = torch.cat([p[0] for p in pending], dim=1).long()  # [L, B, S, k] over the group
        wts4 = torch.cat([p[1] for p in pending], dim=1).double()
        has_norms = all(p[2] is not None for p in pending)
        mask = torch.cat([p[4] for p in pending])
        doc = torch.cat([p[5] for p in pending])
        dom = torch.cat([p[6] for p in pending])
        dev = ids4.device
        n_b, seq = mask.shape
        batch_of_row = torch.cat([torch.full((p[4].shape[0],), g, device=dev) for g, p in enumerate(pending)])
        vidx = mask.reshape(-1).nonzero().squeeze(1)
        if vidx.numel() == 0:
            return
        bt = batch_of_row[:, None].expand(n_b, seq).reshape(-1)[vidx]  # [N] batch of each token
        tok_per_batch = torch.bincount(bt, minlength=n_g).cpu().numpy()
        ids_v = ids4.reshape(n_l, n_b * seq, k)[:, vidx]  # [L, N, k]
        w_v = wts4.reshape(n_l, n_b * seq, k)[:, vidx]
        routed = ids_v >= 0
        w_v = torch.where(routed, w_v, torch.zeros_like(w_v))
        sentinel = n_l * n_e
        off = (torch.arange(n_l, device=dev) * n_e)[:, None, None] + (bt * sentinel)[None, :, None]
        n_bins = n_g * sentinel
        flat = torch.where(routed, ids_v + off, torch.full_like(ids_v, n_bins)).reshape(-1)

        def per_batch(weights: Any | None) -> Any:
            """[G, L, E] sums, one row per batch."""
            return torch.bincount(flat, weights=weights, minlength=n_bins + 1)[:n_bins].reshape(n_g, n_l, n_e)

        def fx(t: Any) -> np.ndarray:
            """Fixed point per batch (first axis), then summed: exact and order-independent."""
            return torch.round(t.double() * FIXED_SCALE).to(torch.int64).sum(dim=0).cpu().numpy()

        counts_g = per_batch(None).cpu().numpy().astype(np.int64)  # [G, L, E]
        st.counts += counts_g.sum(axis=0)
        st.weight_fx += fx(per_batch(w_v.reshape(-1)))
        if has_norms:
            nrm = torch.cat([p[2] for p in pending], dim=1).double().reshape(n_l, n_b * seq, k)[:, vidx]
            wn = torch.cat([p[3] for p in pending], dim=1).double().reshape(n_l, n_b * seq, k)[:, vidx]
            st.out_norm_fx += fx(per_batch(nrm.reshape(-1)))
            st.wout_norm_fx += fx(per_batch(wn.reshape(-1)))
        st.router_dropped += (~routed).sum(dim=(1, 2)).cpu().numpy()

        # co-activation: every unordered pair within a token's top-k
        if k > 1:
            ia, ib = torch.triu_indices(k, k, 1, device=dev)
            a, b = ids_v[:, :, ia], ids_v[:, :, ib]
            lo, hi = torch.minimum(a, b), torch.maximum(a, b)
            ok = (lo >= 0) & (lo != hi)
            loff = (torch.arange(n_l, device=dev) * n_e * n_e)[:, None, None]
            code = torch.where(ok, loff + lo * n_e + hi, torch.full_like(lo, n_l * n_e * n_e))
            pairs = torch.bincount(code.reshape(-1), minlength=n_l * n_e * n_e + 1)[:-1]
            st.coact += pairs.reshape(n_l, n_e, n_e).cpu().numpy()

        # router confidence: top-1 weight and its share of the token's total weight
        top1 = w_v.max(dim=-1).values  # [L, N]
        total = w_v.sum(dim=-1)
        share = torch.where(total > 0, top1 / total.clamp(min=1e-30), torch.ones_like(total))
        bins = (share * HIST_BINS).long().clamp(0, HIST_BINS - 1)
        boff = (torch.arange(n_l, device=dev) * HIST_BINS)[:, None]
        hist = torch.bincount((bins + boff).reshape(-1), minlength=n_l * HIST_BINS)
        st.top1_hist += hist.reshape(n_l, HIST_BINS).cpu().numpy()
        t1code = (bt[None, :] * n_l + torch.arange(n_l, device=dev)[:, None]).reshape(-1)
        top1_g = torch.bincount(t1code, weights=top1.reshape(-1), minlength=n_g * n_l).reshape(n_g, n_l)
        st.top1_fx += fx(top1_g)

        # consecutive-token reuse inside a window and a document
        if seq > 1:
            adj = mask[:, 1:] & mask[:, :-1] & (doc[:, 1:] == doc[:, :-1])
            same = (ids4[:, :, 1:, :, None] == ids4[:, :, :-1, None, :]) & (ids4[:, :, 1:, :, None] >= 0)
            overlap = same.sum(dim=(-1, -2))  # [L, B, S-1]
            st.reuse += (overlap * adj).sum(dim=(1, 2)).cpu().numpy()
            st.reuse_pairs += int(adj.sum())

        # capacity what-if: per batch, capacity = ceil(C * tokens * k / E) per expert
        for j, cf in enumerate(CAPACITY_FACTORS):
            cap = np.array([math.ceil(cf * int(n) * k / n_e) for n in tok_per_batch])[:, None, None]
            st.cap_dropped[:, j] += np.clip(counts_g - cap, 0, None).sum(axis=(0, 2))

        # expert parallelism, contiguous placement: distinct devices per token, busiest device
        for j, deg in enumerate(EP_DEGREES):
            if n_e % deg:
                continue
            per = n_e // deg
            devs = torch.where(routed, ids_v // per, torch.full_like(ids_v, -1)).sort(dim=-1).values
            distinct = (devs[..., 0] >= 0).long() + (
                (devs[..., 1:] != devs[..., :-1]) & (devs[..., 1:] >= 0)
            ).sum(dim=-1)
            st.ep_distinct[:, j] += distinct.sum(dim=-1).cpu().numpy()
            st.ep_batch_max[:, j] += counts_g.reshape(n_g, n_l, deg, per).sum(axis=3).max(axis=2).sum(axis=0)

        # per-domain load
        dom_v = dom.reshape(-1)[vidx]  # [N]
        if bool((dom_v >= 0).any()):
            n_d = int(dom_v.max()) + 1
            dbins = n_g * n_d * sentinel
            base = (bt * n_d + dom_v) * sentinel  # batch-major, then domain
            lidx = (torch.arange(n_l, device=dev) * n_e)[:, None, None]
            dcode = torch.where(
                routed & (dom_v >= 0)[None, :, None],
                base[None, :, None] + lidx + ids_v,
                torch.full_like(ids_v, dbins),
            ).reshape(-1)
            dc = torch.bincount(dcode, minlength=dbins + 1)[:-1].reshape(n_g, n_d, n_l, n_e)
            dw = torch.bincount(dcode, weights=w_v.reshape(-1), minlength=dbins + 1)[:-1].reshape(
                n_g, n_d, n_l, n_e
            )
            st.dom_counts[:n_d] += dc.sum(dim=0).cpu().numpy()
            st.dom_weight_fx[:n_d] += fx(dw)

        st.tokens += int(vidx.numel())
        st.windows += int(mask.any(dim=1).sum())
        st.batches += n_g


# --------------------------------------------------------------------------- windows


@dataclass
class _Window:
    tokens: np.ndarray  # int64 [n]
    docs: np.ndarray  # int64 [n] document index in the stream
    domains: np.ndarray  # int64 [n] domain index (-1: none)


def _windows(
    documents: Iterable[Any],
    tokenizer: Any,
    seq_len: int,
    max_tokens: int | None,
    state: TraceState,
    doc_counter: list[int],
) -> Iterator[_Window]:
    """Cut the EOS-joined token stream into consecutive ``seq_len`` windows."""
    eos = getattr(tokenizer, "eos_token_id", None)
    toks: list[np.ndarray] = []
    docs: list[np.ndarray] = []
    doms: list[np.ndarray] = []
    buffered = 0
    emitted = 0
    for index, doc in enumerate(documents):
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"] if doc.text else []
        if not ids:
            continue  # empty documents are counted by the corpus reader, not traced
        if eos is not None:
            ids = [*ids, eos]
        if max_tokens is not None:
            ids = ids[: max(0, max_tokens - emitted - buffered)]
            if not ids:
                break
        doc_counter[0] += 1
        dom = state.domain_index(str(doc.domain)) if doc.domain is not None else -1
        arr = np.asarray(ids, dtype=np.int64)
        toks.append(arr)
        docs.append(np.full(len(arr), index, dtype=np.int64))
        doms.append(np.full(len(arr), dom, dtype=np.int64))
        buffered += len(arr)
        if buffered >= seq_len:
            t, d, m = np.concatenate(toks), np.concatenate(docs), np.concatenate(doms)
            start = 0
            while buffered - start >= seq_len:
                yield _Window(
                    t[start : start + seq_len], d[start : start + seq_len], m[start : start + seq_len]
                )
                start += seq_len
                emitted += seq_len
            toks, docs, doms = [t[start:]], [d[start:]], [m[start:]]
            buffered -= start
        if max_tokens is not None and emitted + buffered >= max_tokens:
            break
    if buffered:
        yield _Window(np.concatenate(toks), np.concatenate(docs), np.concatenate(doms))


def _batches(windows: Iterator[_Window], batch_size: int) -> Iterator[list[_Window]]:
    batch: list[_Window] = []
    for w in windows:
        batch.append(w)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------- routes


class _RoutesWriter:
    """Buffers per-token routes and writes them as Parquet chunks under ``routes/``."""

    def __init__(self, folder: Path, layers: list[int], top_k: int, chunk_tokens: int = 65536) -> None:
        self.folder = folder
        self.layers = layers
        self.top_k = top_k
        self.chunk_tokens = chunk_tokens
        self.tables: list[Any] = []
        self.rows = 0
        self.first_batch: int | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def add(
        self, batch_index: int, window0: int, tokens: Any, mask: Any, doc: Any, records: Sequence[Any]
    ) -> None:
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
            "token_id": pa.array(tokens.reshape(-1).cpu()[vidx].numpy().astype(np.int64)),
        }
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
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.tables:
            return
        pq.write_table(pa.concat_tables(self.tables), self.folder / f"part-{self.first_batch:07d}.parquet")
        self.tables, self.rows, self.first_batch = [], 0, None


# --------------------------------------------------------------------------- tracing


@dataclass
class TraceResult:
    """What a trace wrote.

    Attributes:
        out_dir: the trace directory.
        tokens: traced tokens (padding excluded).
        seconds: wall time of the forward passes and aggregation.
        tokens_per_second: ``tokens / seconds``.
        layers: MoE layer indices.
        num_experts: routed experts per layer.
        top_k: experts per token.
        summary: the ``summary.json`` content.
    """

    out_dir: Path
    tokens: int
    seconds: float
    tokens_per_second: float
    layers: list[int]
    num_experts: int
    top_k: int
    summary: dict[str, Any]


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)``; ``"env"`` → ``($RANK, $WORLD_SIZE)``; ``None`` → ``(0, 1)``.

    Raises:
        ValueError: malformed spec or ``i`` outside ``0..n-1``.
    """
    if spec is None:
        return 0, 1
    if spec == "env":
        # torchrun / SLURM-style launchers export the rank and world size
        try:
            return parse_shard(f"{os.environ['RANK']}/{os.environ['WORLD_SIZE']}")
        except KeyError:
            raise ValueError(
                "--shard env needs RANK and WORLD_SIZE in the environment (set by torchrun)."
            ) from None
    try:
        i_s, n_s = spec.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise ValueError(f"--shard {spec!r}: expected i/n, e.g. 0/4.") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {spec!r}: need 0 <= i < n, e.g. 0/4 … 3/4.")
    return i, n


def _hidden_size(config: Any) -> int | None:
    text = getattr(config, "text_config", None) or config
    for key in ("hidden_size", "d_model"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            return value
    return None


def trace_model(
    model: Any,
    tokenizer: Any,
    documents: Iterable[Any],
    out_dir: str | Path,
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    max_tokens: int | None = None,
    shard: tuple[int, int] = (0, 1),
    save_routes: bool = False,
    plots: bool = True,
    meta: dict[str, Any] | None = None,
    corpus_stats: Any | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    model_ref: str = "model",
    inputs: Sequence[str | Path] = (),
) -> TraceResult:
    """Run ``model`` over ``documents`` with routing hooks and write a trace directory.

    Args:
        model: a loaded transformers model (eval mode) with routed experts.
        tokenizer: its tokenizer.
        documents: objects with ``text`` and ``domain`` (``moescope.corpus.Document``).
        out_dir: trace directory to create (replaced if it already holds a trace).
        seq_len: tokens per window.
        batch_size: windows per forward pass.
        max_tokens: stop after this many stream tokens (all shards count the same stream).
        shard: ``(i, n)``: run only batches ``b`` with ``b mod n == i``.
        save_routes: also write per-token routes as Parquet under ``routes/``.
        plots: write ``plots/*.png``.
        meta: extra run description stored in the state and summary.
        corpus_stats: a ``CorpusStats`` filled while ``documents`` is consumed.
        progress: called as ``progress(tokens_done, total_or_None)`` after every batch.
        model_ref: how to name the model in errors and the summary.
        inputs: paths read for this trace (checkpoint, corpus files); ``out_dir`` may not
            be one of them or an ancestor of one.

    Returns:
        A :class:`TraceResult`.

    Raises:
        NotMoEError: the model has no routed experts.
        CorpusError: the corpus yields no tokens.
        OutputError: ``out_dir`` is refused (see :func:`moescope.outdir.check_destination`).
    """
    import torch

    from moescope.identity import StreamHasher, model_fingerprint
    from moescope.routing import RoutingRecorder, config_top_k, require_moe_sites

    if seq_len < 1 or batch_size < 1:
        raise ValueError("seq_len and batch_size must be positive.")
    name_or_path = str(getattr(model, "name_or_path", "") or "")
    inputs = [*inputs, *([name_or_path] if name_or_path else [])]
    out = check_destination(out_dir, "trace", inputs=inputs)
    sites = require_moe_sites(model, model_ref)
    if model.config.is_encoder_decoder:
        # the decoder's MoE layers need target text; trace the encoder stack
        sites = [s for s in sites if s.stack != "decoder"]
        runner = model.get_encoder()
    else:
        runner = getattr(model, "base_model", model)
    layers = [s.layer for s in sites]
    if len(set(layers)) != len(layers):
        raise TraceError(f"{model_ref}: two MoE blocks share a layer index ({layers}); not supported.")
    n_exp = {s.num_experts for s in sites}
    if len(n_exp) != 1:
        raise TraceError(
            f"{model_ref}: MoE layers have different expert counts {sorted(n_exp)}; not supported."
        )
    top_k = config_top_k(model.config)
    if top_k is None:
        raise TraceError(f"{model_ref}: cannot tell experts per token from the config.")
    param = next(model.parameters())
    run_meta: dict[str, Any] = {
        "model": model_ref,
        "model_type": getattr(model.config, "model_type", None),
        "hidden_size": _hidden_size(model.config),
        "dtype": str(param.dtype).replace("torch.", ""),
        "device": str(param.device),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "max_tokens": max_tokens,
        "packing": PACKING,
        "shard": {"index": shard[0], "count": shard[1]},
        "moescope_version": __version__,
        "run_id": uuid.uuid4().hex,
        **(meta or {}),
    }
    if run_meta.get("fingerprint") is None and name_or_path and Path(name_or_path).is_dir():
        run_meta["fingerprint"] = model_fingerprint(name_or_path)
    state = TraceState(layers=layers, num_experts=n_exp.pop(), top_k=top_k, meta=run_meta)
    reducer = _Reducer(state)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    with atomic_output(out, "trace", inputs=inputs) as tmp:
        routes = _RoutesWriter(tmp / "routes", layers, top_k) if save_routes else None
        doc_counter = [0]
        windows = _windows(documents, tokenizer, seq_len, max_tokens, state, doc_counter)
        hasher = StreamHasher(seq_len)
        t0 = time.perf_counter()
        forward_s = 0.0
        stream_tokens = 0
        traced = 0
        window0 = 0
        with torch.inference_mode(), RoutingRecorder(sites) as rec:
            for b, batch in enumerate(_batches(windows, batch_size)):
                stream_tokens += sum(len(w.tokens) for w in batch)
                for w in batch:
                    hasher.update(w.tokens.tobytes(), w.domains.tobytes())
                if b % shard[1] != shard[0]:
                    window0 += len(batch)
                    continue
                toks = torch.full((len(batch), seq_len), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), seq_len), dtype=torch.bool)
                doc = torch.full((len(batch), seq_len), -1, dtype=torch.long)
                dom = torch.full((len(batch), seq_len), -1, dtype=torch.long)
                for r, w in enumerate(batch):
                    n = len(w.tokens)
                    toks[r, :n] = torch.from_numpy(w.tokens)
                    mask[r, :n] = True
                    doc[r, :n] = torch.from_numpy(w.docs)
                    dom[r, :n] = torch.from_numpy(w.domains)
                # one window shorter than seq_len: trim the batch to its longest row
                width = int(mask.sum(dim=1).max())
                toks, mask, doc, dom = toks[:, :width], mask[:, :width], doc[:, :width], dom[:, :width]
                f0 = time.perf_counter()
                rec.clear()
                runner(
                    input_ids=toks.to(param.device),
                    attention_mask=mask.long().to(param.device),
                    use_cache=False,
                )
                forward_s += time.perf_counter() - f0
                records = rec.records
                if any(r is None for r in records):
                    raise TraceError(f"{model_ref}: a MoE layer did not run in the forward pass.")
                reducer.update(records, mask, doc, dom)
                if routes is not None:
                    routes.add(b, window0, toks, mask, doc, records)
                window0 += len(batch)
                if progress is not None:
                    traced += int(mask.sum())
                    progress(traced, None)
        reducer.flush()
        if routes is not None:
            routes.flush()
        seconds = time.perf_counter() - t0
        if stream_tokens == 0:
            raise CorpusError(
                "the corpus produced no tokens (all documents empty?); pass a non-empty corpus."
            )
        stats = corpus_stats
        state.meta["corpus_fingerprint"] = hasher.hexdigest()
        state.meta["corpus_stats"] = {
            "documents_used": doc_counter[0],
            "stream_tokens": stream_tokens,
            **(
                {
                    "documents": stats.documents,
                    "empty_documents": stats.empty_documents,
                    "non_utf8_documents": stats.non_utf8_documents,
                    "bytes": stats.bytes,
                }
                if stats is not None
                else {}
            ),
        }
        timings = {"trace_seconds": seconds, "forward_seconds": forward_s}
        summary = write_trace_dir(tmp, state, timings=timings, plots=plots)
    return TraceResult(
        out_dir=out,
        tokens=state.tokens,
        seconds=seconds,
        tokens_per_second=state.tokens / seconds if seconds > 0 else 0.0,
        layers=layers,
        num_experts=state.num_experts,
        top_k=top_k,
        summary=summary,
    )


def run_trace(
    model_ref: str,
    corpus: str | Sequence[str],
    out_dir: str | Path,
    *,
    split: str | None = None,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> TraceResult:
    """Load ``model_ref``, read ``corpus`` and trace it (see :func:`trace_model` for ``kwargs``).

    Args:
        model_ref: ``demo``, a local directory or a hub id.
        corpus: corpus spec(s) for :func:`moescope.corpus.read_corpus`.
        out_dir: trace directory.
        split: split of the built-in corpus (``None``: all documents; the CLI passes
            ``heldout`` for built-in corpora by default); files ignore it.
        revision: hub revision.
        dtype: ``auto``, ``float32``, ``bfloat16``, ``float16``.
        device: torch device.
        trust_remote_code: allow a checkpoint's own modelling code.
        **kwargs: passed to :func:`trace_model`.

    Returns:
        A :class:`TraceResult` (timings include model loading).

    Raises:
        NotMoEError, ModelNotFoundError, CorpusError, TraceError: see the message.
    """
    from moescope.corpus import CorpusStats, read_corpus
    from moescope.identity import fingerprint_ref
    from moescope.model import load_model, parse_model_ref

    stats = CorpusStats()
    specs = [corpus] if isinstance(corpus, str) else list(corpus)
    mref = parse_model_ref(model_ref, revision)
    inputs = [*specs, *([mref.path_or_id] if mref.is_local else [])]
    check_destination(out_dir, "trace", inputs=inputs)
    docs = read_corpus(specs, split=split, stats=stats)  # bad specs fail here, before the model loads
    t0 = time.perf_counter()
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if bars and not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # no "Loading weights" bar in logs and pipes
    try:
        model, tokenizer = load_model(
            model_ref, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    load_s = time.perf_counter() - t0
    meta = {
        "corpus": specs,
        "split": split,
        "load_seconds": load_s,
        "fingerprint": fingerprint_ref(model_ref, revision),
        **kwargs.pop("meta", {}),
    }
    return trace_model(
        model,
        tokenizer,
        docs,
        out_dir,
        meta=meta,
        corpus_stats=stats,
        model_ref=model_ref,
        inputs=inputs,
        **kwargs,
    )


# --------------------------------------------------------------------------- directory io


def write_trace_dir(
    folder: Path, state: TraceState, *, timings: dict[str, Any], plots: bool = True
) -> dict[str, Any]:
    """Write every derived file from ``state`` into ``folder``; ``summary.json`` goes last.

    Args:
        folder: destination (normally a temporary directory renamed afterwards).
        state: the raw sums.
        timings: recorded in the summary (the only part not derived from ``state``).
        plots: also draw ``plots/*.png``.

    Returns:
        The summary written.
    """
    import pandas as pd

    from moescope import stats as st

    state.canonical()
    folder.mkdir(parents=True, exist_ok=True)
    state.save(folder / "state.npz")
    st.expert_load(state).to_csv(folder / "expert_load.csv", index=False)
    st.coactivation(state).to_csv(folder / "coactivation.csv", index=False)
    st.capacity(state).to_csv(folder / "capacity.csv", index=False)
    files = ["state.npz", "expert_load.csv", "coactivation.csv", "capacity.csv"]
    if state.domains:
        st.domain_load(state).to_csv(folder / "domain_load.csv", index=False)
        files.append("domain_load.csv")
    if plots:
        from moescope.plots import write_plots

        files += [f"plots/{p.name}" for p in write_plots(state, folder / "plots")]
    layer_df: pd.DataFrame = st.layer_stats(state)
    meta = state.meta
    summary = {
        "tool": "moescope",
        "kind": "trace",
        "complete": True,
        "moescope_version": meta.get("moescope_version", __version__),
        "run_id": meta.get("run_id"),
        "source": meta.get("source", "moescope"),
        "lacks": meta.get("lacks", []),
        "model": meta.get("model"),
        "fingerprint": meta.get("fingerprint"),
        "corpus_fingerprint": meta.get("corpus_fingerprint"),
        "model_type": meta.get("model_type"),
        "corpus": meta.get("corpus"),
        "split": meta.get("split"),
        "tokens": state.tokens,
        "windows": state.windows,
        "batches": state.batches,
        "documents": meta.get("corpus_stats", {}).get("documents_used"),
        "corpus_stats": meta.get("corpus_stats"),
        "packing": meta.get("packing"),
        "seq_len": meta.get("seq_len"),
        "batch_size": meta.get("batch_size"),
        "max_tokens": meta.get("max_tokens"),
        "dtype": meta.get("dtype"),
        "device": meta.get("device"),
        "hidden_size": meta.get("hidden_size"),
        "moe_layers": state.layers,
        "num_experts": state.num_experts,
        "top_k": state.top_k,
        "domains": state.domains,
        "shard": meta.get("shard"),
        "layers": [
            {
                "layer": int(r.layer),
                "imbalance_max_mean": r.imbalance_max_mean,
                "cv": r.cv,
                "entropy_norm": r.entropy_norm,
                "dead_experts": st.dead_experts(state, int(r.layer)),
                "near_dead_experts": st.dead_experts(state, int(r.layer), near=True),
                "router_dropped": int(r.router_dropped),
            }
            for r in layer_df.itertuples()
        ],
        "timings": {
            **({"load_seconds": meta["load_seconds"]} if "load_seconds" in meta else {}),
            **timings,
            "tokens_per_second": (state.tokens / timings["trace_seconds"])
            if timings.get("trace_seconds")
            else None,
        },
        "files": files,
    }
    write_json_atomic(folder / "summary.json", summary, default=_json_default)
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        f = float(value)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_trace(trace_dir: str | Path) -> tuple[TraceState, dict[str, Any]]:
    """Read a complete trace directory.

    Args:
        trace_dir: a directory written by ``moescope trace`` or ``moescope merge``.

    Returns:
        ``(state, summary)``.

    Raises:
        TraceError: the directory is missing, incomplete (interrupted) or unreadable.
    """
    folder = Path(trace_dir).expanduser()
    if not folder.is_dir():
        raise TraceError(
            f"{folder}: no such trace directory; create one with `moescope trace MODEL CORPUS --out {folder}`."
        )
    summary_path = folder / "summary.json"
    if not summary_path.exists():
        raise TraceError(
            f"{folder}: no summary.json, so the trace is incomplete (interrupted?); rerun `moescope trace`."
        )
    try:
        summary = json.loads(summary_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TraceError(f"{summary_path}: malformed JSON ({exc}); rerun `moescope trace`.") from None
    except OSError as exc:
        raise TraceError(f"{summary_path}: cannot read it ({exc.strerror or exc}).") from None
    if not isinstance(summary, dict):
        raise TraceError(
            f"{summary_path}: expected a JSON object, found {type(summary).__name__}; rerun `moescope trace`."
        )
    if summary.get("complete") is not True:
        raise TraceError(f"{folder}: summary.json is not marked complete; rerun `moescope trace`.")
    return TraceState.load(folder / "state.npz"), summary


#: settings that must agree between the traces merged
_MERGE_KEYS = (
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
)


def _check_mergeable(trace_dirs: Sequence[Path], states: Sequence[TraceState]) -> dict[str, Any]:
    """Refuse duplicates, overlaps and mixed runs; return the merged ``shard`` record."""
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
    first = states[0]
    for d, s in zip(trace_dirs[1:], states[1:], strict=True):
        for key in _MERGE_KEYS:
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
    check_destination(out_dir, "trace", inputs=dirs)
    states = [load_trace(d)[0] for d in dirs]
    merged_shard = _check_mergeable(dirs, states)
    first = states[0]
    total = TraceState(layers=list(first.layers), num_experts=first.num_experts, top_k=first.top_k)
    for s in states:
        total.add(s)
    meta = dict(first.meta)
    meta["shard"] = merged_shard
    meta["run_id"] = uuid.uuid4().hex
    meta["merged_run_ids"] = [s.meta.get("run_id") for s in states]
    meta.pop("load_seconds", None)
    total.meta = meta
    timings = {
        "trace_seconds": sum(float(_timing(d, "trace_seconds")) for d in dirs),
        "forward_seconds": sum(float(_timing(d, "forward_seconds")) for d in dirs),
    }
    with atomic_output(out_dir, "trace", inputs=dirs) as tmp:
        summary = write_trace_dir(tmp, total, timings=timings, plots=plots)
        _merge_routes(dirs, tmp / "routes")
        if (tmp / "routes").exists():
            summary["files"].append("routes/")
    return summary


def _timing(trace_dir: str | Path, key: str) -> float:
    summary = json.loads((Path(trace_dir) / "summary.json").read_text())
    return float(summary.get("timings", {}).get(key) or 0.0)


def _merge_routes(trace_dirs: Sequence[str | Path], dest: Path) -> None:
    """Copy every shard's route chunks; chunk names carry the global batch index, so they never collide."""
    for d in trace_dirs:
        src = Path(d) / "routes"
        if not src.is_dir():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        for part in sorted(src.glob("part-*.parquet")):
            if part.is_symlink() or not part.is_file():
                continue
            if (dest / part.name).exists():
                raise TraceError(f"{part}: a route chunk of this name came from another input; retrace.")
            shutil.copyfile(part, dest / part.name)
