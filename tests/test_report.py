"""Report statistics against hand-computed definitions, on synthetic trace states (no model).

Each test builds a :class:`moescope.trace.TraceState` with known sums, writes it as a
trace directory and checks :mod:`moescope.stats` and ``moescope report`` against the
definitions computed directly here.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moescope import stats as st
from moescope.cli.app import app
from moescope.trace import CAPACITY_FACTORS, EP_DEGREES, TraceState, write_trace_dir

_E = 8


def _state(seed: int = 0, tokens: int = 1000) -> TraceState:
    rng = np.random.default_rng(seed)
    s = TraceState(layers=[1, 2], num_experts=_E, top_k=2, meta={"model": "synthetic", "hidden_size": 64,
                                                                   "dtype": "bfloat16"})  # fmt: skip
    s.tokens = tokens
    # layer 1: skewed with a dead and a near-dead expert; layer 2: even
    s.counts[0] = [700, 500, 400, 300, 50, 40, 10, 0]
    s.counts[1] = [250] * _E
    s.weight_fx[:] = (s.counts * 0.5 * 2**20).astype(np.int64)
    s.top1_fx[:] = int(0.7 * tokens * 2**20)
    s.coact[0, 0, 1] = 400
    s.coact[0, 2, 3] = 10
    s.coact[1, 0, 1] = 60
    s.reuse[:] = [900, 300]
    s.reuse_pairs[:] = [900, 900]
    s.cap_dropped[:] = [[300, 200, 100, 0], [0, 0, 0, 0]]
    s.ep_distinct[:] = rng.integers(1000, 2000, size=(2, len(EP_DEGREES)))
    s.ep_batch_max[:] = rng.integers(500, 1000, size=(2, len(EP_DEGREES)))
    a = s.domain_index("code")
    b = s.domain_index("prose")
    s.dom_counts[a, 0] = [600, 100, 0, 0, 0, 0, 0, 0]
    s.dom_counts[b, 0] = [100, 400, 400, 300, 50, 40, 10, 0]
    s.dom_counts[a, 1] = [125] * _E
    s.dom_counts[b, 1] = [125] * _E
    return s


@pytest.fixture()
def trace_dir(tmp_path: Path) -> Path:
    out = tmp_path / "t"
    s = _state()
    write_trace_dir(out, s, timings={"trace_seconds": 1.0}, plots=False)
    return out


def test_imbalance_definitions() -> None:
    c = np.array([700, 500, 400, 300, 50, 40, 10, 0], dtype=float)
    got = st.imbalance(c)
    mean = c.mean()
    p = c / c.sum()
    ent = -sum(x * math.log(x) for x in p if x > 0) / math.log(len(c))
    assert got["max_mean"][0] == pytest.approx(c.max() / mean)
    assert got["cv"][0] == pytest.approx(math.sqrt(((c - mean) ** 2).mean()) / mean)
    assert got["entropy_norm"][0] == pytest.approx(ent)
    even = st.imbalance(np.full(8, 5.0))
    assert (
        even["max_mean"][0] == 1.0 and even["cv"][0] == 0.0 and even["entropy_norm"][0] == pytest.approx(1.0)
    )


def test_dead_and_near_dead() -> None:
    s = _state()
    assert st.dead_experts(s, 1) == [7]
    mean = s.counts[0].mean()  # 250: near-dead below 25
    assert (
        st.dead_experts(s, 1, near=True) == [e for e in range(_E) if 0 < s.counts[0, e] < 0.1 * mean] == [6]
    )
    assert st.dead_experts(s, 2) == [] and st.dead_experts(s, 2, near=True) == []


def test_js_divergence_bounds() -> None:
    p = np.array([1.0, 0, 0, 0])
    q = np.array([0, 1.0, 0, 0])
    assert st.js_divergence(p, p) == pytest.approx(0.0)
    assert st.js_divergence(p, q) == pytest.approx(1.0)
    r = np.array([0.5, 0.5, 0, 0])
    m = (p + r) / 2
    kl = lambda a, b: sum(x * math.log2(x / y) for x, y in zip(a, b, strict=True) if x > 0)  # noqa: E731
    assert st.js_divergence(p, r) == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(r, m))


def test_layer_stats_reuse_coactivation_domains() -> None:
    s = _state()
    df = st.layer_stats(s).set_index("layer")
    q = s.counts[0] / s.tokens
    chance = (q**2).sum() / 2
    assert df.loc[1, "reuse_rate"] == pytest.approx(900 / (900 * 2))
    assert df.loc[1, "reuse_chance"] == pytest.approx(chance)
    assert df.loc[1, "reuse_ratio"] == pytest.approx(0.5 / chance)
    assert df.loc[1, "mean_top1_weight"] == pytest.approx(0.7, rel=1e-6)
    # pair (0, 1) in layer 1: 400 observed, 1000 * 0.7 * 0.5 expected
    assert df.loc[1, "coact_max_ratio"] == pytest.approx(400 / (1000 * 0.7 * 0.5))
    top = st.coactivation_top(s)
    first = top[top.layer == 1].iloc[0]
    assert (first.expert_a, first.expert_b) == (0, 1)
    # layer 2: both domains identical -> JSD 0; layer 1: they differ
    assert df.loc[2, "domain_jsd"] == pytest.approx(0.0)
    assert df.loc[1, "domain_jsd"] > 0.2
    dom = st.domain_specialisation(s)
    assert set(dom["domain"]) == {"code", "prose"}
    code1 = dom[(dom.domain == "code") & (dom.layer == 1)].iloc[0]
    assert code1.top_expert == 0 and code1.top_expert_share == pytest.approx(600 / 700)


def test_capacity_table() -> None:
    s = _state()
    cap = st.capacity(s)
    row = cap[(cap.layer == 1) & (cap.capacity_factor == 1.0)].iloc[0]
    assert row.dropped_share == pytest.approx(300 / s.counts[0].sum())
    assert sorted(cap.capacity_factor.unique()) == list(CAPACITY_FACTORS)


def test_balanced_placement_is_optimal_on_small_cases() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        load = rng.integers(1, 100, size=8).astype(float)
        dev = st.balanced_placement(load, 2)
        assert np.bincount(dev).tolist() == [4, 4]
        got = np.bincount(dev, weights=load).max()
        best = min(
            max(load[list(c)].sum(), load.sum() - load[list(c)].sum())
            for c in itertools.combinations(range(8), 4)
        )
        assert got <= best * 4 / 3 + 1e-9  # LPT's bound; usually equal
        contiguous = load.reshape(2, 4).sum(1).max()
        assert got <= contiguous


def test_expert_parallel_bytes_and_imbalance() -> None:
    s = _state()
    ep = st.expert_parallel(s)
    row = ep[(ep.layer == 1) & (ep.degree == 4) & (ep.placement == "contiguous")].iloc[0]
    # bf16 (2 bytes), hidden 64, k=2: k * 3/4 * 64 * 2 * 2 (dispatch + combine)
    assert row.bytes_per_token == pytest.approx(2 * 0.75 * 64 * 2 * 2)
    j = EP_DEGREES.index(4)
    assert row.bytes_per_token_dedup == pytest.approx(s.ep_distinct[0, j] / 1000 * 0.75 * 64 * 2 * 2)
    dev = s.counts[0].reshape(4, 2).sum(1)
    assert row.imbalance == pytest.approx(dev.max() / dev.mean())
    bal = ep[(ep.layer == 1) & (ep.degree == 4) & (ep.placement == "balanced")].iloc[0]
    assert bal.imbalance <= row.imbalance
    even = ep[(ep.layer == 2) & (ep.placement == "contiguous")]
    assert np.allclose(even.imbalance, 1.0)


def test_report_cli_json_and_table(trace_dir: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(trace_dir), "--json"], catch_exceptions=False)
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert data["model"] == "synthetic" and data["moe_layers"] == [1, 2]
    assert {
        "layers",
        "capacity",
        "expert_parallel",
        "coactivation_top",
        "domains",
        "confidence_histogram",
    } <= set(data)
    assert data["dead_experts"]["1"] == {"dead": [7], "near_dead": [6]}
    res = runner.invoke(app, ["report", str(trace_dir)], catch_exceptions=False)
    assert res.exit_code == 0
    for text in ("max/mean", "C=1.25", "EP=8", "Domain specialisation"):
        assert text in res.stdout
    assert runner.invoke(app, ["report", str(trace_dir), "--dtype-bytes", "0"]).exit_code == 2


def test_plots_are_written(tmp_path: Path) -> None:
    from moescope.plots import write_plots

    paths = write_plots(_state(), tmp_path / "plots")
    names = {p.name for p in paths}
    assert names == {
        "load_bars.png",
        "load_heatmap.png",
        "coactivation.png",
        "domain_heatmap.png",
        "capacity.png",
    }
    assert all(p.stat().st_size > 5000 for p in paths)


def test_help_has_examples() -> None:
    runner = CliRunner()
    for cmd in ("trace", "report", "merge"):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "Examples" in res.stdout, cmd
