"""The raw sums of a trace (``state.npz``): what every other file of a trace is derived from.

What: :class:`TraceState` holds, per MoE layer and expert, the integer and fixed-point
sums that tracing accumulates online (:mod:`moescope.trace.reduce`), that shards add up
exactly (:meth:`TraceState.add`), and from which the CSV tables, the statistics and the
plots are computed. Its arrays are declared once, in :data:`STATE_ARRAYS`, with the
online what-if settings (:data:`CAPACITY_FACTORS`, :data:`EP_DEGREES`, :data:`HIST_BINS`).

How: float sums are stored as int64 fixed point (:data:`FIXED_SCALE`), so addition is
associative and a merge of shards equals one run bit for bit. :meth:`TraceState.save`
writes one ``.npz`` (arrays plus a JSON header, no pickles); :meth:`TraceState.load`
checks the version, the scale and every array's shape. The trace directory around it
(file names, tables, the loader) is :mod:`moescope.tracedir`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import TraceError

#: capacity factors whose drops are counted online (what-if, per batch)
CAPACITY_FACTORS: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0)
#: expert-parallel degrees tracked online (contiguous placement)
EP_DEGREES: tuple[int, ...] = (2, 4, 8)
#: bins of the top-1 share histogram over [0, 1]
HIST_BINS = 20
#: fixed-point scale of float sums in the state
FIXED_SCALE = float(2**20)
STATE_VERSION = 1

#: every state array and its axes: L layers, E experts, D domains, C capacity factors,
#: P expert-parallel degrees, H histogram bins (the order is the order in ``state.npz``)
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
}

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
        for name in other.domains:
            self.domain_index(name)
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
        arrays = {name: getattr(self, name) for name in STATE_ARRAYS}
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
                arrays = {name: data[name] for name in STATE_ARRAYS}
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
            raise TraceError(f"{path}: corrupt trace state header ({exc}); {_RETRACE}.") from None
        if any(getattr(state, n).shape != shape for n, shape in state.shapes().items()):
            raise TraceError(f"{path}: trace state arrays do not match its header; {_RETRACE}.")
        return state
