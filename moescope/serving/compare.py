"""Compare two traces of the same model shape: load shift, JSD and rank changes per layer.

What: :func:`compare_traces` reads two trace directories (a model before and after
fine-tuning or pruning, or one model on two corpora) and gives, per MoE layer:

- ``load_shift``: total-variation distance between the two load distributions,
  ``0.5 * sum_e |p_e - q_e|`` (the share of assignments that would have to move);
- ``jsd``: Jensen-Shannon divergence in bits (:func:`moescope.stats.report.js_divergence`), also per
  domain the two traces share (``domains``);
- the experts whose load rank changed most (rank 0 = busiest; ties to the lower id).

How: from each trace's ``expert_load`` counts and ``domain_load`` (``state.npz``); routes are
not needed. Traces of different expert counts or MoE layers are refused: after pruning,
experts are renumbered, so compare a pruned model's trace only with its own kind.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import TraceError

__all__ = ["Comparison", "LayerShift", "compare_traces"]


@dataclass(frozen=True)
class LayerShift:
    """One layer (and domain, or ``None`` for all tokens) of :func:`compare_traces`."""

    layer: int
    domain: str | None
    load_shift: float
    jsd: float
    top_rank_changes: list[dict[str, int]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """Two traces compared: ``layers`` (all tokens) and ``domains`` (per shared domain)."""

    a: str
    b: str
    layers: list[LayerShift]
    domains: list[LayerShift]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready object."""
        return {
            "a": self.a,
            "b": self.b,
            "layers": [r.to_dict() for r in self.layers],
            "domains": [r.to_dict() for r in self.domains],
        }


def _ranks(counts: np.ndarray) -> np.ndarray:
    order = np.argsort(-counts, kind="stable")
    ranks = np.empty_like(order)
    ranks[order] = np.arange(order.size)
    return ranks


def _shift(layer: int, domain: str | None, p: np.ndarray, q: np.ndarray, top: int) -> LayerShift:
    from moescope.stats.report import js_divergence

    p = p.astype(np.float64)
    q = q.astype(np.float64)
    if p.sum() == 0 or q.sum() == 0:
        return LayerShift(layer, domain, float("nan"), float("nan"), [])
    ra, rb = _ranks(p), _ranks(q)
    delta = rb - ra
    moved = np.argsort(-np.abs(delta), kind="stable")[:top]
    changes = [
        {"expert": int(e), "rank_a": int(ra[e]), "rank_b": int(rb[e]), "change": int(delta[e])}
        for e in moved
        if delta[e] != 0
    ]
    tv = 0.5 * float(np.abs(p / p.sum() - q / q.sum()).sum())
    return LayerShift(layer, domain, tv, js_divergence(p, q), changes)


def compare_traces(a: str | Path, b: str | Path, top: int = 3) -> Comparison:
    """Per-layer load shift, JSD (overall and per shared domain) and biggest rank changes.

    Args:
        a: the first trace directory (the reference).
        b: the second.
        top: rank changes kept per layer.

    Raises:
        TraceError: either is not a trace, or the two differ in MoE layers or expert count.
    """
    from moescope.tracedir.files import read_trace_dir

    ta, tb = read_trace_dir(a), read_trace_dir(b)
    if ta.layers != tb.layers or ta.num_experts != tb.num_experts:
        raise TraceError(
            f"{tb.path}: {tb.num_experts} experts on layers {tb.layers}, but {ta.path} has {ta.num_experts} on "
            f"{ta.layers}; compare traces of the same model shape."
        )
    sa, sb = ta.state, tb.state
    layers = [
        _shift(layer, None, sa.counts[sa.layers.index(layer)], sb.counts[sb.layers.index(layer)], top)
        for layer in ta.layers
    ]
    domains = []
    for name in [d for d in sa.domains if d in sb.domains]:
        da, db = sa.domains.index(name), sb.domains.index(name)
        for layer in ta.layers:
            pa = sa.dom_counts[da, sa.layers.index(layer)]
            pb = sb.dom_counts[db, sb.layers.index(layer)]
            domains.append(_shift(layer, name, pa, pb, top))
    return Comparison(str(ta.path), str(tb.path), layers, domains)
