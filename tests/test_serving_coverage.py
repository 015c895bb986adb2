"""Batch coverage against a brute-force count; the independence baseline against enumeration;
cross-layer predictability against a recount; trace comparison on itself and a shifted copy."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from moescope.serving import batch_coverage, independent_coverage, load_routes, predictability
from moescope.serving.compare import compare_traces
from tests.serving_fixtures import DOCS, demo_trace  # noqa: F401  (fixture)


def _docs(routes) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Token indices of each document, in order, by a plain loop."""
    docs: dict[int, list[int]] = {}
    for i, d in enumerate(routes.doc.tolist()):
        docs.setdefault(d, []).append(i)
    return list(docs.values())


def test_coverage_equals_brute_force(demo_trace: Path) -> None:  # noqa: F811
    routes = load_routes(demo_trace)
    docs = _docs(routes)
    assert len(docs) == DOCS
    cov = {(c.layer, c.batch): c for c in batch_coverage(routes, batches=(1, 2, 4, 8, 32))}
    for layer in routes.layers:
        ids = routes.layer(layer)
        for b in (1, 2, 4, 8, 32):
            conc = []
            for g in range(len(docs) // b):
                group = docs[g * b : (g + 1) * b]
                for step in range(min(len(d) for d in group)):
                    conc.append(len({int(e) for d in group for e in ids[d[step]]}))
            cons = []
            for d in docs:
                for s in range(0, len(d) - b + 1, b):
                    cons.append(len({int(e) for t in d[s : s + b] for e in ids[t]}))
            c = cov[(layer, b)]
            assert c.concurrent_steps == len(conc)
            assert c.concurrent == (pytest.approx(np.mean(conc)) if conc else None)
            assert c.consecutive == pytest.approx(np.mean(cons))
            q = np.bincount(ids.reshape(-1), minlength=8) / routes.tokens
            assert c.independent == pytest.approx(sum(1 - (1 - qe) ** b for qe in q))
        assert cov[(layer, 1)].concurrent == 2.0  # top-2 of one token: 2 experts
    assert cov[(routes.layers[0], 32)].concurrent is None  # 16 documents only


def test_independence_baseline_by_enumeration() -> None:
    # each token draws one pair of experts with these probabilities, independently
    pairs = {(0, 1): 0.5, (1, 2): 0.3, (0, 2): 0.2}
    q = np.zeros(3)
    for pair, p in pairs.items():
        q[list(pair)] += p
    for b in (1, 2, 3, 4):
        expected = 0.0
        for draw in itertools.product(pairs, repeat=b):
            prob = float(np.prod([pairs[d] for d in draw]))
            expected += prob * len(set(itertools.chain(*draw)))
        assert independent_coverage(q, b) == pytest.approx(expected)


def test_predictability_recount(demo_trace: Path) -> None:  # noqa: F811
    routes = load_routes(demo_trace)
    half = (routes.doc % 2).tolist()
    k = routes.top_k
    res = predictability(routes)
    assert [(r.layer, r.next_layer) for r in res] == list(zip(routes.layers, routes.layers[1:], strict=False))
    for r in res:
        src, dst = routes.layer(r.layer), routes.layer(r.next_layer)
        hits = recall = base1 = basek = 0.0
        for h in (0, 1):
            succ: dict[int, Counter[int]] = {}
            marg: Counter[int] = Counter()
            for t in range(routes.tokens):
                if half[t] != h:
                    succ.setdefault(int(src[t, 0]), Counter()).update(int(e) for e in dst[t])
                    marg.update(int(e) for e in dst[t])
            top = [e for e, _ in sorted(marg.items(), key=lambda x: (-x[1], x[0]))[:k]]
            for t in range(routes.tokens):
                if half[t] == h:
                    c = succ.get(int(src[t, 0]), Counter())
                    pred = [
                        e
                        for e, _ in sorted(((e, c.get(e, 0)) for e in range(8)), key=lambda x: (-x[1], x[0]))[
                            :k
                        ]
                    ]
                    hits += pred[0] == dst[t, 0]
                    recall += len(set(pred) & {int(e) for e in dst[t]}) / k
                    base1 += top[0] == dst[t, 0]
                    basek += len(set(top) & {int(e) for e in dst[t]}) / k
        n = routes.tokens
        assert r.tokens == n
        assert (r.top1_hit, r.topk_recall, r.top1_base, r.topk_base) == pytest.approx(
            (hits / n, recall / n, base1 / n, basek / n)
        )


def test_compare_self_is_zero(demo_trace: Path) -> None:  # noqa: F811
    c = compare_traces(demo_trace, demo_trace)
    assert all(r.load_shift == 0 and r.jsd == pytest.approx(0) and not r.top_rank_changes for r in c.layers)
    assert c.domains and all(r.load_shift == 0 for r in c.domains)
