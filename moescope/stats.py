"""Routing statistics derived from a trace's raw sums (:class:`moescope.tracedir.TraceState`).

What: per-layer load imbalance (max/mean, coefficient of variation, normalised entropy),
dead and near-dead experts, router confidence (mean top-1 gate weight, histogram of the
top-1 share), co-activation against chance, consecutive-token reuse against chance,
per-domain specialisation (Jensen-Shannon divergence), and two what-ifs: token dropping
under a capacity factor, and expert-parallel load and all-to-all traffic.
:func:`build_report` bundles them as DataFrames; :meth:`Report.to_dict` is the ``--json``
form of ``moescope report``.

How: everything is computed from the mergeable sums in ``state.npz``, so a merged shard
trace gives the same report as one run. This module imports only :mod:`moescope.tracedir`
(the tables written into a trace directory, :func:`expert_load` and friends, live there
and are re-exported here). Definitions, stated where they are computed:

- load share ``p_e = count_e / Σ count``; imbalance ``max/mean``; ``cv = std/mean``
  (population std); ``entropy_norm = H(p) / ln E`` (1 = perfectly even).
- dead: count 0; near-dead: fewer than ``NEAR_DEAD_FRACTION`` × the mean count.
- co-activation ratio: observed pair count / (tokens × q_a × q_b), ``q_e = count_e / tokens``
  (the count expected if the two choices were independent).
- reuse: share of a token's experts also chosen by the previous token of the same document
  and window; chance is ``Σ q_e² / k`` (independent tokens with the same marginals).
- capacity: per batch, each expert takes at most ``ceil(C · tokens · k / E)`` assignments;
  the rest are dropped (counted online during the trace).
- expert parallelism with degree D: experts split into D groups of E/D (contiguous:
  ``e // (E/D)``; balanced: longest-processing-time greedy on the traced loads, E/D experts
  per device). Imbalance = busiest device / mean device load. Traffic assumes tokens are
  spread evenly over the D devices (data-parallel attention), so a token-expert assignment
  goes to a remote device with probability (D−1)/D; each remote assignment moves
  ``hidden_size × dtype bytes`` for dispatch and the same again for combine (×2). The
  ``dedup`` variant sends a token once per distinct remote device (contiguous placement,
  counted online).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moescope.tracedir import (
    CAPACITY_FACTORS,
    EP_DEGREES,
    HIST_BINS,
    TraceState,
    capacity,
    coactivation,
    domain_load,
    expert_load,
    read_trace_dir,
)

__all__ = [
    "CAPACITY_FACTORS",
    "EP_DEGREES",
    "HIST_BINS",
    "Report",
    "balanced_placement",
    "build_report",
    "capacity",
    "coactivation",
    "coactivation_ratio",
    "coactivation_top",
    "confidence_histogram",
    "dead_experts",
    "domain_load",
    "domain_specialisation",
    "expert_load",
    "expert_parallel",
    "imbalance",
    "js_divergence",
    "layer_stats",
    "load_share",
    "mean_pairwise_jsd",
]

#: an expert is near-dead below this fraction of the mean load
NEAR_DEAD_FRACTION = 0.1
#: pairs observed fewer times than this are left out of the co-activation ranking
MIN_PAIR_COUNT = 5

_DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}


def _safe_div(a: np.ndarray | float, b: np.ndarray | float) -> Any:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(b) != 0, np.asarray(a, dtype=np.float64) / np.asarray(b), np.nan)


def load_share(counts: np.ndarray) -> np.ndarray:
    """Row-normalised load ``[L, E]`` (NaN rows where a layer saw nothing)."""
    return _safe_div(counts, counts.sum(axis=-1, keepdims=True))


def imbalance(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row max/mean, coefficient of variation and normalised entropy of expert loads.

    Args:
        counts: ``[L, E]`` (or ``[E]``) load counts.

    Returns:
        ``{"max_mean": [L], "cv": [L], "entropy_norm": [L]}``.
    """
    c = np.atleast_2d(counts).astype(np.float64)
    mean = c.mean(axis=-1)
    p = load_share(c)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    n_e = c.shape[-1]
    ent = -plogp.sum(axis=-1) / math.log(n_e) if n_e > 1 else np.ones(len(c))
    return {
        "max_mean": _safe_div(c.max(axis=-1), mean),
        "cv": _safe_div(c.std(axis=-1), mean),
        "entropy_norm": np.where(mean > 0, ent, np.nan),
    }


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint)."""
    p = p / p.sum()
    q = q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / b[nz])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def dead_experts(state: TraceState, layer: int, *, near: bool = False) -> list[int]:
    """Experts of ``layer`` with no tokens (``near=True``: some, but < 10% of the mean)."""
    row = state.counts[state.layers.index(layer)]
    if near:
        limit = NEAR_DEAD_FRACTION * row.mean()
        return [int(e) for e in np.nonzero((row > 0) & (row < limit))[0]]
    return [int(e) for e in np.nonzero(row == 0)[0]]


# --------------------------------------------------------------------------- report tables


def layer_stats(state: TraceState) -> pd.DataFrame:
    """One row per MoE layer: imbalance, dead experts, confidence, reuse, co-activation, domains."""
    counts = state.counts
    imb = imbalance(counts)
    tokens = max(state.tokens, 1)
    q = counts / tokens
    k = state.top_k
    chance = (q**2).sum(axis=1) / k
    reuse_rate = _safe_div(state.reuse, state.reuse_pairs * k)
    coact_ratio = coactivation_ratio(state)
    rows = []
    for i, layer in enumerate(state.layers):
        finite = coact_ratio[i][np.isfinite(coact_ratio[i])]
        rows.append(
            {
                "layer": layer,
                "tokens": state.tokens,
                "imbalance_max_mean": float(imb["max_mean"][i]),
                "cv": float(imb["cv"][i]),
                "entropy_norm": float(imb["entropy_norm"][i]),
                "dead": len(dead_experts(state, layer)),
                "near_dead": len(dead_experts(state, layer, near=True)),
                "mean_top1_weight": float(state.floats("top1")[i] / tokens),
                "reuse_rate": float(reuse_rate[i]),
                "reuse_chance": float(chance[i]),
                "reuse_ratio": float(_safe_div(reuse_rate[i], chance[i])),
                "coact_max_ratio": float(finite.max()) if finite.size else float("nan"),
                "domain_jsd": mean_pairwise_jsd(state, i),
                "router_dropped": int(state.router_dropped[i]),
            }
        )
    return pd.DataFrame(rows)


def coactivation_ratio(state: TraceState) -> np.ndarray:
    """``[L, E, E]`` observed / expected pair counts (NaN below :data:`MIN_PAIR_COUNT`)."""
    q = state.counts / max(state.tokens, 1)
    expected = state.tokens * q[:, :, None] * q[:, None, :]
    ratio = _safe_div(state.coact, expected)
    upper = np.triu(np.ones((state.num_experts, state.num_experts), dtype=bool), 1)
    return np.where(upper[None] & (state.coact >= MIN_PAIR_COUNT), ratio, np.nan)


def coactivation_top(state: TraceState, per_layer: int = 5) -> pd.DataFrame:
    """The pairs that fire together most above chance, ``per_layer`` per layer."""
    ratio = coactivation_ratio(state)
    q = state.counts / max(state.tokens, 1)
    rows = []
    for i, layer in enumerate(state.layers):
        a, b = np.nonzero(np.isfinite(ratio[i]))
        order = np.argsort(-ratio[i][a, b], kind="stable")[:per_layer]
        for j in order:
            ea, eb = int(a[j]), int(b[j])
            rows.append(
                {
                    "layer": layer,
                    "expert_a": ea,
                    "expert_b": eb,
                    "count": int(state.coact[i, ea, eb]),
                    "expected": float(state.tokens * q[i, ea] * q[i, eb]),
                    "ratio": float(ratio[i, ea, eb]),
                }
            )
    return pd.DataFrame(rows, columns=["layer", "expert_a", "expert_b", "count", "expected", "ratio"])


def mean_pairwise_jsd(state: TraceState, li: int) -> float:
    """Mean Jensen-Shannon divergence between the expert loads of every two domains at layer index ``li``."""
    dist = [state.dom_counts[d, li] for d in range(len(state.domains)) if state.dom_counts[d, li].sum() > 0]
    if len(dist) < 2:
        return float("nan")
    vals = [js_divergence(dist[a], dist[b]) for a in range(len(dist)) for b in range(a + 1, len(dist))]
    return float(np.mean(vals))


def domain_specialisation(state: TraceState) -> pd.DataFrame:
    """Per (domain, layer): JSD between the domain's expert distribution and all other domains',
    and the expert it uses most."""
    rows = []
    for d, name in enumerate(state.domains):
        for i, layer in enumerate(state.layers):
            own = state.dom_counts[d, i]
            rest = state.dom_counts[:, i].sum(axis=0) - own
            if own.sum() == 0:
                continue
            top = int(own.argmax())
            rows.append(
                {
                    "domain": name,
                    "layer": layer,
                    "assignments": int(own.sum()),
                    "jsd_vs_rest": js_divergence(own, rest) if rest.sum() > 0 else float("nan"),
                    "top_expert": top,
                    "top_expert_share": float(own[top] / own.sum()),
                }
            )
    return pd.DataFrame(
        rows, columns=["domain", "layer", "assignments", "jsd_vs_rest", "top_expert", "top_expert_share"]
    )


def balanced_placement(load: np.ndarray, degree: int) -> np.ndarray:
    """Device of each expert: longest-processing-time greedy, ``E/degree`` experts per device.

    Args:
        load: ``[E]`` expert loads.
        degree: devices.

    Returns:
        ``[E]`` device index per expert.
    """
    n_e = len(load)
    per = n_e // degree
    device = np.full(n_e, -1, dtype=np.int64)
    dev_load = np.zeros(degree)
    dev_n = np.zeros(degree, dtype=np.int64)
    for e in np.argsort(-load, kind="stable"):
        open_ = np.nonzero(dev_n < per)[0]
        d = open_[np.argmin(dev_load[open_])]
        device[e] = d
        dev_load[d] += load[e]
        dev_n[d] += 1
    return device


def expert_parallel(state: TraceState, dtype_bytes: int | None = None) -> pd.DataFrame:
    """Per (layer, EP degree, placement): device load imbalance and all-to-all bytes per token.

    Args:
        state: trace sums.
        dtype_bytes: bytes per activation element; defaults to the traced dtype's.

    Returns:
        Columns ``layer, degree, placement, experts_per_device, imbalance,
        batch_imbalance, bytes_per_token, bytes_per_token_dedup``.
    """
    hidden = state.meta.get("hidden_size") or 0
    nbytes = dtype_bytes or _DTYPE_BYTES.get(str(state.meta.get("dtype")), 2)
    n_e, k = state.num_experts, state.top_k
    tokens = max(state.tokens, 1)
    rows = []
    for i, layer in enumerate(state.layers):
        load = state.counts[i].astype(np.float64)
        assigned = load.sum()
        for j, deg in enumerate(EP_DEGREES):
            if n_e % deg or deg > n_e:
                continue
            per = n_e // deg
            remote = (deg - 1) / deg
            plain = k * remote * hidden * nbytes * 2
            dedup = state.ep_distinct[i, j] / tokens * remote * hidden * nbytes * 2
            mean_dev = assigned / deg
            contiguous = load.reshape(deg, per).sum(axis=1)
            bal_dev = balanced_placement(load, deg)
            balanced = np.bincount(bal_dev, weights=load, minlength=deg)
            for placement, dev_load, batch_imb, dd in (
                ("contiguous", contiguous, _safe_div(state.ep_batch_max[i, j], mean_dev), dedup),
                ("balanced", balanced, float("nan"), float("nan")),
            ):
                rows.append(
                    {
                        "layer": layer,
                        "degree": deg,
                        "placement": placement,
                        "experts_per_device": per,
                        "imbalance": float(_safe_div(dev_load.max(), mean_dev)),
                        "batch_imbalance": float(batch_imb),
                        "bytes_per_token": float(plain),
                        "bytes_per_token_dedup": float(dd),
                    }
                )
    return pd.DataFrame(rows)


def confidence_histogram(state: TraceState) -> pd.DataFrame:
    """Tokens per bin of top-1 share (largest gate weight / sum of the token's gate weights)."""
    rows = []
    for i, layer in enumerate(state.layers):
        for b in range(HIST_BINS):
            rows.append(
                {"layer": layer, "bin_lo": b / HIST_BINS, "bin_hi": (b + 1) / HIST_BINS,
                 "tokens": int(state.top1_hist[i, b])}
            )  # fmt: skip
    return pd.DataFrame(rows)


@dataclass
class Report:
    """Everything ``moescope report`` shows, as DataFrames.

    Attributes:
        summary: the trace's ``summary.json``.
        layers: :func:`layer_stats`.
        capacity: :func:`capacity`.
        expert_parallel: :func:`expert_parallel`.
        coactivation_top: :func:`coactivation_top`.
        domains: :func:`domain_specialisation`.
        confidence: :func:`confidence_histogram`.
        dead: ``{layer: {"dead": [...], "near_dead": [...]}}``.
    """

    summary: dict[str, Any]
    layers: pd.DataFrame
    capacity: pd.DataFrame
    expert_parallel: pd.DataFrame
    coactivation_top: pd.DataFrame
    domains: pd.DataFrame
    confidence: pd.DataFrame
    dead: dict[int, dict[str, list[int]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: one list of records per table, plus model/corpus/token context."""

        def records(df: pd.DataFrame) -> list[dict[str, Any]]:
            out = []
            for rec in df.to_dict(orient="records"):
                out.append(
                    {
                        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                        for k, v in rec.items()
                    }
                )
            return out

        s = self.summary
        return {
            "model": s.get("model"),
            "corpus": s.get("corpus"),
            "tokens": s.get("tokens"),
            "num_experts": s.get("num_experts"),
            "top_k": s.get("top_k"),
            "moe_layers": s.get("moe_layers"),
            "layers": records(self.layers),
            "dead_experts": {str(k): v for k, v in self.dead.items()},
            "capacity": records(self.capacity),
            "expert_parallel": records(self.expert_parallel),
            "coactivation_top": records(self.coactivation_top),
            "domains": records(self.domains),
            "confidence_histogram": records(self.confidence),
        }


def build_report(trace_dir: str | Path, *, dtype_bytes: int | None = None) -> Report:
    """Compute every statistic of a trace directory.

    Args:
        trace_dir: a complete trace directory.
        dtype_bytes: bytes per activation element for the all-to-all estimate (default: traced dtype).

    Returns:
        A :class:`Report`.

    Raises:
        TraceError: the directory is missing or incomplete.
    """
    trace = read_trace_dir(trace_dir)
    state = trace.state
    return Report(
        summary=trace.summary,
        layers=layer_stats(state),
        capacity=capacity(state),
        expert_parallel=expert_parallel(state, dtype_bytes),
        coactivation_top=coactivation_top(state),
        domains=domain_specialisation(state),
        confidence=confidence_histogram(state),
        dead={
            int(layer): {
                "dead": dead_experts(state, layer),
                "near_dead": dead_experts(state, layer, near=True),
            }
            for layer in state.layers
        },
    )
