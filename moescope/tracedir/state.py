"""The raw sums of a trace (``state.npz``): what every other file of a trace is derived from.

What: :class:`TraceState` holds, per MoE layer and expert, the integer and fixed-point
sums that tracing accumulates online (:mod:`moescope.tracing.reduce`), that shards add up
exactly (:meth:`TraceState.add`), and from which the CSV tables, the statistics and the
plots are computed. Its arrays are declared once, in :data:`STATE_ARRAYS`, with the
online what-if settings (:data:`CAPACITY_FACTORS`, :data:`EP_DEGREES`, :data:`HIST_BINS`).

How: float sums are stored as int64 fixed point (:data:`FIXED_SCALE`), so addition is
associative and a merge of shards equals one run bit for bit. :meth:`TraceState.save`
writes one ``.npz`` (arrays plus a JSON header, no pickles); :meth:`TraceState.load`
checks the version, the scale and every array's shape. The trace directory around it
(file names, tables, the loader) is :mod:`moescope.tracedir.files`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import TraceError

#: capacity factors whose drops are counted online (what-if, per capacity group)
CAPACITY_FACTORS: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0)
#: tokens per capacity group (GShard's "group"), in corpus order, by default
CAPACITY_GROUP = 4096
#: expert-parallel degrees tracked online (contiguous placement)
EP_DEGREES: tuple[int, ...] = (2, 4, 8)
#: bins of the top-1 share histogram over [0, 1]
HIST_BINS = 20
#: fixed-point scale of float sums in the state
FIXED_SCALE = float(2**20)
#: 2: capacity per fixed token group (``cap_open_*``), per-half counts (``half_counts``);
#: version 1 states (capacity per trace batch) still load, read-only (:data:`OLD_VERSIONS`)
STATE_VERSION = 2
OLD_VERSIONS = (1,)
#: the two corpus halves of ``half_counts``: documents with an even / odd index
HALVES = 2
#: arrays of the still-open capacity groups (variable length ``G``; see :meth:`TraceState.add_open`),
#: stored only when there are some
OPEN_ARRAYS = ("cap_open_ids", "cap_open_tokens", "cap_open_counts")

#: every state array and its axes: L layers, E experts, D domains, C capacity factors,
#: P expert-parallel degrees, H histogram bins, S corpus halves (the order is the order in ``state.npz``)
STATE_ARRAYS: dict[str, tuple[str, ...]] = {
    "counts": ("L", "E"),
    "weight_fx": ("L", "E"),
    "out_norm_fx": ("L", "E"),
    "wout_norm_fx": ("L", "E"),
    "coact": ("L", "E", "E"),
    "top1_fx": ("L",),
    "top1_hist": ("L", "H"),
    "reuse": ("L",),
    "reuse_pairs": ("L",),
    "cap_dropped": ("L", "C"),
    "ep_distinct": ("L", "P"),
    "ep_batch_max": ("L", "P"),
    "router_dropped": ("L",),
    "dom_counts": ("D", "L", "E"),
    "dom_weight_fx": ("D", "L", "E"),
    "half_counts": ("S", "L", "E"),
}
#: arrays added in each version (absent from older states: zeros, and their statistics unavailable)
ADDED_IN = {"half_counts": 2}

_RETRACE = "rerun `moescope trace`"

#: default of every state array: replaced by zeros of its shape in ``__post_init__``
_ZEROS: Any = None


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
        cap_dropped: ``[L, len(CAPACITY_FACTORS)]`` assignments over capacity, summed over the
            closed capacity groups (``capacity_group`` consecutive tokens in corpus order;
            version 1: per trace batch).
        ep_distinct: ``[L, len(EP_DEGREES)]`` sum over tokens of distinct devices hit
            (contiguous placement).
        ep_batch_max: ``[L, len(EP_DEGREES)]`` sum over batches of the busiest device's
            load (contiguous placement).
        router_dropped: ``[L]`` tokens the model itself dropped (switch capacity).
        dom_counts / dom_weight_fx: ``[D, L, E]`` per-domain counts and weight sums.
        half_counts: ``[2, L, E]`` counts of the tokens of even- and odd-indexed documents
            (the held-out split of the balanced expert-parallel placement).
        version: the state version it was written with (:data:`OLD_VERSIONS` load read-only).
        capacity_group: tokens per capacity group (0: version 1, per batch).
        cap_open: capacity groups seen only in part (by a shard, or the last one of a
            stream not yet closed): group index → (tokens seen, ``[L, E]`` counts). Merging
            adds the parts (:meth:`add_open`); :meth:`close_groups` counts the rest into
            ``cap_dropped`` once the trace is whole. In ``state.npz``: :data:`OPEN_ARRAYS`.
    """

    layers: list[int]
    num_experts: int
    top_k: int
    meta: dict[str, Any] = field(default_factory=dict)
    domains: list[str] = field(default_factory=list)
    tokens: int = 0
    windows: int = 0
    batches: int = 0
    counts: np.ndarray = _ZEROS
    weight_fx: np.ndarray = _ZEROS
    out_norm_fx: np.ndarray = _ZEROS
    wout_norm_fx: np.ndarray = _ZEROS
    coact: np.ndarray = _ZEROS
    top1_fx: np.ndarray = _ZEROS
    top1_hist: np.ndarray = _ZEROS
    reuse: np.ndarray = _ZEROS
    reuse_pairs: np.ndarray = _ZEROS
    cap_dropped: np.ndarray = _ZEROS
    ep_distinct: np.ndarray = _ZEROS
    ep_batch_max: np.ndarray = _ZEROS
    router_dropped: np.ndarray = _ZEROS
    dom_counts: np.ndarray = _ZEROS
    dom_weight_fx: np.ndarray = _ZEROS
    half_counts: np.ndarray = _ZEROS
    version: int = STATE_VERSION
    capacity_group: int = CAPACITY_GROUP
    cap_open: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, shape in self.shapes().items():
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(shape, dtype=np.int64))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every array (:data:`STATE_ARRAYS`), from the layers, experts and domains."""
        size = {
            "L": len(self.layers),
            "E": self.num_experts,
            "D": len(self.domains),
            "C": len(CAPACITY_FACTORS),
            "P": len(EP_DEGREES),
            "H": HIST_BINS,
            "S": HALVES,
        }
        return {name: tuple(size[a] for a in axes) for name, axes in STATE_ARRAYS.items()}

    def floats(self, name: str) -> np.ndarray:
        """A fixed-point sum as float64 (``weight``, ``out_norm``, ``wout_norm``, ``top1``, ``dom_weight``)."""
        return getattr(self, f"{name}_fx").astype(np.float64) / FIXED_SCALE

    def set_floats(self, name: str, values: Any) -> None:
        """Store float sums as fixed point (the inverse of :meth:`floats`; for importers and tests)."""
        fx = np.round(np.asarray(values, dtype=np.float64) * FIXED_SCALE).astype(np.int64)
        setattr(self, f"{name}_fx", fx.reshape(getattr(self, f"{name}_fx").shape))

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
        if other.version != self.version:
            raise TraceError(
                f"cannot merge trace states of versions {self.version} and {other.version}; "
                "retrace the older shards with this moescope."
            )
        if other.capacity_group != self.capacity_group:
            raise TraceError(
                f"cannot merge traces with capacity groups of {self.capacity_group} and "
                f"{other.capacity_group} tokens; trace every shard with one --capacity-group."
            )
        for name in other.domains:
            self.domain_index(name)
        self.add_open(
            list(other.cap_open),
            [t for t, _c in other.cap_open.values()],
            [c for _t, c in other.cap_open.values()],
        )
        for name, axes in STATE_ARRAYS.items():
            if axes[0] != "D":
                setattr(self, name, getattr(self, name) + getattr(other, name))
        for j, name in enumerate(other.domains):
            i = self.domains.index(name)
            self.dom_counts[i] += other.dom_counts[j]
            self.dom_weight_fx[i] += other.dom_weight_fx[j]
        self.tokens += other.tokens
        self.windows += other.windows
        self.batches += other.batches

    def add_open(self, ids: Any, tokens: Any, counts: Any) -> None:
        """Add parts of capacity groups; a group whose parts reach ``capacity_group`` tokens closes.

        Args:
            ids: ``[G]`` group indices (global token index // ``capacity_group``).
            tokens: ``[G]`` tokens of each part.
            counts: ``[G, L, E]`` expert counts of each part.
        """
        done_tok, done_cnt = [], []
        for gid, tok, cnt in zip(ids, tokens, counts, strict=True):
            gid, tok = int(gid), int(tok)
            if gid in self.cap_open:
                prev_tok, prev_cnt = self.cap_open.pop(gid)
                tok, cnt = tok + prev_tok, cnt + prev_cnt
            if tok >= self.capacity_group:
                done_tok.append(tok)
                done_cnt.append(cnt)
            else:
                self.cap_open[gid] = (tok, np.asarray(cnt, dtype=np.int64))
        if done_tok:
            self.cap_dropped += group_drops(np.stack(done_cnt), done_tok, self.top_k, self.num_experts)

    def close_groups(self) -> None:
        """The trace is whole: count the open capacity groups at the size they have (the last is short)."""
        if self.cap_open:
            tok = [t for t, _c in self.cap_open.values()]
            cnt = np.stack([c for _t, c in self.cap_open.values()])
            self.cap_dropped += group_drops(cnt, tok, self.top_k, self.num_experts)
            self.cap_open = {}

    def open_arrays(self) -> dict[str, np.ndarray]:
        """The open capacity groups as the arrays of ``state.npz`` (:data:`OPEN_ARRAYS`), by group index."""
        ids = sorted(self.cap_open)
        shape = (0, len(self.layers), self.num_experts)
        return {
            "cap_open_ids": np.array(ids, dtype=np.int64),
            "cap_open_tokens": np.array([self.cap_open[g][0] for g in ids], dtype=np.int64),
            "cap_open_counts": (
                np.stack([self.cap_open[g][1] for g in ids]).astype(np.int32)
                if ids
                else np.zeros(shape, np.int32)
            ),
        }

    def save(self, path: Path) -> None:
        """Write the state as one ``.npz`` (arrays plus a JSON header)."""
        header = {
            "version": self.version,
            "capacity_group": self.capacity_group,
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
        arrays = {name: getattr(self, name) for name in STATE_ARRAYS}
        if self.cap_open:  # only a shard's (or an unclosed) state has open groups
            arrays |= self.open_arrays()
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
                version = header.get("version") if isinstance(header, dict) else None
                arrays = {
                    name: data[name]
                    for name in STATE_ARRAYS
                    if name in data.files or ADDED_IN.get(name, 1) <= (version or 0)
                }
                arrays |= {name: data[name] for name in OPEN_ARRAYS if name in data.files}
        except FileNotFoundError:
            raise TraceError(
                f"{path.parent}: no {path.name}; it is not a complete trace — {_RETRACE}."
            ) from None
        except Exception as exc:  # zipfile, numpy and json each raise their own types
            raise TraceError(
                f"{path}: unreadable trace state ({type(exc).__name__}: {exc}); {_RETRACE}."
            ) from None
        if not isinstance(header, dict):
            raise TraceError(f"{path}: corrupt trace state header; {_RETRACE}.")
        if (
            header.get("version") not in (STATE_VERSION, *OLD_VERSIONS)
            or header.get("fixed_scale") != FIXED_SCALE
        ):
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
                version=int(header["version"]),
                cap_open=_open_dict(
                    arrays.pop("cap_open_ids", None),
                    arrays.pop("cap_open_tokens", None),
                    arrays.pop("cap_open_counts", None),
                ),
                capacity_group=int(header.get("capacity_group", 0)),
                **arrays,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceError(f"{path}: corrupt trace state header ({exc}); {_RETRACE}.") from None
        if any(getattr(state, n).shape != shape for n, shape in state.shapes().items()) or any(
            c.shape != (len(state.layers), state.num_experts) for _t, c in state.cap_open.values()
        ):
            raise TraceError(f"{path}: trace state arrays do not match its header; {_RETRACE}.")
        return state


def _open_dict(ids: Any, tokens: Any, counts: Any) -> dict[int, tuple[int, np.ndarray]]:
    """``state.npz``'s open-group arrays as :attr:`TraceState.cap_open` (absent: none)."""
    if ids is None or tokens is None or counts is None:
        return {}
    if not len(ids) == len(tokens) == len(counts):
        raise ValueError("open capacity group arrays differ in length")
    return {
        int(g): (int(t), np.asarray(c, dtype=np.int64)) for g, t, c in zip(ids, tokens, counts, strict=True)
    }


def group_drops(counts: np.ndarray, tokens: Any, top_k: int, num_experts: int) -> np.ndarray:
    """``[L, len(CAPACITY_FACTORS)]`` assignments over capacity in groups of ``tokens[g]`` tokens.

    In a group of ``n`` tokens each expert takes at most ``ceil(C · n · k / E)`` assignments.

    Args:
        counts: ``[G, L, E]`` expert counts per group.
        tokens: ``[G]`` tokens per group.
    """
    counts = np.asarray(counts, dtype=np.int64)
    out = np.zeros((counts.shape[1], len(CAPACITY_FACTORS)), dtype=np.int64)
    for j, cf in enumerate(CAPACITY_FACTORS):
        cap = np.array([math.ceil(cf * int(n) * top_k / num_experts) for n in tokens], dtype=np.int64)
        out[:, j] = np.clip(counts - cap[:, None, None], 0, None).sum(axis=(0, 2))
    return out
