"""Co-activation significance (#20): under random routing no pair is listed as above chance,
a planted pair is, and rankings use a lower confidence bound rather than the raw ratio."""

from __future__ import annotations

import numpy as np
import pytest

from moescope.stats import report as st
from moescope.tracing import TraceState


def _routed(ids: np.ndarray, n_e: int) -> TraceState:
    """A one-layer state that saw the routing ``ids`` ``[tokens, k]``."""
    n, k = ids.shape
    s = TraceState(layers=[0], num_experts=n_e, top_k=k, meta={"model": "synthetic"})
    s.tokens = n
    s.counts[0] = np.bincount(ids.reshape(-1), minlength=n_e)
    srt = np.sort(ids, axis=1)
    a, b = np.triu_indices(k, 1)
    flat = srt[:, a].reshape(-1) * n_e + srt[:, b].reshape(-1)
    s.coact[0] = np.bincount(flat, minlength=n_e * n_e).reshape(n_e, n_e)
    return s


def _random_ids(rng: np.random.Generator, n: int, n_e: int, k: int, skew: float) -> np.ndarray:
    """Top-k of a per-expert bias plus Gumbel noise: k distinct experts, no pair preference."""
    keys = rng.normal(0, skew, size=n_e) + rng.gumbel(size=(n, n_e))
    return np.argpartition(-keys, k, axis=1)[:, :k]


@pytest.mark.parametrize("skew", [0.0, 1.0], ids=["uniform", "skewed"])
def test_random_routing_lists_no_pair(skew: float) -> None:
    """E=256, k=8, 20k tokens: the raw max ratio reads ~2 (uniform) to ~6 (skewed), but no
    pair is significant after the correction in at least 95% of seeds."""
    seeds, clean, max_ratio = 20, 0, []
    for seed in range(seeds):
        s = _routed(_random_ids(np.random.default_rng(seed), 20_000, 256, 8, skew), 256)
        clean += st.coactivation_top(s).empty
        row = st.layer_stats(s).iloc[0]
        max_ratio.append(row.coact_max_ratio)
        assert row.coact_significant == len(st.coactivation_top(s, per_layer=10**6))
    assert clean >= 0.95 * seeds
    assert max(max_ratio) > 1.5  # the raw ratio alone would have "found" pairs


def test_planted_pair_is_significant_and_first() -> None:
    rng = np.random.default_rng(3)
    ids = _random_ids(rng, 20_000, 64, 4, 0.5)
    planted = rng.random(len(ids)) < 0.02
    ids[planted, :2] = [7, 40]  # 2% of tokens take 7 and 40 together
    ids[planted, 2:] = np.where(np.isin(ids[planted, 2:], [7, 40]), [1, 2], ids[planted, 2:])
    s = _routed(ids, 64)
    top = st.coactivation_top(s)
    assert not top.empty
    first = top.iloc[0]
    assert (first.expert_a, first.expert_b) == (7, 40)
    assert first.q_value < 1e-6 and first.z > 5 and 1 < first.ratio_lower < first.ratio


def test_significance_ranks_by_the_lower_bound() -> None:
    """A pair 5 times against 0.8 expected is not tested (expected < MIN_EXPECTED); between two
    tested pairs, the better-supported one ranks first even with a smaller ratio."""
    s = TraceState(layers=[0], num_experts=4, top_k=2, meta={"model": "synthetic"})
    s.tokens = 10_000
    s.counts[0] = [5000, 5000, 5000, 5000]
    # expected per pair: 10000 / 6 = 1666.7; (0,1) ratio 1.2 on 2000 tokens vs (2,3) ratio 1.2 too
    s.coact[0] = np.array([[0, 2100, 1450, 1450], [0, 0, 1450, 1000], [0, 0, 0, 2550], [0, 0, 0, 0]])
    sig = st.coactivation_significance(s)
    assert np.isnan(sig["p"][0, 1, 0])  # lower triangle: not tested
    top = st.coactivation_top(s, significant_only=False)
    assert list(zip(top.expert_a, top.expert_b, strict=True))[:2] == [(2, 3), (0, 1)]
    assert (top.ratio_lower <= top.ratio).all()


def test_effective_experts_and_gini_are_count_independent() -> None:
    """Eight evenly loaded experts: normalised entropy 1.0 of 8 but 0.375 of 256; effective
    experts 8 either way, and the Gini coefficient says how concentrated the rest is."""
    small = st.imbalance(np.full(8, 100.0))
    big = st.imbalance(np.r_[np.full(8, 100.0), np.zeros(248)])
    assert small["entropy_norm"][0] == pytest.approx(1.0) and big["entropy_norm"][0] == pytest.approx(0.375)
    assert small["effective_experts"][0] == pytest.approx(8) == big["effective_experts"][0]
    assert small["gini"][0] == pytest.approx(0.0) and big["gini"][0] == pytest.approx(248 / 256)
