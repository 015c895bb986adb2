"""Report statistics against hand-computed definitions, on synthetic trace states (no model).

Each test builds a :class:`moescope.tracing.TraceState` with known sums, writes it as a
trace directory and checks :mod:`moescope.stats.report` and ``moescope report`` against the
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

from moescope.cli.app import app
from moescope.errors import TraceError
from moescope.stats import nullmodel, placement
from moescope.stats import report as st
from moescope.tracedir.state import OPEN_ARRAYS
from moescope.tracing import CAPACITY_FACTORS, EP_DEGREES, TraceState, merge_traces, write_trace_dir

_E = 8


def _successive_sampling(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Inclusion and pair-inclusion probabilities of k draws without replacement, by enumeration."""
    n_e = len(w)
    pi, pij = np.zeros(n_e), np.zeros((n_e, n_e))
    for seq in itertools.permutations(range(n_e), k):
        p, rest = 1.0, w.sum()
        for e in seq:
            p *= w[e] / rest
            rest -= w[e]
        pi[list(seq)] += p
        for a, b in itertools.combinations(sorted(seq), 2):
            pij[a, b] += p
    return pi, pij


def _routed(ids: np.ndarray, n_e: int, layers: int = 1) -> TraceState:
    """A state whose every layer saw the routing ``ids`` ``[tokens, k]``."""
    n, k = ids.shape
    s = TraceState(layers=list(range(layers)), num_experts=n_e, top_k=k, meta={"model": "synthetic"})
    s.tokens = n
    counts = np.bincount(ids.reshape(-1), minlength=n_e)
    coact = np.zeros((n_e, n_e), dtype=np.int64)
    for i, j in itertools.combinations(range(k), 2):
        np.add.at(coact, (np.minimum(ids[:, i], ids[:, j]), np.maximum(ids[:, i], ids[:, j])), 1)
    s.counts[:] = counts
    s.coact[:] = coact
    return s


def _random_routing(rng: np.random.Generator, n: int, n_e: int, k: int, skew: float) -> np.ndarray:
    """Top-k of per-expert bias + Gumbel noise: k distinct experts, marginals set by the bias."""
    keys = rng.normal(0, skew, size=n_e) + rng.gumbel(size=(n, n_e))
    return np.argsort(-keys, axis=1)[:, :k]


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
    # pair (0, 1) in layer 1: 400 observed; expected under successive sampling (brute force)
    q = s.counts[0] / s.tokens
    w = nullmodel.fit_weights(q, 2)[0]
    pi, pij = _successive_sampling(w, 2)
    assert np.allclose(pi, q, atol=1e-8)
    assert df.loc[1, "coact_max_ratio"] == pytest.approx(400 / (1000 * pij[0, 1]), rel=1e-6)
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
        dev = placement.balanced_placement(load, 2)
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
    from moescope.stats.plots import write_plots

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


def test_null_model_matches_enumeration() -> None:
    rng = np.random.default_rng(7)
    for n_e, k in ((6, 2), (7, 3), (8, 4)):
        w = np.exp(rng.normal(0, 2, size=n_e))
        w /= w.sum()
        pi, pij = _successive_sampling(w, k)
        assert np.allclose(nullmodel.inclusion(w, k)[0], pi, atol=1e-10)
        assert np.allclose(nullmodel.pair_inclusion(w, k)[0], pij, atol=1e-10)
        assert np.allclose(nullmodel.fit_weights(pi, k)[0], w, rtol=1e-6)  # the fit recovers the weights


@pytest.mark.parametrize(
    ("n_e", "k", "skew"), [(8, 2, 0.0), (8, 2, 1.0), (16, 4, 0.0), (16, 4, 1.0), (32, 6, 0.7)]
)
def test_random_routing_scores_one(n_e: int, k: int, skew: float) -> None:
    rng = np.random.default_rng(n_e * 10 + k)
    s = _routed(_random_routing(rng, 100_000, n_e, k, skew), n_e)
    ratio = st.coactivation_ratio(s)[0]
    expected = st.coactivation_expected(s)[0]
    solid = np.isfinite(ratio) & (expected >= 1500)  # sampling noise of the count below ~2.6%
    assert solid.sum() >= 10
    assert np.abs(ratio[solid] - 1).max() < 0.05, ratio[solid]
    assert np.allclose(expected.sum(), s.tokens * k * (k - 1) / 2)  # every token has C(k,2) pairs
    if (
        skew == 0.0
    ):  # the independent-choices baseline scored uniform random routing (E-1)/E·k/(k-1)... below 1
        q = s.counts[0] / s.tokens
        old = s.coact[0][solid] / (s.tokens * np.outer(q, q)[solid])
        assert old.mean() < 0.9


def test_planted_pair_scores_above_one() -> None:
    rng = np.random.default_rng(3)
    ids = _random_routing(rng, 50_000, 8, 2, 0.5)
    planted = rng.random(len(ids)) < 0.1
    ids[planted] = [2, 5]  # a tenth of the tokens always take experts 2 and 5 together
    s = _routed(ids, 8)
    ratio = st.coactivation_ratio(s)[0]
    assert ratio[2, 5] > 1.5
    others = (
        np.isfinite(ratio) & ~np.isin(np.arange(8), [2, 5])[:, None] & ~np.isin(np.arange(8), [2, 5])[None]
    )
    # the planted pair's extra tokens crowd the others a little above 1, far below the pair
    assert ratio[2, 5] > ratio[others].max() + 0.5
    top = st.coactivation_top(s)
    assert (top.iloc[0].expert_a, top.iloc[0].expert_b) == (2, 5)


def test_balanced_placement_held_out_is_not_optimistic() -> None:
    rng = np.random.default_rng(11)
    n_e, k, layers = 16, 2, 12
    s = TraceState(layers=list(range(layers)), num_experts=n_e, top_k=k, meta={"model": "synthetic"})
    for li in range(layers):
        p = rng.dirichlet(np.full(n_e, 5.0))
        for h in (0, 1):
            s.half_counts[h, li] = rng.multinomial(4000, p)
    s.counts[:] = s.half_counts.sum(axis=0)
    s.tokens = int(s.counts[0].sum()) // k
    ep = st.expert_parallel(s)
    bal = ep[ep.placement == "balanced"]
    assert (bal.imbalance >= bal.imbalance_in_sample - 1e-12).mean() >= 0.9
    assert bal.imbalance.mean() > bal.imbalance_in_sample.mean()
    # recompute one row: fit on a half, score on the other, both ways
    row = bal[(bal.layer == 3) & (bal.degree == 4)].iloc[0]
    a, b = s.half_counts[:, 3].astype(float)
    scores = []
    for fit, score in ((a, b), (b, a)):
        dev = np.bincount(placement.balanced_placement(fit, 4), weights=score, minlength=4)
        scores.append(dev.max() / dev.mean())
    assert row.imbalance == pytest.approx(np.mean(scores))
    # contiguous is scored on the same held-out halves (#20): at EP = E both placements put one
    # expert on each device and must read the same; before, contiguous read the whole trace
    cont = ep[(ep.placement == "contiguous")]
    row = cont[(cont.layer == 3) & (cont.degree == 4)].iloc[0]
    halves = [h.reshape(4, -1).sum(axis=1) for h in (a, b)]
    assert row.imbalance == pytest.approx(np.mean([d.max() / d.mean() for d in halves]))
    s8 = TraceState(layers=list(range(layers)), num_experts=8, top_k=k, meta={"model": "synthetic"})
    for li in range(layers):
        p = rng.dirichlet(np.full(8, 5.0))
        s8.half_counts[:, li] = [rng.multinomial(4000, p) for _ in range(2)]
    s8.counts[:] = s8.half_counts.sum(axis=0)
    s8.tokens = int(s8.counts[0].sum()) // k
    ep8 = st.expert_parallel(s8)
    full = ep8[ep8.degree == 8].set_index(["layer", "placement"]).unstack()
    assert np.allclose(full["imbalance"]["contiguous"], full["imbalance"]["balanced"])
    assert not np.allclose(full["imbalance"]["contiguous"], full["imbalance_in_sample"]["contiguous"])


def test_a2a_bytes_use_the_checkpoint_dtype(tmp_path: Path) -> None:
    s = _state()
    s.meta.update(dtype="float32", checkpoint_dtype="bfloat16")
    ep = st.expert_parallel(s)
    assert ep.bytes_per_token.iloc[0] == pytest.approx(2 * 0.5 * 64 * 2 * 2)  # EP=2, k=2, bf16
    assert st.a2a_dtype(s) == {"dtype": "bfloat16", "bytes": 2, "source": "checkpoint"}
    assert st.expert_parallel(s, 1).bytes_per_token.iloc[0] == pytest.approx(2 * 0.5 * 64 * 1 * 2)
    s.meta.pop("checkpoint_dtype")  # an older trace: the traced dtype, with a note
    write_trace_dir(tmp_path / "t", s, timings={"trace_seconds": 1.0}, plots=False)
    rep = st.build_report(tmp_path / "t")
    assert rep.a2a == {"dtype": "float32", "bytes": 4, "source": "traced"} and "a2a_dtype" in rep.notes
    assert rep.to_dict()["a2a_dtype"]["source"] == "traced"


def test_report_leaves_out_what_the_trace_lacks(tmp_path: Path) -> None:
    out = tmp_path / "t"
    write_trace_dir(out, _state(), timings={"trace_seconds": 1.0}, plots=False)
    full = st.build_report(out)
    assert full.unavailable == {} and len(full.confidence) and len(full.coactivation_top)
    summary = json.loads((out / "summary.json").read_text())
    summary["lacks"] = ["gate_weights", "token_order", "domains", "per_token"]
    (out / "summary.json").write_text(json.dumps(summary))
    rep = st.build_report(out)
    assert set(rep.unavailable) == set(st.NEEDS)
    assert "gate_weights" in rep.unavailable["confidence"]
    cols = ["mean_top1_weight", "reuse_rate", "reuse_ratio", "domain_jsd", "coact_max_ratio"]
    assert rep.layers[cols].isna().all().all()
    assert rep.capacity.empty and rep.coactivation_top.empty and rep.domains.empty and rep.confidence.empty
    assert rep.expert_parallel.bytes_per_token_dedup.isna().all()
    assert rep.expert_parallel.imbalance.notna().all()  # loads are known: EP load stays
    data = rep.to_dict()
    assert data["capacity"] is None and data["confidence_histogram"] is None and data["domains"] is None
    assert data["unavailable"] == rep.unavailable
    assert all(r["reuse_ratio"] is None for r in data["layers"])
    # a counts-only import may name the statistic itself
    summary["lacks"] = ["coactivation"]
    (out / "summary.json").write_text(json.dumps(summary))
    rep = st.build_report(out)
    assert set(rep.unavailable) == {"coactivation"} and rep.layers.coact_max_ratio.isna().all()
    res = CliRunner().invoke(app, ["report", str(out), "--json"], catch_exceptions=False)
    assert res.exit_code == 0 and json.loads(res.stdout)["coactivation_top"] is None


def test_old_state_version_still_reports(tmp_path: Path) -> None:
    out = tmp_path / "t"
    write_trace_dir(out, _state(), timings={"trace_seconds": 1.0}, plots=False)
    # rewrite state.npz as version 1 wrote it: no half counts, no open groups, no capacity group
    with np.load(out / "state.npz") as data:
        arrays = {k: data[k] for k in data.files if k not in ("half_counts", *OPEN_ARRAYS, "header")}
        header = json.loads(str(data["header"]))
    header["version"] = 1
    header.pop("capacity_group")
    np.savez_compressed(out / "state.npz", header=np.array(json.dumps(header)), **arrays)
    rep = st.build_report(out)
    assert "capacity" in rep.notes and "expert_parallel" in rep.notes
    assert rep.capacity.dropped.iloc[0] == 300  # the per-batch counts, as recorded
    bal = rep.expert_parallel[rep.expert_parallel.placement == "balanced"]
    assert np.allclose(bal.imbalance, bal.imbalance_in_sample)  # no halves: in-sample, with the note
    assert CliRunner().invoke(app, ["report", str(out)]).exit_code == 0
    shard = TraceState.load(out / "state.npz")
    shard.meta["shard"] = {"index": 0, "count": 2}
    new = _state()
    new.meta["shard"] = {"index": 1, "count": 2}
    write_trace_dir(tmp_path / "a", shard, timings={}, plots=False)
    write_trace_dir(tmp_path / "b", new, timings={}, plots=False)
    with pytest.raises(TraceError, match="state versions 1 and 2"):
        merge_traces([tmp_path / "a", tmp_path / "b"], tmp_path / "m", plots=False)
