"""Routing statistics derived from a trace's raw sums (:class:`moescope.tracedir.files.TraceState`).

What: per-layer load imbalance (max/mean, coefficient of variation, normalised entropy),
dead and near-dead experts, router confidence (mean top-1 gate weight, histogram of the
top-1 share), co-activation against chance, consecutive-token reuse against chance,
per-domain specialisation (Jensen-Shannon divergence), and two what-ifs: token dropping
under a capacity factor, and expert-parallel load and all-to-all traffic.
:func:`build_report` bundles them as DataFrames; :meth:`Report.to_dict` is the ``--json``
form of ``moescope report``.

How: everything is computed from the mergeable sums in ``state.npz``, so a merged shard
trace gives the same report as one run. This module imports :mod:`moescope.tracedir.files`
(the tables written into a trace directory, :func:`expert_load` and friends, live there),
:mod:`moescope.stats.nullmodel` (the co-activation null model) and
:mod:`moescope.stats.placement` (the expert-parallel what-if). Definitions, stated where they are computed:

- load share ``p_e = count_e / Σ count``; imbalance ``max/mean``; ``cv = std/mean``
  (population std); ``entropy_norm = H(p) / ln E`` (1 = perfectly even; not comparable
  across expert counts); ``effective_experts = exp(H(p))`` (equally loaded experts with the
  same entropy; ``/ E`` is a share comparable across counts) and ``gini`` (0 = even).
- co-activation significance: under the null a pair's count is Binomial(tokens, π_ab);
  ``p_value`` is its exact upper tail, ``q_value`` the Benjamini-Hochberg adjustment over
  every tested pair (expected ≥ ``MIN_EXPECTED``) of every layer; pairs are ranked by the
  lower confidence bound of their ratio and only ``q ≤ SIGNIFICANCE`` pairs are listed.
- dead: count 0; near-dead: fewer than ``NEAR_DEAD_FRACTION`` × the mean count.
- co-activation ratio: observed pair count / expected, where expected = ``tokens × π_ab``
  under the null model of :mod:`moescope.stats.nullmodel`: each token draws ``k`` *distinct*
  experts at random (successive sampling without replacement, weights fitted so that each
  expert's inclusion probability is its observed ``q_e = count_e / tokens``) and has no
  preference for pairs. Random routing scores 1.0 (the former baseline
  ``tokens × q_a × q_b`` assumed independent choices and scored random routing about 0.57
  for ``k=2, E=8``).
- reuse: share of a token's experts also chosen by the previous token of the same document
  and window; chance is ``Σ q_e² / k`` (independent tokens with the same marginals).
- capacity: per capacity group (GShard's group: ``capacity_group`` consecutive tokens of
  the corpus stream, default 4096, recorded in ``summary.json``; the last group is
  shorter), each expert takes at most ``ceil(C · group tokens · k / E)`` assignments; the
  rest are dropped (counted online during the trace; independent of ``--batch-size`` and
  of sharding). State version 1 traces counted per trace batch (a note says so).
- expert parallelism with degree D: experts split into D groups of E/D (contiguous:
  ``e // (E/D)``; balanced: longest-processing-time greedy on traced loads, E/D experts
  per device). Imbalance = busiest device / mean device load. The balanced placement is
  fitted on one half of the corpus and scored on the other (halves: documents with even /
  odd index), both ways, and ``imbalance`` is the mean of the two held-out scores, so it
  is not optimistic; the contiguous placement is scored on the same two halves (mean), so
  the two compare on the same samples; ``imbalance_in_sample`` fits and scores on the
  whole corpus. Traces without
  halves (state version 1, imported counts) or with an empty half report the in-sample
  value with a note. Traffic assumes tokens are spread evenly over the D devices
  (data-parallel attention), so a token-expert assignment goes to a remote device with
  probability (D−1)/D; each remote assignment moves ``hidden_size × dtype bytes`` for
  dispatch and the same again for combine (×2). The dtype is the checkpoint's (its
  config's ``torch_dtype``, else its expert weights' safetensors dtype; recorded at trace
  time as ``checkpoint_dtype``), not the traced one (float32 on CPU would double the
  bytes); else the traced dtype; ``dtype_bytes`` overrides both. :attr:`Report.a2a` says
  which. The ``dedup`` variant sends a token once per distinct remote device (contiguous
  placement, counted online).
- unavailable statistics: a trace's ``lacks`` (``summary.json``) names data it could not
  record; every statistic that needs it (:data:`NEEDS`) is left out (NaN columns, empty
  tables) and listed in :attr:`Report.unavailable` with the reason, instead of zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moescope.stats.nullmodel import expected_pairs
from moescope.stats.placement import a2a_dtype, expert_parallel
from moescope.tracedir.files import TraceDir, capacity, read_trace_dir
from moescope.tracedir.state import HIST_BINS, TraceState

__all__ = [
    "NEEDS",
    "Report",
    "build_report",
    "coactivation_expected",
    "coactivation_ratio",
    "coactivation_significance",
    "coactivation_top",
    "confidence_histogram",
    "dead_experts",
    "domain_specialisation",
    "imbalance",
    "js_divergence",
    "layer_stats",
    "load_share",
    "mean_pairwise_jsd",
    "unavailable_stats",
]

#: an expert is near-dead below this fraction of the mean load
NEAR_DEAD_FRACTION = 0.1
#: pairs observed fewer times than this are left out of the co-activation ranking
MIN_PAIR_COUNT = 5
#: pairs expected fewer times than this by chance are not tested (a ratio of 5 observed to
#: 0.8 expected is what the largest of 30k chance pairs looks like at E=256, k=8)
MIN_EXPECTED = 5.0
#: false-discovery rate of the co-activation test (Benjamini-Hochberg over every tested pair
#: of every layer); also the one-sided level of the ratio's lower confidence bound
SIGNIFICANCE = 0.05


#: what each statistic needs, as the names a trace's ``lacks`` uses (read generically: a
#: statistic is unavailable when ``lacks`` names its own key or anything it needs)
NEEDS: dict[str, tuple[str, ...]] = {
    "confidence": ("gate_weights", "per_token"),
    "reuse": ("token_order", "per_token"),
    "specialisation": ("domains",),
    "coactivation": ("coactivation", "per_token"),
    "capacity": ("capacity", "per_token"),
    "expert_parallel_dedup": ("per_token", "expert_parallel"),
}
#: per-layer columns (``layer_stats``) of each statistic
_LAYER_COLUMNS = {
    "confidence": ("mean_top1_weight",),
    "reuse": ("reuse_rate", "reuse_chance", "reuse_ratio"),
    "specialisation": ("domain_jsd",),
    "coactivation": ("coact_max_ratio", "coact_significant"),
}


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
        ``{"max_mean": [L], "cv": [L], "entropy_norm": [L], "effective_experts": [L],
        "gini": [L]}``. ``entropy_norm = H / ln E`` is not comparable across expert counts
        (8 evenly busy experts read 1.0 out of 8 but 0.375 out of 256); ``effective_experts = exp(H)`` (as many equally loaded experts
        would give the same entropy; divide by E for a share) and the Gini coefficient are
        count-independent.
    """
    c = np.atleast_2d(counts).astype(np.float64)
    mean = c.mean(axis=-1)
    p = load_share(c)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    n_e = c.shape[-1]
    h = -plogp.sum(axis=-1)
    ent = h / math.log(n_e) if n_e > 1 else np.ones(len(c))
    # Gini of the loads: 0 even, (E-1)/E all on one expert (sorted-rank form of the mean
    # absolute difference)
    ranks = np.arange(1, n_e + 1)
    gini = _safe_div((2 * ranks - n_e - 1) @ np.sort(c, axis=-1).T, n_e * c.sum(axis=-1))
    return {
        "max_mean": _safe_div(c.max(axis=-1), mean),
        "cv": _safe_div(c.std(axis=-1), mean),
        "entropy_norm": np.where(mean > 0, ent, np.nan),
        "effective_experts": np.where(mean > 0, np.exp(h), np.nan),
        "gini": np.where(mean > 0, gini, np.nan),
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
    coact_q = coactivation_significance(state)["q"]
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
                "effective_experts": float(imb["effective_experts"][i]),
                "gini": float(imb["gini"][i]),
                "dead": len(dead_experts(state, layer)),
                "near_dead": len(dead_experts(state, layer, near=True)),
                "mean_top1_weight": float(state.floats("top1")[i] / tokens),
                "reuse_rate": float(reuse_rate[i]),
                "reuse_chance": float(chance[i]),
                "reuse_ratio": float(_safe_div(reuse_rate[i], chance[i])),
                "coact_max_ratio": float(finite.max()) if finite.size else float("nan"),
                "coact_significant": int((coact_q[i] <= SIGNIFICANCE).sum()),
                "domain_jsd": mean_pairwise_jsd(state, i),
                "router_dropped": int(state.router_dropped[i]),
            }
        )
    return pd.DataFrame(rows)


def coactivation_expected(state: TraceState) -> np.ndarray:
    """``[L, E, E]`` pair counts expected by chance (:func:`moescope.stats.nullmodel.expected_pairs`; cached)."""
    key = (state.counts.tobytes(), state.counts.shape, state.top_k)
    if key not in _EXPECTED:
        _EXPECTED.clear()  # one trace at a time: the report, its plots and its summary share it
        _EXPECTED[key] = expected_pairs(state.counts, state.top_k)
    return _EXPECTED[key]


_EXPECTED: dict[Any, np.ndarray] = {}


def coactivation_ratio(state: TraceState) -> np.ndarray:
    """``[L, E, E]`` observed / expected pair counts (NaN below :data:`MIN_PAIR_COUNT`)."""
    ratio = _safe_div(state.coact, coactivation_expected(state))
    upper = np.triu(np.ones((state.num_experts, state.num_experts), dtype=bool), 1)
    return np.where(upper[None] & (state.coact >= MIN_PAIR_COUNT), ratio, np.nan)


def coactivation_significance(state: TraceState) -> dict[str, np.ndarray]:
    """Per pair ``[L, E, E]``: how surprising its count is under the co-activation null model.

    Under the null every token independently includes the pair with probability
    ``π_ab = expected / tokens``, so the count is Binomial(tokens, π_ab). Returned arrays
    (NaN where a pair is not tested: lower triangle, or expected below :data:`MIN_EXPECTED`):

    - ``z``: (observed − expected) / the binomial standard deviation;
    - ``p``: exact upper-tail p-value P(count ≥ observed);
    - ``q``: Benjamini-Hochberg adjusted p-value over every tested pair of every layer
      (significant: ``q ≤`` :data:`SIGNIFICANCE`; under pure chance the chance of any
      significant pair is at most that level);
    - ``ratio_lower``: one-sided ``1 − SIGNIFICANCE`` lower confidence bound on
      observed / expected (exact Poisson bound on the count), the ranking score: a pair
      seen 5 times against 0.8 expected has ratio 6.2 but a bound of 2.4.
    """
    from scipy import stats as sps

    expected = coactivation_expected(state)
    obs = state.coact.astype(np.float64)
    n_e = state.num_experts
    upper = np.triu(np.ones((n_e, n_e), dtype=bool), 1)
    tested = upper[None] & (expected >= MIN_EXPECTED)
    tokens = np.rint(state.counts.sum(axis=1) / max(state.top_k, 1))[:, None, None] * np.ones_like(obs)
    pi = np.clip(_safe_div(expected, tokens), 0.0, 1.0)
    nan = np.full(obs.shape, np.nan)
    z, p, lower = nan.copy(), nan.copy(), nan.copy()
    x, n, pt, e = obs[tested], tokens[tested], pi[tested], expected[tested]
    z[tested] = (x - e) / np.sqrt(np.maximum(e * (1 - pt), 1e-300))
    p[tested] = sps.binom.sf(x - 1, n, pt)
    lower[tested] = np.where(x > 0, sps.chi2.ppf(SIGNIFICANCE, 2 * x) / 2, 0.0) / e
    q = nan.copy()
    pv = p[tested]
    if pv.size:
        order = np.argsort(pv)
        adj = pv[order] * pv.size / np.arange(1, pv.size + 1)
        adj = np.minimum.accumulate(adj[::-1])[::-1]
        out = np.empty_like(pv)
        out[order] = np.minimum(adj, 1.0)
        q[tested] = out
    return {"z": z, "p": p, "q": q, "ratio_lower": lower}


def coactivation_top(state: TraceState, per_layer: int = 5, *, significant_only: bool = True) -> pd.DataFrame:
    """The pairs that fire together most above chance, ``per_layer`` per layer.

    Pairs are ranked by the lower confidence bound of their ratio (see
    :func:`coactivation_significance`), not by the ratio, which small expected counts
    inflate; with ``significant_only`` (the default) only pairs significant after the
    Benjamini-Hochberg correction are kept, so random routing lists none.
    """
    ratio = coactivation_ratio(state)
    expected = coactivation_expected(state)
    sig = coactivation_significance(state)
    rows = []
    for i, layer in enumerate(state.layers):
        keep = np.isfinite(ratio[i]) & np.isfinite(sig["q"][i])
        if significant_only:
            keep &= sig["q"][i] <= SIGNIFICANCE
        a, b = np.nonzero(keep)
        order = np.argsort(-sig["ratio_lower"][i][a, b], kind="stable")[:per_layer]
        for j in order:
            ea, eb = int(a[j]), int(b[j])
            rows.append(
                {
                    "layer": layer,
                    "expert_a": ea,
                    "expert_b": eb,
                    "count": int(state.coact[i, ea, eb]),
                    "expected": float(expected[i, ea, eb]),
                    "ratio": float(ratio[i, ea, eb]),
                    "ratio_lower": float(sig["ratio_lower"][i, ea, eb]),
                    "z": float(sig["z"][i, ea, eb]),
                    "p_value": float(sig["p"][i, ea, eb]),
                    "q_value": float(sig["q"][i, ea, eb]),
                }
            )
    return pd.DataFrame(rows, columns=_PAIR_COLUMNS)


_PAIR_COLUMNS = [
    "layer",
    "expert_a",
    "expert_b",
    "count",
    "expected",
    "ratio",
    "ratio_lower",
    "z",
    "p_value",
    "q_value",
]


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


#: the ``to_dict`` key of each statistic's own table (None where it only has layer columns)
_TABLE_KEYS = {"confidence": "confidence_histogram", "specialisation": "domains",
               "coactivation": "coactivation_top", "capacity": "capacity"}  # fmt: skip


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
        unavailable: statistic (a :data:`NEEDS` key) → why it is left out; its table is
            empty and its per-layer columns NaN (``to_dict``: the table is None).
        notes: statistic → how it was computed when not the current way (older traces).
        a2a: the all-to-all dtype used (:func:`a2a_dtype`).
    """

    summary: dict[str, Any]
    layers: pd.DataFrame
    capacity: pd.DataFrame
    expert_parallel: pd.DataFrame
    coactivation_top: pd.DataFrame
    domains: pd.DataFrame
    confidence: pd.DataFrame
    dead: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    a2a: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: one list of records per table (None when unavailable), plus context."""

        def records(df: pd.DataFrame, stat: str) -> list[dict[str, Any]] | None:
            if stat in self.unavailable:
                return None
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
            "capacity_group": s.get("capacity_group"),
            "a2a_dtype": self.a2a,
            "unavailable": dict(self.unavailable),
            "notes": dict(self.notes),
            "layers": records(self.layers, "layers"),
            "dead_experts": {str(k): v for k, v in self.dead.items()},
            "capacity": records(self.capacity, "capacity"),
            "expert_parallel": records(self.expert_parallel, "expert_parallel"),
            "coactivation_top": records(self.coactivation_top, "coactivation"),
            "domains": records(self.domains, "specialisation"),
            "confidence_histogram": records(self.confidence, "confidence"),
        }


def unavailable_stats(lacks: list[str]) -> dict[str, str]:
    """Statistic → reason, for every statistic whose data a trace ``lacks`` (:data:`NEEDS`)."""
    out = {}
    for stat, needs in NEEDS.items():
        hit = [name for name in (stat, *needs) if name in lacks]
        if hit:
            out[stat] = f"the trace lacks {', '.join(hit)}"
    return out


def _notes(state: TraceState, rep: Report) -> dict[str, str]:
    """How statistics were computed where an older or partial trace forces another way."""
    notes = {}
    if state.version < 2:
        notes["capacity"] = (
            f"state version {state.version}: drops were counted per trace batch, so they depend on "
            "--batch-size; retrace for drops per capacity group"
        )
    if "expert_parallel_dedup" not in rep.unavailable and (state.half_counts.sum(axis=(1, 2)) == 0).any():
        notes["expert_parallel"] = (
            "the balanced placement's imbalance is in-sample (fitted and scored on the same tokens): "
            "the trace has no tokens in one corpus half (older trace, or a single document)"
        )
    if rep.a2a["source"] == "traced":
        notes["a2a_dtype"] = (
            f"all-to-all bytes use the traced dtype {rep.a2a['dtype']}: the checkpoint's dtype was not "
            "recorded; pass --dtype-bytes for the serving dtype"
        )
    return notes


def build_report(trace_dir: str | Path | TraceDir, *, dtype_bytes: int | None = None) -> Report:
    """Compute every statistic of a trace directory; what the trace ``lacks`` is left out.

    Args:
        trace_dir: a complete trace directory (or one already read with :func:`read_trace_dir`).
        dtype_bytes: bytes per activation element for the all-to-all estimate
            (default: the checkpoint's dtype, :func:`a2a_dtype`).

    Returns:
        A :class:`Report` (:attr:`Report.unavailable` lists what was left out, and why).

    Raises:
        TraceError: the directory is missing or incomplete.
    """
    trace = trace_dir if isinstance(trace_dir, TraceDir) else read_trace_dir(trace_dir)
    state = trace.state
    missing = unavailable_stats(trace.lacks)
    layers = layer_stats(state)
    for stat, cols in _LAYER_COLUMNS.items():
        if stat in missing:
            layers[list(cols)] = float("nan")
    ep = expert_parallel(state, dtype_bytes)
    if "expert_parallel_dedup" in missing and not ep.empty:
        ep[["bytes_per_token_dedup", "batch_imbalance"]] = float("nan")
    tables = {
        "capacity": capacity(state),
        "coactivation": coactivation_top(state) if "coactivation" not in missing else None,
        "specialisation": domain_specialisation(state),
        "confidence": confidence_histogram(state),
    }
    for stat, table in tables.items():
        if stat in missing and table is not None:
            tables[stat] = table.iloc[0:0]
    rep = Report(
        summary=trace.summary,
        layers=layers,
        capacity=tables["capacity"],
        expert_parallel=ep,
        coactivation_top=tables["coactivation"] if tables["coactivation"] is not None else _empty_pairs(),
        domains=tables["specialisation"],
        confidence=tables["confidence"],
        dead={
            int(layer): {
                "dead": dead_experts(state, layer),
                "near_dead": dead_experts(state, layer, near=True),
            }
            for layer in state.layers
        },
        unavailable=missing,
        a2a=a2a_dtype(state, dtype_bytes),
    )
    rep.notes = _notes(state, rep)
    return rep


def _empty_pairs() -> pd.DataFrame:
    return pd.DataFrame(columns=_PAIR_COLUMNS)
