"""Cross-layer predictability: how well a token's experts at one MoE layer predict the next's.

What: for each pair of consecutive MoE layers ``(l, l')``, :func:`predictability` predicts a
token's experts at ``l'`` from its top-1 expert at ``l``: the prediction is the ``k`` experts
most often chosen at ``l'`` by tokens whose top-1 at ``l`` was the same expert (the "most
frequent successors", the table a prefetching offloader keeps). Scores:

- ``top1_hit``: share of tokens whose top-1 at ``l'`` is the single most frequent successor;
- ``topk_recall``: mean share of a token's ``k`` experts at ``l'`` among the ``k`` predicted
  (what a prefetch of ``k`` experts would have loaded correctly);
- ``top1_base`` / ``topk_base``: the same scores predicting the ``l'`` experts most used
  overall, ignoring layer ``l`` (what the prediction gains over marginal frequency).

How: successor counts are fitted on one half of the documents (document parity) and scored
on the other, both ways (every token scored out of sample); ties go to the lower expert id.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moescope.serving.routes import Routes

__all__ = ["Predictability", "predictability"]


@dataclass(frozen=True)
class Predictability:
    """One layer pair of :func:`predictability`; ``--json`` keys = field names."""

    layer: int
    next_layer: int
    top1_hit: float
    topk_recall: float
    top1_base: float
    topk_base: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        return asdict(self)


def _scores(
    src: np.ndarray, dst: np.ndarray, fit: np.ndarray, score: np.ndarray, e_n: int, k: int
) -> tuple[float, float, float, float, int]:
    """Summed (top1 hits, recall, base top1 hits, base recall, tokens) over the scored tokens."""
    a, b = src[fit, 0].astype(np.int64), dst[fit].astype(np.int64)
    keep = (a >= 0)[:, None] & (b >= 0)
    rows = np.repeat(a, b.shape[1]).reshape(b.shape)
    trans = np.bincount((rows * e_n + b)[keep], minlength=e_n * e_n).reshape(e_n, e_n)
    marg = np.bincount(b[b >= 0], minlength=e_n)
    pred = np.argsort(-trans, axis=1, kind="stable")[:, :k]  # [E, k] successors per top-1 expert
    base = np.argsort(-marg, kind="stable")[:k]
    sa, sb = src[score, 0].astype(np.int64), dst[score].astype(np.int64)
    ok = sa >= 0
    sa, sb = sa[ok], sb[ok]
    p = pred[sa]  # [n, k]
    top1 = float((p[:, 0] == sb[:, 0]).sum())
    recall = float((sb[:, :, None] == p[:, None, :]).any(axis=2).sum(axis=1).sum() / k)
    b_top1 = float((base[0] == sb[:, 0]).sum())
    b_recall = float(np.isin(sb, base).sum() / k)
    return top1, recall, b_top1, b_recall, int(sa.size)


def predictability(routes: Routes) -> list[Predictability]:
    """Top-1 hit and top-k recall of the most-frequent-successor prediction, per layer pair.

    Args:
        routes: a trace's routes (:func:`moescope.serving.load_routes`).

    Returns:
        One :class:`Predictability` per consecutive pair of MoE layers (none for one layer).
        Scores are NaN when the trace has documents in only one half.
    """
    half = routes.half()
    k = routes.top_k
    out = []
    for layer, nxt in zip(routes.layers, routes.layers[1:], strict=False):
        src, dst = routes.layer(layer), routes.layer(nxt)
        tot = np.zeros(5)
        for h in (0, 1):
            fit, score = half != h, half == h
            if not fit.any() or not score.any():
                tot[:] = np.nan
                break
            tot += np.array(_scores(src, dst, fit, score, routes.num_experts, k))
        n = tot[4]
        div = n if n and np.isfinite(n) else np.nan
        t1, tk, b1, bk = (float(v) for v in tot[:4] / div)
        out.append(Predictability(layer, nxt, t1, tk, b1, bk, int(n) if n == n else 0))
    return out
