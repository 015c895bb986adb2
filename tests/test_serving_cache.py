"""Expert-cache policies against hand-computed hits and a brute-force simulator written apart."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from moescope.errors import MoescopeError, TraceError
from moescope.serving import load_routes, routes_from_arrays, simulate_cache
from moescope.serving.cache import (
    belady_hits,
    cache_sizes_for_budget,
    default_cache_sizes,
    lfu_hits,
    lru_hits,
    static_hits,
)
from tests.serving_fixtures import demo_trace  # noqa: F401  (fixture)

SEQ = np.array([0, 1, 2, 0, 1, 3, 0, 1, 2, 3])


def test_hand_made_sequence() -> None:
    # worked out by hand in the order the requests arrive (see the comments of each policy)
    assert lru_hits(SEQ, [1, 2, 3, 4]) == [0, 0, 4, 6]
    assert [belady_hits(SEQ, c) for c in (1, 2, 3, 4)] == [0, 3, 5, 6]
    assert [lfu_hits(SEQ, c) for c in (1, 2, 3)] == [0, 1, 4]


def test_two_experts_per_token() -> None:
    ids = np.array([[0, 1], [0, 2], [1, 2]])
    assert lru_hits(ids, [1, 2]) == [0, 2]
    assert belady_hits(ids, 1) == 0
    assert belady_hits(ids, 2) == 3  # 0 1 | 0 hit, 2 evicts 0 | 1 hit, 2 hit
    assert lru_hits(np.array([[0, -1], [0, -1]]), [1]) == [1]  # empty slots are not requests


def test_static_is_fitted_on_the_other_half() -> None:
    ids = np.array([0, 1, 0, 0, 1, 1])[:, None]
    half = np.array([0, 0, 0, 1, 1, 1])
    assert static_hits(ids, half, 1, 2) == (2, 6)
    assert static_hits(ids, np.zeros(6), 1, 2) == (0, 0)  # nothing to fit on


def _brute(uses: list[int], size: int, policy: str) -> int:
    """One cache, one policy, by the textbook rule (lists; Belady scans the future)."""
    cache: list[int] = []
    freq: Counter[int] = Counter()
    last: dict[int, int] = {}
    hits = 0
    for t, e in enumerate(uses):
        freq[e] += 1
        if e in cache:
            hits += 1
            if policy == "lru":
                cache.remove(e)
                cache.append(e)
        else:
            if len(cache) == size:
                if policy == "lru":
                    cache.pop(0)
                elif policy == "lfu":
                    cache.remove(min(cache, key=lambda r: (freq[r], last[r])))
                else:

                    def nxt(r: int, now: int = t) -> int:
                        return next((u for u in range(now + 1, len(uses)) if uses[u] == r), len(uses))

                    cache.remove(max(cache, key=nxt))
            cache.append(e)
        last[e] = t
    return hits


def test_demo_trace_matches_brute_force(demo_trace: Path) -> None:  # noqa: F811
    routes = load_routes(demo_trace)
    assert routes.tokens > 1000 and routes.num_experts == 8
    results = simulate_cache(routes, sizes=[1, 2, 3, 5, 7])
    by = {(r.layer, r.policy, r.cache_experts): r for r in results}
    for layer in routes.layers:
        uses = [int(e) for e in routes.layer(layer).reshape(-1)]
        for c in (1, 2, 3, 5, 7):
            for policy in ("lru", "lfu", "belady"):
                r = by[(layer, policy, c)]
                assert r.hits == _brute(uses, c, policy), (layer, policy, c)
                assert r.uses == len(uses)
            assert by[(layer, "belady", c)].hits >= by[(layer, "lru", c)].hits
            assert by[(layer, "belady", c)].hits >= by[(layer, "lfu", c)].hits


def test_belady_never_below_lru_on_random_streams() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        e_n = int(rng.integers(3, 12))
        ids = rng.choice(e_n, size=(200, 2), p=rng.dirichlet(np.ones(e_n)))
        ids[ids[:, 0] == ids[:, 1], 1] = -1
        for c, lru in zip(range(1, e_n), lru_hits(ids, range(1, e_n)), strict=True):
            assert belady_hits(ids, c) >= lru


def test_bytes_per_token_and_budget() -> None:
    routes = routes_from_arrays(np.array([[0, 1], [0, 2], [1, 2]]), num_experts=4)
    (r,) = simulate_cache(routes, sizes=[2], policies=["lru"], expert_bytes=100.0)
    assert (r.hits, r.uses, r.tokens) == (2, 6, 3)
    assert r.bytes_per_token == pytest.approx(4 * 100 / 3)  # 4 misses over 3 tokens
    assert cache_sizes_for_budget(1000, 100, 4, 8) == 2
    assert cache_sizes_for_budget(10**9, 100, 4, 8) == 8
    with pytest.raises(MoescopeError, match="--budget"):
        cache_sizes_for_budget(300, 100, 4, 8)
    with pytest.raises(MoescopeError, match="unknown cache policy"):
        simulate_cache(routes, policies=["fifo"])
    assert default_cache_sizes(8, 2) == [1, 2, 3, 4, 5, 6, 7]
    assert default_cache_sizes(256, 8) == [1, 2, 4, 8, 16, 32, 64, 128, 192]


def test_routes_are_required(tmp_path: Path) -> None:
    import moescope

    out = tmp_path / "t"
    moescope.trace("demo", "demo", str(out), max_tokens=600, seq_len=128)
    with pytest.raises(TraceError, match="--save-routes"):
        load_routes(out)
