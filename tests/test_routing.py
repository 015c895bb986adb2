"""Recorded routing equals each family's routing rule recomputed from ``output_router_logits``.

For every MoE family of the registry (``moescope.families``), a tiny random model from
``tests/tiny.py`` (hidden 32, 2 layers, 4 experts, vocab 99, fixed seed) runs once with ``output_router_logits=True`` (baseline)
and once under :class:`moescope.execution.routing.RoutingRecorder`. The test writes each routing rule
the registry names (``Family.routing.rule``) out by hand (softmax-then-top-k, top-k-then-softmax, sigmoid, group-limited
with correction bias, sparsemixer, capacity-limited top-1) and checks the recorded ids and
weights against it; it also checks the norm-capturing experts forward leaves the model's
output unchanged and that the recorded norms equal each routed expert run on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from moescope import families
from moescope.errors import NotMoEError
from moescope.execution import nllb
from moescope.execution.routing import RoutingRecorder, config_top_k, find_moe_sites, require_moe_sites
from tests.tiny import ENCODER_DECODER, tiny_model

_E, _VOCAB = 4, 99

# Variants of tests/tiny.py's configs that reach the routing paths worth checking: the
# tiny deepseek_v3 has 3 layers (layer 1 must be the only MoE one here) and a capacity of
# 5 makes switch drop tokens in test_switch_capacity_drops_are_recorded_as_minus_one.
_VARIANTS: dict[str, dict[str, Any]] = {
    "qwen2_moe": dict(norm_topk_prob=False),
    "qwen3_moe": dict(norm_topk_prob=True),
    "deepseek_v3": dict(num_hidden_layers=2, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=8),
    "switch_transformers": dict(expert_capacity=5),
}


# ----------------------------------------------------------------- routing rules, written out


def _softmax_topk(logits: torch.Tensor, k: int, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    p = logits.float().softmax(-1)
    w, i = p.topk(k, dim=-1)
    return i, (w / w.sum(-1, keepdim=True)) if renorm else w


def _topk_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    v, i = logits.float().topk(k, dim=-1)
    return i, v.softmax(-1)


def _group_limited(
    scores: torch.Tensor, choice: torch.Tensor, k: int, groups: int, keep: int, group_score: str
) -> torch.Tensor:
    """Ids of top-k over ``choice`` restricted to the ``keep`` best groups."""
    t, e = choice.shape
    g = choice.view(t, groups, e // groups)
    gs = g.max(-1).values if group_score == "max" else g.topk(2, dim=-1).values.sum(-1)
    best = gs.topk(keep, dim=-1).indices
    allowed = torch.zeros(t, groups, dtype=torch.bool).scatter(1, best, True)
    allowed = allowed[:, :, None].expand(t, groups, e // groups).reshape(t, e)
    return choice.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices


def _sparsemixer(logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE at inference: argmax, then argmax of the rest; each weight a softmax over the
    logits within a relative ``2*eps`` of that step's maximum."""
    x = logits.float()
    ids, ws = [], []
    for _ in range(2):
        top, idx = x.max(-1, keepdim=True)
        far = (top - x) / x.abs().clamp(min=top) > 2 * eps
        w = x.masked_fill(far, float("-inf")).softmax(-1).gather(1, idx)
        ids.append(idx)
        ws.append(w)
        x = x.scatter(1, idx, float("-inf"))
    return torch.cat(ids, 1), torch.cat(ws, 1)


def expected_routing(
    family: str, model: Any, site: Any, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing rule the registry names for ``family``, applied to one layer's logits ``[T, E]``.

    The rules are written out here, independently of the models' code; the registry only
    says which one a family uses (so a wrong ``Routing.rule`` fails this test).
    """
    cfg = model.config
    record = families.lookup(family)
    assert record is not None, family
    k = config_top_k(cfg)
    assert k is not None
    renorm = record.routing.renormalise
    if record.fields.norm_topk:
        renorm = getattr(cfg, record.fields.norm_topk, renorm)
    rule = record.routing.rule
    if rule == "softmax_topk":
        return _softmax_topk(logits, k, bool(renorm))
    if rule == "softmax_topk_pnorm":
        i, _ = _softmax_topk(logits, k, False)
        w = logits.float().softmax(-1).gather(1, i)
        p = cfg.ffn_config.moe_normalize_expert_weights
        return i, w / w.abs().pow(p).sum(-1, keepdim=True).pow(1 / p)
    if rule == "topk_softmax":
        return _topk_softmax(logits, k)
    if rule == "topk_sigmoid":
        v, i = logits.float().topk(k, dim=-1)
        return i, torch.sigmoid(v)
    if rule == "sparsemixer":
        return _sparsemixer(logits, cfg.router_jitter_noise)
    if rule == "softmax_group_limited":
        s = logits.float().softmax(-1)
        groups = cfg.topk_method == "group_limited_greedy"
        n_group, topk_group = (cfg.n_group, cfg.topk_group) if groups else (1, 1)
        i = _group_limited(s, s, k, n_group, topk_group, "max")
        return i, s.gather(1, i) * cfg.routed_scaling_factor
    if rule == "sigmoid_group_limited":
        s = logits.float().sigmoid()
        bias = site.block.gate.e_score_correction_bias
        i = _group_limited(s, s + bias, k, cfg.n_group, cfg.topk_group, "sum2")
        w = s.gather(1, i)
        if renorm:
            w = w / w.sum(-1, keepdim=True)
        return i, w * cfg.routed_scaling_factor
    if rule == "capacity_top1":
        return _capacity_top1(logits, cfg.num_experts, cfg.expert_capacity)
    if rule == "capacity_top2":
        return capacity_top2(logits, cfg)
    raise KeyError(rule)


def capacity_top2(
    logits: torch.Tensor, cfg: Any, training: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """NLLB-MoE (``second_expert_policy="all"``): logits ``[T, E]`` over the batch's tokens.

    Top-1 of the softmax and the best other expert; tokens take places in order (by their
    top probability, highest first, with ``batch_prioritized_routing``), an expert's top-2
    places coming after all of its top-1 ones; an assignment past the capacity
    (``ceil(moe_eval_capacity_token_fraction * T)`` in eval) is dropped (id -1, weight 0).
    The two gates are p1 / (p1 + p2) and p2 / (p1 + p2), of the kept ones unless
    ``normalize_router_prob_before_dropping``, times ``1 - moe_token_dropout`` in eval.
    """
    import math

    assert cfg.second_expert_policy == "all"
    t, e = logits.shape
    p = logits.float().softmax(-1)
    first = p.argmax(-1).tolist()
    second = [
        max((j for j in range(e) if j != first[i]), key=lambda j: float(logits[i, j])) for i in range(t)
    ]
    frac = cfg.moe_eval_capacity_token_fraction
    cap = math.ceil(frac * t) if not training and frac > 0 else cfg.expert_capacity
    order = list(range(t))
    if cfg.batch_prioritized_routing:
        order.sort(key=lambda i: -float(p[i].max()))
    top1_total = [first.count(j) for j in range(e)]
    seen1, seen2 = [0] * e, [0] * e
    keep = [[False, False] for _ in range(t)]
    for i in order:
        keep[i][0] = seen1[first[i]] < cap
        seen1[first[i]] += 1
        keep[i][1] = top1_total[second[i]] + seen2[second[i]] < cap
        seen2[second[i]] += 1
    ids = torch.full((t, 2), -1, dtype=torch.long)
    w = torch.zeros(t, 2)
    scale = 1.0 if training else 1.0 - cfg.moe_token_dropout
    for i in range(t):
        p1, p2 = float(p[i, first[i]]), float(p[i, second[i]])
        if not cfg.normalize_router_prob_before_dropping:
            p1, p2 = p1 * keep[i][0], p2 * keep[i][1]
        denom = max(p1 + p2, torch.finfo(torch.float32).eps)
        for slot, (j, q) in enumerate(((first[i], p1), (second[i], p2))):
            if keep[i][slot]:
                ids[i, slot], w[i, slot] = j, q / denom * scale
    return ids, w


def _capacity_top1(
    logits: torch.Tensor, num_experts: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch: logits ``[B, S, E]``; top-1 of the softmax; per sequence, an expert takes at
    most ``capacity`` tokens in order, the rest are dropped (id -1, weight 0)."""
    p = logits.float().softmax(-1)
    w, i = p.max(-1)
    ids = i.clone()
    for b in range(ids.shape[0]):
        seen = [0] * num_experts
        for s in range(ids.shape[1]):
            seen[int(i[b, s])] += 1
            if seen[int(i[b, s])] > capacity:
                ids[b, s] = -1
    ids = ids.reshape(-1, 1)
    return ids, torch.where(ids >= 0, w.reshape(-1, 1), torch.zeros_like(w.reshape(-1, 1)))


_expected = expected_routing

#: every transformers family of the registry
FAMILIES = list(families.moe_family_names())


def randomise_router_biases(model: Any) -> None:
    """Non-zero correction biases and router biases, so a plain top-k of the scores is wrong."""
    with torch.no_grad():
        for site in find_moe_sites(model):
            gate = getattr(site.block, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                # a non-zero correction bias, so a plain top-k of the scores would be wrong
                gate.e_score_correction_bias.copy_(torch.randn(site.num_experts) * 0.5)
            router = getattr(site.block, "router", None)
            if router is not None and getattr(router, "bias", None) is not None:
                router.bias.copy_(torch.randn_like(router.bias))


def _build(family: str, **overrides: Any) -> Any:
    torch.manual_seed(0)
    model = tiny_model(family, **{**_VARIANTS.get(family, {}), **overrides})
    record = families.lookup(family)
    if record is not None and record.experts_implementation:
        model.set_experts_implementation("eager")
    if family == "nllb_moe":
        nllb.install(model)  # as load_model runs it: the router's dispatch
    randomise_router_biases(model)
    return model


def _sort_pairs(ids: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each token's (id, weight) pairs by id: some routers return top-k unsorted."""
    order = ids.argsort(-1)
    return ids.gather(1, order), w.gather(1, order)


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_routing_matches_family_rule(family: str) -> None:
    model = _build(family)
    sites = find_moe_sites(model)
    assert sites, family
    torch.manual_seed(1)
    input_ids = torch.randint(0, _VOCAB, (2, 9))
    kwargs: dict[str, Any] = {}
    if family in ENCODER_DECODER:
        kwargs["decoder_input_ids"] = input_ids
    with torch.no_grad():
        base = model(input_ids=input_ids, output_router_logits=True, **kwargs)
        with RoutingRecorder(sites) as rec:
            hooked = model(input_ids=input_ids, **kwargs)
            records = rec.records
        after = model(input_ids=input_ids, **kwargs)
    # the norm-capturing forward must not change what the model computes, and detaching
    # must restore the model's own forward
    torch.testing.assert_close(hooked.logits, base.logits, atol=1e-5, rtol=1e-5)
    if any(s.kind == "fused" for s in sites):
        # the fused families' replacement sums each expert's contribution in eager's order
        assert torch.equal(hooked.logits, base.logits), family
    torch.testing.assert_close(after.logits, base.logits, atol=0, rtol=0)
    assert all("forward" not in s.experts.__dict__ for s in sites)

    if family in ENCODER_DECODER:
        enc = [s for s in sites if s.stack == "encoder"]
        dec = [s for s in sites if s.stack == "decoder"]
        logits = [x for x in base.encoder_router_logits] + [x for x in base.decoder_router_logits]
        ordered = enc + dec
    else:
        logits = list(base.router_logits)
        ordered = sites
    assert len(logits) == len(ordered)
    for site, lg in zip(ordered, logits, strict=True):
        rec_ = records[sites.index(site)]
        assert rec_ is not None
        exp_ids, exp_w = _expected(family, model, site, lg)
        got_ids, got_w = rec_.ids, rec_.weights.float()
        assert got_ids.shape == exp_ids.shape == (input_ids.numel(), config_top_k(model.config))
        got_ids, got_w = _sort_pairs(got_ids, got_w)
        exp_ids, exp_w = _sort_pairs(exp_ids, exp_w)
        assert torch.equal(got_ids, exp_ids), f"{family} layer {site.layer}"
        torch.testing.assert_close(got_w, exp_w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "family", ["mixtral", "deepseek_v3", "gpt_oss", "dbrx", "llama4", "switch_transformers", "nllb_moe"]
)
def test_recorded_norms_equal_each_expert_run_alone(family: str) -> None:
    """Norms come from the routed experts' outputs; recompute each one independently."""
    model = _build(family)
    sites = [s for s in find_moe_sites(model) if s.stack != "decoder"]
    site = sites[-1]
    inputs: list[torch.Tensor] = []
    handle = site.block.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    input_ids = torch.randint(0, _VOCAB, (2, 9))
    kwargs = {"decoder_input_ids": input_ids} if family in ENCODER_DECODER else {}
    with torch.no_grad(), RoutingRecorder(sites) as rec:
        model(input_ids=input_ids, **kwargs)
        record = rec.records[sites.index(site)]
    handle.remove()
    x = inputs[0].reshape(-1, inputs[0].shape[-1])
    run = _single_expert_runner(family, site)
    assert record is not None and record.norms is not None
    for t in range(x.shape[0]):
        for j in range(record.ids.shape[1]):
            e = int(record.ids[t, j])
            if e < 0:
                assert float(record.norms[t, j]) == 0.0
                continue
            w = record.weights[t, j]
            y = run(x[t : t + 1], e, w)
            torch.testing.assert_close(record.norms[t, j], y.norm(), atol=1e-5, rtol=1e-5)
            expect_weighted = y.norm() if family == "llama4" else y.norm() * w.abs()
            torch.testing.assert_close(record.weighted_norms[t, j], expect_weighted, atol=1e-5, rtol=1e-5)


def _single_expert_runner(
    family: str, site: Any
) -> Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]:
    """Expert ``e`` applied to one token, from the raw weights (llama4: to ``w * x``)."""
    ex = site.experts
    if family in ENCODER_DECODER:
        return lambda x, e, w: ex[f"expert_{e}"](x)[0]
    if family == "dbrx":
        shape = (-1, ex.ffn_hidden_size, ex.hidden_size)

        def dbrx(x: torch.Tensor, e: int, w: torch.Tensor) -> torch.Tensor:
            w1, v1, w2 = (p.view(shape)[e] for p in (ex.mlp.w1, ex.mlp.v1, ex.mlp.w2))
            return ((ex.mlp.activation_fn(x @ w1.T) * (x @ v1.T)) @ w2)[0]

        return dbrx
    if family == "llama4":

        def llama4(x: torch.Tensor, e: int, w: torch.Tensor) -> torch.Tensor:
            gate, up = (w * x @ ex.gate_up_proj[e]).chunk(2, dim=-1)
            return ((up * ex.act_fn(gate)) @ ex.down_proj[e])[0]

        return llama4
    if family == "gpt_oss":

        def gpt_oss(x: torch.Tensor, e: int, w: torch.Tensor) -> torch.Tensor:
            h = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
            gate, up = h[..., ::2].clamp(max=ex.limit), h[..., 1::2].clamp(-ex.limit, ex.limit)
            g = (up + 1) * gate * torch.sigmoid(gate * ex.alpha)
            return (g @ ex.down_proj[e] + ex.down_proj_bias[e])[0]

        return gpt_oss

    def fused(x: torch.Tensor, e: int, w: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(ex.act_fn(gate) * up, ex.down_proj[e])[0]

    return fused


def test_switch_capacity_drops_are_recorded_as_minus_one() -> None:
    model = _build("switch_transformers")
    sites = [s for s in find_moe_sites(model) if s.stack == "encoder"]
    input_ids = torch.randint(0, _VOCAB, (1, 40))  # 40 tokens, 4 experts of capacity 5: drops certain
    with torch.no_grad(), RoutingRecorder(sites) as rec:
        model(input_ids=input_ids, decoder_input_ids=input_ids[:, :2])
        record = rec.records[0]
    assert record is not None
    ids = record.ids
    assert int((ids < 0).sum()) >= 40 - 4 * 5
    assert all(int((ids == e).sum()) <= 5 for e in range(_E))


def test_layer_index_is_the_checkpoints() -> None:
    model = _build("deepseek_v3")  # first_k_dense_replace=1: only layer 1 is MoE
    assert [s.layer for s in find_moe_sites(model)] == [1]
    assert find_moe_sites(model)[0].name == "model.layers.1.mlp"


def test_dense_model_is_not_moe() -> None:
    torch.manual_seed(0)
    model = tiny_model("llama")
    assert find_moe_sites(model) == []
    with pytest.raises(NotMoEError, match="no routed experts.*demo"):
        require_moe_sites(model, "tiny-llama")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_recorder_forward_is_eager_bit_for_bit(family: str, dtype: torch.dtype) -> None:
    """The norm-capturing experts forward (bf16: gather-add-scatter instead of index_add_) equals eager exactly."""
    model = _build(family).to(dtype)
    model.set_experts_implementation("eager")
    ids = torch.randint(0, _VOCAB, (3, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with RoutingRecorder(find_moe_sites(model)):
            hooked = model(input_ids=ids).logits
    assert torch.equal(hooked, base), family


@pytest.mark.parametrize(
    "variant",
    [
        {},
        dict(normalize_router_prob_before_dropping=True),
        dict(batch_prioritized_routing=True),
        dict(moe_eval_capacity_token_fraction=1.0, moe_token_dropout=0.0),
        dict(moe_eval_capacity_token_fraction=0.0, expert_capacity=3),  # the training capacity
    ],
    ids=["drops", "normalise-first", "prioritised", "no-drops", "fixed-capacity"],
)
def test_nllb_records_what_the_dispatch_applies(variant: dict[str, Any]) -> None:
    """Ids and weights equal the capacity rule on the router's logits, and the block's output
    is exactly the recorded experts' outputs times the recorded weights."""
    model = _build("nllb_moe", **variant)
    sites = find_moe_sites(model)
    site = [s for s in sites if s.stack == "encoder"][-1]
    logits: list[torch.Tensor] = []
    handle = site.block.router.register_forward_hook(lambda m, a, out: logits.append(out[2].detach().clone()))
    torch.manual_seed(2)
    x = torch.randn(2, 9, model.config.d_model)
    with torch.no_grad(), RoutingRecorder([site]) as rec:
        y = site.block(x)
        record = rec.records[0]
    handle.remove()
    assert record is not None and record.norms is not None
    exp_ids, exp_w = capacity_top2(logits[0], model.config)
    assert torch.equal(record.ids, exp_ids)
    torch.testing.assert_close(record.weights.float(), exp_w, atol=1e-6, rtol=1e-6)
    if variant.get("moe_eval_capacity_token_fraction", 0.3) == 0.3 or "expert_capacity" in variant:
        assert bool((record.ids < 0).any()), "the capacity should drop assignments here"
    flat = x.reshape(-1, x.shape[-1])
    want = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for slot in range(2):
            e = int(record.ids[t, slot])
            if e >= 0:
                out = site.experts[f"expert_{e}"](flat[t : t + 1])[0]
                want[t] += out * record.weights[t, slot]
                torch.testing.assert_close(record.norms[t, slot], out.norm(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.reshape(-1, y.shape[-1]), want, atol=1e-5, rtol=1e-5)


def test_nllb_random_second_expert_is_recorded_as_drawn() -> None:
    """second_expert_policy="random" draws in eval too: the record is that forward's own draw."""
    model = _build("nllb_moe", second_expert_policy="random", moe_eval_capacity_token_fraction=1.0)
    site = find_moe_sites(model)[0]
    x = torch.randn(1, 40, model.config.d_model)
    with torch.no_grad(), RoutingRecorder([site]) as rec:
        y = site.block(x)
        record = rec.records[0]
    assert record is not None
    assert bool((record.ids[:, 0] >= 0).all()) and bool((record.ids[:, 1] < 0).any())
    flat = x[0]
    want = torch.stack(
        [
            sum(
                (
                    site.experts[f"expert_{int(e)}"](flat[t : t + 1])[0] * w
                    for e, w in zip(record.ids[t], record.weights[t], strict=True)
                    if e >= 0
                ),
                torch.zeros(flat.shape[-1]),
            )
            for t in range(flat.shape[0])
        ]
    )
    torch.testing.assert_close(y[0], want, atol=1e-5, rtol=1e-5)


def test_transformers_own_nllb_experts_loop_is_why_moescope_dispatches() -> None:
    """transformers 5.x's NllbMoeSparseMLP runs only expert_0 and expert_1 (it one-hots the
    one-hot top-1 mask); where it computes the router's dispatch, moescope's equals it."""
    torch.manual_seed(0)
    model = tiny_model("nllb_moe", moe_token_dropout=0.0)  # transformers' own forward
    block = find_moe_sites(model)[0].block
    ran: set[int] = set()
    for e in range(block.num_experts):
        block.experts[f"expert_{e}"].register_forward_hook(lambda m, a, o, e=e: ran.add(e))
    x = torch.randn(1, 24, model.config.d_model)
    with torch.no_grad():
        stock = block(x)
        stock_ran = set(ran)
        ours = nllb.dispatch_forward()(block, x)
    assert stock_ran <= {0, 1} or torch.allclose(stock, ours, atol=1e-6)
    assert ran == set(range(block.num_experts))  # the dispatch runs the experts routed to


def test_an_experts_subclass_with_its_own_forward_keeps_it() -> None:
    """ergo's experts subclass the decorated class and override forward (a per-expert norm per
    route): the recorder must not swap the eager loop in (the output, and so every later
    layer's routing, would change); ids and weights still come, output norms do not."""
    model = _build("mixtral")
    sites = find_moe_sites(model)
    base_cls = type(sites[0].experts)

    class OwnForward(base_cls):  # type: ignore[misc, valid-type]
        def forward(self, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
            return 2 * super().forward(hidden_states, top_k_index, top_k_weights)

    for s in sites:
        s.experts.__class__ = OwnForward
    ids = torch.randint(0, _VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with RoutingRecorder(sites) as rec:
            hooked = model(input_ids=ids).logits
            records = rec.records
    assert torch.equal(hooked, base)
    assert all(r is not None and r.norms is None and r.ids.shape == (18, 2) for r in records)


def test_longcat_zero_expert_routes_are_not_counted_as_experts() -> None:
    """longcat_flash hands zero-expert routes to the experts as real ids with weight 0 (spread over
    the experts); the recorder counts what the router chose: its ids below E, nothing else."""
    from collections import Counter

    from tests import census

    torch.manual_seed(0)
    model = census.build("longcat_flash")
    sites = find_moe_sites(model)
    num = sites[0].num_experts
    chosen: Counter[tuple[int, int]] = Counter()
    zero_routes = [0]

    def router_hook(layer: int) -> Any:
        def hook(_m: Any, _args: Any, output: Any) -> None:
            ids = output[2]
            zero_routes[0] += int((ids >= num).sum())
            chosen.update((layer, int(e)) for e in ids.reshape(-1).tolist() if e < num)

        return hook

    for site in sites:
        site.block.router.register_forward_hook(router_hook(site.layer))
    ids = torch.randint(3, 100, (2, 24))
    got: Counter[tuple[int, int]] = Counter()
    with torch.inference_mode(), RoutingRecorder(sites) as rec:
        model(input_ids=ids)
        for site, r in zip(sites, rec.records, strict=True):
            assert r is not None
            got.update((site.layer, int(e)) for e in r.ids.reshape(-1).tolist() if e >= 0)
    assert zero_routes[0] > 0  # the tiny model does route to zero experts
    assert got == chosen
