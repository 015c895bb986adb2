"""Run-time routing overrides: how many experts each token takes, changed per MoE layer.

What: :class:`RoutingOverride` is a context manager that replaces, in every MoE layer of a
loaded or streamed model, the family's routing step by one that takes either a fixed
number of experts ``k`` (``top_k``) or, dynamically, as many as needed for their
cumulative gate probability to reach ``p`` (``top_p``); on exit the model's own routing
is back. While it is attached it counts, per layer, the tokens routed and the experts
they actually took (:attr:`RoutingOverride.counts`). :func:`check_layer_rule` says
whether a setting makes sense for a layer before any model is loaded.

How: each family's rule (``Family.routing.rule`` in :mod:`moescope.families`) is written
out once here, from the router module's own parameters and attributes
(``norm_topk_prob``, ``routed_scaling_factor``, ``e_score_correction_bias``, ``n_group``,
...), read at call time, so a streamed layer's freshly loaded weights are used. The
instance's ``forward`` (or accelerate's ``_old_forward`` under ``device_map``; DBRX:
the block's ``route_tokens_to_experts``) is replaced; configs are never touched. With
``k`` equal to the native top-k the override returns exactly what the family's router
returns (tests/test_sweep.py checks it bit for bit).

- Selection order: the score the family ranks by (softmax probability; the logit for
  top-k-then-softmax and llama4; sigmoid + correction bias for deepseek_v3-style), among
  the *candidates* (every expert, or the experts of the groups group-limited routing
  keeps: the group choice does not depend on k).
- ``top_p``: the gate probability of an expert is its share of the candidates' total
  gate score: the softmax probability (softmax families, and the softmax of all logits
  for top-k-then-softmax families, whose k weights are that softmax renormalised), or
  the sigmoid score divided by the candidates' sum (deepseek_v3, glm4_moe, llama4).
  Experts are taken in selection order while the probability taken *before* them is
  below ``p``: at least one, at most every candidate; ``p = 1`` takes every candidate.
- Weights: the family's rule on the selected set: renormalised when the family
  renormalises (mixtral; ``norm_topk_prob``), a softmax over the selected logits
  (gpt_oss, granite), sigmoid scores (llama4), divided by their p-norm (dbrx), times
  ``routed_scaling_factor`` (deepseek).
- Tokens that take fewer experts than the widest token of the batch are padded with the
  id ``E`` and weight 0, which the experts' loop skips (non-eager implementations are
  told to mask it through ``_is_expert_parallel``); where the experts' loop cannot skip
  ``E`` (gpt_oss eager, dbrx), the padding repeats the token's first expert with weight 0.

Not supported (refused with the reason): phimoe (sparsemixer fixes k = 2), switch
(capacity-limited top-1 of an encoder-decoder), nllb-moe (capacity-limited top-2 of one). A family without a record whose router holds
its ``top_k`` (the generic adapter's families) takes top-k settings through that attribute (or
the config key its forward reads, gemma4's ``top_k_experts``) —
the router's own rule picks and weighs the k experts — and refuses top-p.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moescope import families
from moescope.errors import MoescopeError
from moescope.execution.routing import MoESite

#: routing rules the override implements
SUPPORTED_RULES = (
    "softmax_topk",
    "softmax_topk_pnorm",
    "topk_softmax",
    "topk_sigmoid",
    "softmax_group_limited",
    "sigmoid_group_limited",
)

#: why the other rules are refused
UNSUPPORTED_RULES = {
    "sparsemixer": "phimoe's sparsemixer routing always takes 2 experts (two masked argmax steps)",
    "capacity_top1": "switch_transformers routes top-1 under a capacity limit in an encoder-decoder",
    "capacity_top2": "nllb-moe routes top-2 under a capacity limit in an encoder-decoder",
}


class RoutingSettingError(MoescopeError):
    """A routing setting that makes no sense for the model (the CLI reports it as bad usage)."""


@dataclass(frozen=True)
class LayerRule:
    """What one MoE layer does under an override: ``top_k`` experts, or ``top_p`` mass."""

    top_k: int | None = None
    top_p: float | None = None


@dataclass
class LayerCount:
    """Tokens routed through one MoE layer and experts they took (for the mean per token)."""

    tokens: int = 0
    selected: int = 0

    @property
    def mean(self) -> float:
        """Experts per token (NaN before any token)."""
        return self.selected / self.tokens if self.tokens else float("nan")


#: a family without a record whose router module holds its ``top_k``: k is set there, and the
#: router's own rule does the rest (top-p needs the rule's probabilities, so it is refused)
ROUTER_TOP_K = "router_top_k"


def router_k_target(router: Any) -> tuple[Any, str] | None:
    """``(object, attribute)`` holding a router's k: its own int ``top_k``, or the config key its
    forward reads (gemma4's router takes ``self.config.top_k_experts``); None when neither."""
    import inspect

    from moescope.arch.discover import TOP_K_KEYS

    k = getattr(router, "top_k", None)
    if isinstance(k, int) and not isinstance(k, bool):
        return router, "top_k"
    cfg = getattr(router, "config", None)
    if cfg is None:
        return None
    try:
        source = inspect.getsource(type(router).forward)
    except (OSError, TypeError):
        return None
    for key in TOP_K_KEYS:
        value = getattr(cfg, key, None)
        if f"self.config.{key}" in source and isinstance(value, int) and not isinstance(value, bool):
            return cfg, key
    return None


def _generic_router(site: MoESite) -> Any:
    """The router module beside a family-less site's experts, when its k can be set (:func:`router_k_target`)."""
    for name in ("gate", "router"):
        router = getattr(site.block, name, None)
        if router is not None and router_k_target(router) is not None:
            return router
    return None


def rule_of(site: MoESite) -> str:
    """The registry's routing rule of a site, or a :class:`RoutingSettingError` saying why not."""
    record = families.lookup(site.family) if site.family else None
    if record is None and _generic_router(site) is not None:
        return ROUTER_TOP_K
    if record is None:
        raise RoutingSettingError(
            f"layer {site.layer} ({type(site.experts).__name__}) belongs to a family moescope does not "
            "know, so its routing rule is unknown; sweep supports "
            + ", ".join(f.name for f in families.all_families() if f.routing.rule in SUPPORTED_RULES)
            + "."
        )
    rule = record.routing.rule
    if rule not in SUPPORTED_RULES:
        why = UNSUPPORTED_RULES.get(rule, f"its routing rule {rule!r} has no override")
        raise RoutingSettingError(f"{record.name}: {why}; its experts per token cannot be changed.")
    return rule


def candidate_count(site: MoESite) -> int:
    """Experts a token can choose from: all, or those of the groups group-limited routing keeps."""
    router = _router(site)
    rule = rule_of(site)
    if rule == ROUTER_TOP_K:
        n_group, topk_group = getattr(router, "n_group", 1), getattr(router, "topk_group", 1)
        if isinstance(n_group, int) and isinstance(topk_group, int) and n_group > 1:
            return topk_group * (site.num_experts // n_group)
        return site.num_experts
    limited = rule == "sigmoid_group_limited" or (
        rule == "softmax_group_limited" and getattr(router, "topk_method", "greedy") == "group_limited_greedy"
    )
    if not limited:
        return site.num_experts
    n_group = int(router.num_group)
    return int(router.topk_group) * (site.num_experts // n_group)


def check_layer_rule(rule: LayerRule, *, layer: int, num_experts: int, candidates: int) -> None:
    """Refuse a setting that makes no sense for one layer.

    Raises:
        RoutingSettingError: ``k`` outside ``1..candidates`` or ``p`` outside ``(0, 1]``.
    """
    if rule.top_k is not None:
        if rule.top_k < 1 or rule.top_k > num_experts:
            raise RoutingSettingError(
                f"top-k {rule.top_k} at layer {layer}: k must be between 1 and the {num_experts} experts."
            )
        if rule.top_k > candidates:
            raise RoutingSettingError(
                f"top-k {rule.top_k} at layer {layer}: group-limited routing keeps {candidates} of "
                f"{num_experts} experts (topk_group groups), so k can be at most {candidates}."
            )
    if rule.top_p is not None and not 0.0 < rule.top_p <= 1.0:
        raise RoutingSettingError(f"top-p {rule.top_p} at layer {layer}: p must be in (0, 1].")


# --------------------------------------------------------------------------- selection


def select(choice: Any, mass: Any, rule: LayerRule, *, sorted_: bool = True) -> tuple[Any, Any | None]:
    """Selected expert ids ``[T, m]`` and which are real (``None``: all, for top-k).

    Args:
        choice: ``[T, E]`` ranking scores, ``-inf`` for experts a token may not choose.
        mass: ``[T, E]`` non-negative gate scores (0 for non-candidates), for top-p.
        rule: the layer's ``top_k`` or ``top_p``.
        sorted_: passed to ``torch.topk`` (as the family's router does).
    """
    import torch

    if rule.top_k is not None:
        return torch.topk(choice, rule.top_k, dim=-1, sorted=sorted_).indices, None
    assert rule.top_p is not None
    allowed = choice > float("-inf")
    n_cand = allowed.sum(-1)
    order = torch.sort(choice, dim=-1, descending=True, stable=True).indices
    share = mass.double().masked_fill(~allowed, 0.0)
    share = share / share.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    taken = share.gather(1, order)
    # the probability already taken before each expert, in selection order
    before = torch.cat([torch.zeros_like(taken[:, :1]), torch.cumsum(taken, dim=-1)[:, :-1]], dim=-1)
    count = n_cand if rule.top_p >= 1.0 else (before < rule.top_p).sum(-1)
    count = count.clamp(min=1).minimum(n_cand)
    width = int(count.max()) if count.numel() else 1
    ids = order[:, :width]
    valid = torch.arange(width, device=ids.device)[None, :] < count[:, None]
    return ids, valid


def _masked(values: Any, valid: Any | None) -> Any:
    return values if valid is None else values * valid


def _pad(ids: Any, weights: Any, valid: Any | None, num_experts: int, sentinel: bool) -> tuple[Any, Any]:
    """Padding slots get id ``E`` (or the token's first expert) and weight 0."""
    import torch

    if valid is None:
        return ids, weights
    fill = torch.full_like(ids, num_experts) if sentinel else ids[:, :1].expand_as(ids)
    return torch.where(valid, ids, fill), torch.where(valid, weights, torch.zeros_like(weights))


# --------------------------------------------------------------------------- per-rule routers


def _router(site: MoESite) -> Any:
    record = families.lookup(site.family) if site.family else None
    if record is None:
        return _generic_router(site)
    if record.hooks is None:
        return None
    return getattr(site.block, record.hooks.router_module)


def _softmax_topk(router: Any, family: str) -> Callable[..., Any]:
    """mixtral, qwen2/3_moe, olmoe, jamba: softmax -> top-k -> renormalise when the family does."""
    import torch
    import torch.nn.functional as F

    renorm = True if family == "mixtral" else bool(getattr(router, "norm_topk_prob", False))
    cast = family != "mixtral"  # mixtral returns float32 weights; the others cast back

    def forward(self: Any, hidden_states: Any, *, ctx: _Ctx) -> Any:
        h = hidden_states.reshape(-1, self.weight.shape[1])
        logits = F.linear(h, self.weight)
        probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
        ids, valid = ctx.select(probs, probs)
        w = _masked(probs.gather(1, ids), valid)
        if renorm:
            w = w / w.sum(dim=-1, keepdim=True)
        if cast:
            w = w.to(logits.dtype)
        return (logits, *ctx.finish(ids, w, valid)[::-1])

    return forward


def _topk_softmax(router: Any, family: str) -> Callable[..., Any]:
    """gpt_oss, granitemoe(shared): top-k of the logits (+ bias) -> softmax over the selected."""
    import torch
    import torch.nn.functional as F

    granite = family.startswith("granite")

    def forward(self: Any, hidden_states: Any, *, ctx: _Ctx) -> Any:
        logits = F.linear(hidden_states, self.weight, getattr(self, "bias", None))
        if granite:
            logits = logits.float()
        ids, valid = ctx.select(logits, logits.float().softmax(-1))
        top = logits.gather(1, ids)
        if valid is not None:
            top = top.masked_fill(~valid, float("-inf"))
        w = torch.softmax(top, dim=-1, dtype=top.dtype)
        if granite:
            w = w.type_as(hidden_states)
        return (logits, *ctx.finish(ids, w, valid)[::-1])

    return forward


def _topk_sigmoid(router: Any, family: str) -> Callable[..., Any]:
    """llama4: top-k of the logits -> sigmoid of those, returned dense ``[T, E]`` (0 elsewhere)."""
    import torch
    import torch.nn.functional as F

    def forward(self: Any, hidden_states: Any, *, ctx: _Ctx) -> Any:
        logits = F.linear(hidden_states, self.weight, self.bias)
        ids, valid = ctx.select(logits, torch.sigmoid(logits.float()))
        chosen = torch.zeros_like(logits, dtype=torch.bool)
        chosen.scatter_(1, ids, True if valid is None else valid)
        scores = torch.sigmoid(logits.float()).to(logits.dtype)
        scores = torch.where(chosen, scores, torch.zeros_like(scores))
        ctx.count(ids, valid)
        return scores, logits

    return forward


def _groups_mask(scores: Any, n_group: int, topk_group: int, group_score: str) -> Any:
    """``[T, E]`` True for the experts of each token's kept groups (as deepseek's routers choose)."""
    import torch

    t, e = scores.shape
    grouped = scores.view(t, n_group, e // n_group)
    if group_score == "max":
        gs = grouped.max(dim=-1).values
    else:
        gs = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(gs, k=topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(gs)
    mask.scatter_(1, group_idx, 1)
    return mask.unsqueeze(-1).expand(-1, n_group, e // n_group).reshape(-1, e).bool()


def _softmax_group_limited(router: Any, family: str) -> Callable[..., Any]:
    """deepseek_v2: softmax; greedy or group-limited (group score = max); x scaling, no renorm."""
    import torch
    import torch.nn.functional as F

    def forward(self: Any, hidden_states: Any, *, ctx: _Ctx) -> Any:
        h = hidden_states.view(-1, self.hidden_dim)
        logits = F.linear(h.type(torch.float32), self.weight.type(torch.float32))
        scores = logits.softmax(dim=-1, dtype=logits.dtype)
        choice = scores
        if self.topk_method == "group_limited_greedy":
            keep = _groups_mask(scores, self.num_group, self.topk_group, "max")
            choice = scores.masked_fill(~keep, 0.0)
            if ctx.rule.top_p is not None:
                choice = choice.masked_fill(~keep, float("-inf"))
        ids, valid = ctx.select(choice, choice.clamp_min(0.0), sorted_=False)
        w = _masked(scores.gather(1, ids), valid) * self.routed_scaling_factor
        return (logits, *ctx.finish(ids, w, valid)[::-1])

    return forward


def _sigmoid_group_limited(router: Any, family: str) -> Callable[..., Any]:
    """deepseek_v3, glm4_moe: sigmoid; choice = s + bias in the kept groups; weights s -> renorm -> x scaling."""
    import torch
    import torch.nn.functional as F

    def forward(self: Any, hidden_states: Any, *, ctx: _Ctx) -> Any:
        h = hidden_states.view(-1, self.hidden_dim)
        logits = F.linear(h.type(torch.float32), self.weight.type(torch.float32))
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias
        keep = _groups_mask(choice, self.num_group, self.topk_group, "sum2")
        choice = choice.masked_fill(~keep, float("-inf"))
        ids, valid = ctx.select(choice, scores.masked_fill(~keep, 0.0), sorted_=False)
        w = _masked(scores.gather(1, ids), valid)
        if self.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        w = w * self.routed_scaling_factor
        return (logits, *ctx.finish(ids, w, valid)[::-1])

    return forward


def _dbrx_route(block: Any) -> Callable[..., Any]:
    """dbrx (the block's ``route_tokens_to_experts``): softmax -> top-k -> divide by the p-norm."""
    import torch

    def route(router_logits: Any, *, ctx: _Ctx) -> Any:
        probs = torch.nn.functional.softmax(router_logits, dim=1, dtype=router_logits.dtype)
        ids, valid = ctx.select(probs, probs)
        w = _masked(probs.gather(1, ids), valid)
        norm = block.moe_normalize_expert_weights
        if norm is not None:
            w = w / torch.norm(w, p=norm, dim=-1, keepdim=True)
        return ctx.finish(ids, w, valid)[::-1]

    return route


_MAKERS: dict[str, Callable[[Any, str], Callable[..., Any]]] = {
    "softmax_topk": _softmax_topk,
    "topk_softmax": _topk_softmax,
    "topk_sigmoid": _topk_sigmoid,
    "softmax_group_limited": _softmax_group_limited,
    "sigmoid_group_limited": _sigmoid_group_limited,
}


# --------------------------------------------------------------------------- the override


class _Ctx:
    """One layer's setting, counter and padding convention, shared by its replaced router."""

    def __init__(self, rule: LayerRule, count: LayerCount, num_experts: int, sentinel: bool) -> None:
        self.rule = rule
        self.counter = count
        self.num_experts = num_experts
        self.sentinel = sentinel

    def select(self, choice: Any, mass: Any, *, sorted_: bool = True) -> tuple[Any, Any | None]:
        return select(choice, mass, self.rule, sorted_=sorted_)

    def count(self, ids: Any, valid: Any | None) -> None:
        self.counter.tokens += int(ids.shape[0])
        self.counter.selected += int(ids.numel()) if valid is None else int(valid.sum())

    def finish(self, ids: Any, weights: Any, valid: Any | None) -> tuple[Any, Any]:
        self.count(ids, valid)
        return _pad(ids, weights, valid, self.num_experts, self.sentinel)


def _sentinel_ok(site: MoESite) -> bool:
    """Whether the experts skip the padding id ``E`` (else padding repeats a real id, weight 0)."""
    if site.kind != "fused":
        return False
    impl = getattr(getattr(site.experts, "config", None), "_experts_implementation", "eager")
    return not (site.family == "gpt_oss" and impl in (None, "eager"))


class RoutingOverride:
    """Replace every MoE layer's routing for the duration of a ``with`` block.

    Args:
        sites: the model's MoE blocks (:func:`moescope.execution.routing.find_moe_sites`).
        rules: layer index -> :class:`LayerRule`; every site needs one.

    Attributes:
        counts: layer index -> :class:`LayerCount`, accumulated over every forward.

    Raises:
        RoutingSettingError: a family that cannot be overridden, or a rule that does not fit.
    """

    def __init__(self, sites: list[MoESite], rules: dict[int, LayerRule]) -> None:
        self.sites = sites
        self.rules = rules
        self.counts: dict[int, LayerCount] = {s.layer: LayerCount() for s in sites}
        self._undo: list[Callable[[], None]] = []
        for site in sites:
            rule = rules.get(site.layer)
            if rule is None:
                raise RoutingSettingError(f"no routing setting for MoE layer {site.layer}.")
            if rule_of(site) == ROUTER_TOP_K and rule.top_p is not None:
                raise RoutingSettingError(
                    f"layer {site.layer}: {type(site.experts).__name__} has no moescope record, so only its "
                    "router's own top_k can be changed (top-k settings); top-p needs the routing rule's "
                    "probabilities."
                )
            check_layer_rule(
                rule, layer=site.layer, num_experts=site.num_experts, candidates=candidate_count(site)
            )
        shared: dict[int, set[int]] = {}  # a config every layer's router reads k from: one k for all
        for site in sites:
            k = rules[site.layer].top_k
            if k is None or rule_of(site) != ROUTER_TOP_K:
                continue
            router = _router(site)
            holder = router_k_target(router)
            if holder is not None and holder[0] is not router:
                shared.setdefault(id(holder[0]), set()).add(int(k))
        if any(len(ks) > 1 for ks in shared.values()):
            raise RoutingSettingError(
                "this model's routers read k from the shared config, so every MoE layer takes the same "
                "top-k; pass one k for all layers."
            )

    def __enter__(self) -> RoutingOverride:
        try:
            for site in self.sites:
                self._attach(site)
        except BaseException:
            self.detach()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def detach(self) -> None:
        """Give every layer its own routing back."""
        while self._undo:
            self._undo.pop()()

    def _attach(self, site: MoESite) -> None:
        rule = self.rules[site.layer]
        sentinel = _sentinel_ok(site)
        ctx = _Ctx(rule, self.counts[site.layer], site.num_experts, sentinel)
        family = site.family or ""
        rule_name = rule_of(site)
        if rule_name == ROUTER_TOP_K:
            assert rule.top_k is not None  # top-p refused in __init__
            holder = router_k_target(_router(site))
            assert holder is not None  # rule_of found one
            self._replace(holder[0], holder[1], int(rule.top_k))

            def count(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                ids = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
                if ids is not None:
                    ctx.count(ids, None)

            handle = site.experts.register_forward_pre_hook(count, with_kwargs=True)
            self._undo.append(handle.remove)
            return
        if rule_name == "softmax_topk_pnorm":
            route = _dbrx_route(site.block)
            self._replace(site.block, "route_tokens_to_experts", lambda logits: route(logits, ctx=ctx))
        else:
            router = _router(site)
            fn = _MAKERS[rule_name](router, family)
            bound = types.MethodType(lambda self_, hidden: fn(self_, hidden, ctx=ctx), router)
            target = "_old_forward" if "_old_forward" in router.__dict__ else "forward"
            self._replace(router, target, bound)
        if rule.top_p is not None and sentinel and hasattr(site.experts, "_is_expert_parallel"):
            # grouped_mm / batched_mm mask ids >= E only in expert-parallel mode
            self._replace(site.experts, "_is_expert_parallel", True)

    def _replace(self, obj: Any, name: str, value: Any) -> None:
        had = name in obj.__dict__
        old = obj.__dict__.get(name)
        setattr(obj, name, value)

        def undo() -> None:
            if had:
                setattr(obj, name, old)
            else:
                obj.__dict__.pop(name, None)

        self._undo.append(undo)
