"""Tests for moescope.evaluation.override, moescope.evaluation.sweep and `moescope sweep`.

Independent checks: the native setting's perplexity equals :func:`moescope.evaluation.perplexity.evaluate`'s
exactly; overridden selections equal the family's rule recomputed token by token in plain
Python from the router logits of the same run (``output_router_logits``), for mixtral
(softmax -> top-k -> renormalise), qwen3_moe (``norm_topk_prob`` off) and deepseek_v3
(sigmoid + correction bias, group-limited, scaling); with k equal to the native top-k the
override returns exactly what each family's own router returns; experts per token equals
the mean of the selections a :class:`RoutingRecorder` saw; FLOPs of a k override agree with
``FlopCounterMode``; streamed and in-memory sweeps agree; bad settings are usage errors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moescope import families
from moescope.accounting.params import count_params
from moescope.checkpoint.ref import Checkpoint
from moescope.evaluation.override import LayerRule, RoutingOverride, RoutingSettingError, _pad, select
from moescope.evaluation.perplexity import evaluate
from moescope.evaluation.sweep import _Accounting, parse_settings, sweep
from moescope.execution.routing import RoutingRecorder, config_top_k, find_moe_sites
from tests.safety import assert_clean_error, invoke
from tests.tiny import tiny_model

_VOCAB = 99
_FAST = dict(max_tokens=240, seq_len=64, stride=32, batch_size=4)

#: the three rules the issue names, with variants that reach their interesting paths
_RULE_MODELS: dict[str, dict[str, Any]] = {
    "mixtral": {},
    "qwen3_moe": dict(norm_topk_prob=False),
    "deepseek_v3": dict(
        num_hidden_layers=2,
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=8,
    ),
}

#: families whose routing the override implements
SUPPORTED = [
    f.name
    for f in families.all_families()
    if f.config_class is not None and f.routing.rule not in ("sparsemixer", "capacity_top1", "capacity_top2")
]


def _build(family: str, **overrides: Any) -> Any:
    """A tiny model with eager experts, random router biases and peaked routers (a random
    tiny router is near uniform: every token would take the same number of experts)."""
    torch.manual_seed(0)
    model = tiny_model(family, **overrides)
    if families.lookup(family).experts_implementation:  # type: ignore[union-attr]
        model.set_experts_implementation("eager")
    with torch.no_grad():
        for site in find_moe_sites(model):
            for name, param in site.block.named_parameters():
                if name in ("gate.weight", "router.weight", "router.layer.weight"):
                    param.mul_(10)
            gate = getattr(site.block, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(torch.randn(site.num_experts) * 0.3)
            router = getattr(site.block, "router", None)
            if router is not None and getattr(router, "bias", None) is not None:
                router.bias.copy_(torch.randn_like(router.bias))
    return model


def _usage(text: str) -> str:
    """Click's usage-error box as one line of words (the box wraps long messages)."""
    for ch in "│╭╮╰╯─":
        text = text.replace(ch, " ")
    return " ".join(text.split()).lower()


def _ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, _VOCAB, (2, 11))


# --------------------------------------------------------------------------- the rules, by hand


def _expected(
    family: str, model: Any, site: Any, logits: torch.Tensor, rule: LayerRule
) -> list[dict[int, float]]:
    """Per token, expert -> weight, by the family's rule written out in plain Python."""
    cfg = model.config
    out: list[dict[int, float]] = []
    for row in logits.float().tolist():
        e = len(row)
        if family == "deepseek_v3":
            s = [1 / (1 + math.exp(-x)) for x in row]
            bias = site.block.gate.e_score_correction_bias.tolist()
            choice = [a + b for a, b in zip(s, bias, strict=True)]
            size = e // cfg.n_group
            gscore = [sum(sorted(choice[g * size : (g + 1) * size])[-2:]) for g in range(cfg.n_group)]
            kept = sorted(range(cfg.n_group), key=lambda g: -gscore[g])[: cfg.topk_group]
            cand = [j for j in range(e) if j // size in kept]
            gate = s
        else:
            m = max(row)
            ex = [math.exp(x - m) for x in row]
            gate = [x / sum(ex) for x in ex]
            choice, cand = gate, list(range(e))
        order = sorted(cand, key=lambda j: -choice[j])
        if rule.top_k is not None:
            chosen = order[: rule.top_k]
        else:
            total = sum(gate[j] for j in cand)
            chosen, before = [], 0.0
            for j in order:
                if rule.top_p < 1 and before >= rule.top_p:
                    break
                chosen.append(j)
                before += gate[j] / total
        w = {j: gate[j] for j in chosen}
        renorm = family == "mixtral" or getattr(cfg, "norm_topk_prob", False)
        if renorm:
            w = {j: v / sum(w.values()) for j, v in w.items()}
        scale = getattr(cfg, "routed_scaling_factor", 1.0) if family == "deepseek_v3" else 1.0
        out.append({j: v * scale for j, v in w.items()})
    return out


def _observed(rec: Any, num_experts: int) -> list[dict[int, float]]:
    return [
        {int(i): float(w) for i, w in zip(ids, ws, strict=True) if 0 <= i < num_experts}
        for ids, ws in zip(rec.ids.tolist(), rec.weights.float().tolist(), strict=True)
    ]


@pytest.mark.parametrize("family", list(_RULE_MODELS))
@pytest.mark.parametrize(
    "rule",
    [
        LayerRule(top_k=1),
        LayerRule(top_k=3),
        LayerRule(top_p=0.3),
        LayerRule(top_p=0.6),
        LayerRule(top_p=0.9),
    ],
)
def test_override_selects_what_the_rule_says(family: str, rule: LayerRule) -> None:
    model = _build(family, **_RULE_MODELS[family])
    sites = find_moe_sites(model)
    ids = _ids()
    with torch.no_grad():
        native = model(input_ids=ids, output_router_logits=True)
        with (
            RoutingOverride(sites, {s.layer: rule for s in sites}) as ov,
            RoutingRecorder(sites, record_norms=False) as rec,
        ):
            out = model(input_ids=ids, output_router_logits=True)
            records = rec.records
    if rule.top_k is not None:  # k = 1 or 3, native 2: the override changed the computation
        assert not torch.equal(out.logits, native.logits)
    for site, logits, got in zip(sites, out.router_logits, records, strict=True):
        assert got is not None
        want = _expected(family, model, site, logits, rule)
        seen = _observed(got, site.num_experts)
        assert [sorted(t) for t in seen] == [sorted(t) for t in want], (family, site.layer)
        for a, b in zip(seen, want, strict=True):
            for j in a:
                assert a[j] == pytest.approx(b[j], rel=1e-5, abs=1e-6)
        if rule.top_p in (0.6, 0.9):  # dynamic: tokens take different numbers of experts
            assert len({len(t) for t in seen}) > 1, (family, rule)
        # experts per token = the mean of the selections the experts received
        mean = sum(len(t) for t in seen) / len(seen)
        assert ov.counts[site.layer].mean == pytest.approx(mean)
        assert ov.counts[site.layer].tokens == ids.numel()
    # the native routing is back: same logits, no instance attributes left
    with torch.no_grad():
        again = model(input_ids=ids)
    assert torch.equal(again.logits, native.logits)
    assert all("forward" not in vars(s.block.gate) for s in sites)


@pytest.mark.parametrize("family", list(_RULE_MODELS))
def test_top_p_bounds(family: str) -> None:
    """p = 1 takes every expert a token may choose; a tiny p exactly one."""
    model = _build(family, **_RULE_MODELS[family])
    sites = find_moe_sites(model)
    cfg = model.config
    allowed = cfg.topk_group * (8 // cfg.n_group) if family == "deepseek_v3" else sites[0].num_experts
    for p, want in ((1.0, allowed), (1e-6, 1)):
        with torch.no_grad(), RoutingOverride(sites, {s.layer: LayerRule(top_p=p) for s in sites}) as ov:
            model(input_ids=_ids())
        assert {c.mean for c in ov.counts.values()} == {float(want)}, (family, p)


@pytest.mark.parametrize("family", SUPPORTED)
def test_native_k_override_equals_the_familys_router(family: str) -> None:
    """With k = the native top-k, the override reproduces the model bit for bit."""
    model = _build(family)
    sites = find_moe_sites(model)
    k = config_top_k(model.config)
    assert k is not None
    ids = _ids()
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with RoutingOverride(sites, {s.layer: LayerRule(top_k=k) for s in sites}):
            same = model(input_ids=ids).logits
        with RoutingOverride(sites, {s.layer: LayerRule(top_p=0.7) for s in sites}) as ov:
            dyn = model(input_ids=ids).logits
    assert torch.equal(same, base), family
    assert torch.isfinite(dyn).all()
    assert all(1 <= c.mean <= s.num_experts for s, c in zip(sites, ov.counts.values(), strict=True))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "dbrx"])
def test_padding_adds_nothing(family: str) -> None:
    """Padded slots (id E, or a repeated id where the experts cannot skip E) contribute zero."""
    model = _build(family)
    site = find_moe_sites(model)[0]
    torch.manual_seed(2)
    h = torch.randn(
        6, model.config.get_text_config().hidden_size if family != "dbrx" else model.config.d_model
    )
    choice = torch.randn(6, site.num_experts)
    ids, valid = select(choice, choice.softmax(-1), LayerRule(top_p=0.8))
    w = torch.rand(ids.shape)
    from moescope.evaluation.override import _sentinel_ok

    pid, pw = _pad(ids, w, valid, site.num_experts, _sentinel_ok(site))
    with torch.no_grad():
        batched = site.experts(h, pid, pw)
        alone = torch.cat(
            [
                site.experts(
                    h[t : t + 1], ids[t : t + 1, : int(valid[t].sum())], w[t : t + 1, : int(valid[t].sum())]
                )
                for t in range(6)
            ]
        )
    torch.testing.assert_close(batched.reshape(alone.shape), alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_padding_under_every_experts_implementation(family: str) -> None:
    """grouped_mm and batched_mm (told to mask id E) compute what the eager loop does."""
    model = _build(family)
    sites = find_moe_sites(model)
    rules = {s.layer: LayerRule(top_p=0.8) for s in sites}
    out = {}
    for impl in ("eager", "grouped_mm", "batched_mm"):
        model.set_experts_implementation(impl)
        with torch.no_grad(), RoutingOverride(sites, rules) as ov:
            out[impl] = model(input_ids=_ids()).logits
        assert 1 < ov.counts[sites[0].layer].mean < sites[0].num_experts
    assert not any(s.experts._is_expert_parallel for s in sites)  # restored
    for impl in ("grouped_mm", "batched_mm"):
        torch.testing.assert_close(out[impl], out["eager"], atol=1e-5, rtol=1e-5)


def test_group_limited_k_beyond_the_kept_groups_is_refused() -> None:
    model = _build("deepseek_v3", **_RULE_MODELS["deepseek_v3"])
    sites = find_moe_sites(model)
    with pytest.raises(RoutingSettingError, match="at most 4"):
        RoutingOverride(sites, {s.layer: LayerRule(top_k=5) for s in sites})


# --------------------------------------------------------------------------- settings


def test_parse_settings() -> None:
    names = [s.name for s in parse_settings("1,2,4", "0.5;0-1:0.5,2-:0.9")]
    assert names == ["k=1", "k=2", "k=4", "p=0.5", "p=0-1:0.5,2-:0.9"]
    per = parse_settings(["0-1:1,2-:2"])[0]
    assert per.rules([0, 1, 2, 3], 2) == {0: LayerRule(1), 1: LayerRule(1), 2: LayerRule(2), 3: LayerRule(2)}
    assert parse_settings(["1:1"])[0].rules([0, 1, 2], 2)[0] == LayerRule(top_k=2)  # unnamed: native
    for bad in ("0", "x", "0-1:1,1-2:2", "3-1:2", "1,0-1:2"):
        with pytest.raises(RoutingSettingError):
            parse_settings(bad)
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(RoutingSettingError):
            parse_settings(None, bad)


# --------------------------------------------------------------------------- the sweep


@pytest.fixture(scope="module")
def demo_sweep() -> Any:
    return sweep("demo", ["demo"], top_k="1,2", top_p="0.5", **_FAST)


def test_native_reproduces_eval(demo_sweep: Any) -> None:
    ev = evaluate("demo", ["demo"], **_FAST)
    nat = demo_sweep.records[0]
    assert nat.native and nat.setting == "native"
    assert nat.perplexity == ev.perplexity and nat.tokens == ev.tokens
    assert nat.domains == {d: r.perplexity for d, r in ev.domains.items()}
    # k=2 is the native setting: measured once
    assert [r.setting for r in demo_sweep.records] == ["native", "k=1", "p=0.5"]


def test_accounting_matches_params(demo_sweep: Any) -> None:
    report = count_params("demo")
    nat, k1, p = demo_sweep.records
    assert (nat.active_params, nat.flops_per_token) == (report.active_params, report.flops_per_token)
    assert nat.active_params_no_embedding == report.active_params_no_embedding
    routed = report.components["routed_experts"]
    # k=1 leaves out another 1/8 of every layer's routed experts
    assert nat.active_params - k1.active_params == pytest.approx(routed / 8, abs=4)
    assert k1.experts_per_token == 1.0 and k1.perplexity > nat.perplexity
    assert 1.0 < p.experts_per_token < 8.0 and isinstance(p.top_p, float)
    assert p.experts_per_token == pytest.approx(
        sum(p.experts_per_token_by_layer.values()) / len(p.experts_per_token_by_layer)
    )
    frame = demo_sweep.to_frame()
    assert list(frame["setting"]) == ["native", "k=1", "p=0.5"]
    assert json.loads(json.dumps(demo_sweep.to_dict()))["records"][0]["native"] is True


def test_streamed_sweep_equals_in_memory(demo_sweep: Any) -> None:
    streamed = sweep("demo", ["demo"], top_k="1,2", top_p="0.5", stream=True, **_FAST)
    assert streamed.execution == "stream"
    for a, b in zip(streamed.records, demo_sweep.records, strict=True):
        assert a.setting == b.setting
        assert a.perplexity == pytest.approx(b.perplexity, rel=1e-6)
        assert a.experts_per_token_by_layer == pytest.approx(b.experts_per_token_by_layer, rel=1e-6)


def test_flops_of_a_k_override_match_flop_counter() -> None:
    """FLOPs at k=1 and k=3 (accounting with k replaced) against FlopCounterMode, as test_flops does."""
    seq = 24
    model = _build("mixtral", attn_implementation="eager", num_local_experts=4)
    sites = find_moe_sites(model)
    acc, _spec = _Accounting.of(Checkpoint("tiny", "config", model.config.to_dict()), context=seq)
    ids = torch.randint(0, _VOCAB, (1, seq))
    for k in (1, 3):
        with torch.no_grad(), RoutingOverride(sites, {s.layer: LayerRule(top_k=k) for s in sites}):
            with FlopCounterMode(display=False) as fc:
                model(ids)
        predicted = acc.at({s.layer: float(k) for s in sites})[2] * seq
        counted = fc.get_total_flops()
        assert abs(predicted - counted) / counted < 0.02, (k, predicted, counted)


# --------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_json_records_and_plot(tmp_path: Path) -> None:
    plot = tmp_path / "sweep.png"
    args = [
        "sweep",
        "demo",
        "demo",
        "--top-k",
        "1",
        "--top-p",
        "0.9",
        "--max-tokens",
        "120",
        "--seq-len",
        "64",
    ]
    result = invoke([*args, "--json", "--plot", plot], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    keys = {
        "setting",
        "top_k",
        "top_p",
        "experts_per_token",
        "active_params",
        "flops_per_token",
        "perplexity",
        "domains",
    }
    assert all(keys <= set(r) for r in records)
    assert [r["setting"] for r in records] == ["native", "k=1", "p=0.9"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = invoke([*args, "--csv", "--plot", plot], catch_exceptions=False)  # its own plot: replaced
    assert again.exit_code == 0 and again.stdout.splitlines()[0].startswith("setting,top_k,top_p")
    foreign = tmp_path / "mine.png"
    foreign.write_bytes(b"not moescope's")
    assert_clean_error(invoke([*args, "--plot", foreign]), 1, contains="not written by moescope")
    assert foreign.read_bytes() == b"not moescope's"


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--top-k", "9"], "between 1 and the 8 experts"),
        (["--top-k", "0"], "at least 1"),
        (["--top-p", "1.5"], "(0, 1]"),
        (["--top-p", "0"], "(0, 1]"),
        (["--top-k", "6-9:1"], "no moe layer"),
        (["--top-k", "0-1:1,1-3:2"], "overlap"),
        (["--top-k", "a"], "not a whole number"),
    ],
)
def test_cli_refuses_bad_settings(flags: list[str], says: str) -> None:
    result = invoke(["sweep", "demo", "demo", *flags, "--max-tokens", "100"])
    text = assert_clean_error(result, 2)
    assert says.lower() in _usage(text), text


def test_cli_refuses_phimoe(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny_model("phimoe").save_pretrained(tmp_path / "phimoe")
    text = assert_clean_error(invoke(["sweep", tmp_path / "phimoe", "demo", "--top-k", "1"]), 2)
    assert "always takes 2 experts" in _usage(text), text
