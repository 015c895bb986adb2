"""Find the MoE layers of a transformers model and record what their routers decide.

What: :func:`find_moe_sites` walks a model's modules and returns one :class:`MoESite` per
routed-expert block, with the decoder layer index as in the checkpoint;
:class:`RoutingRecorder` attaches hooks that record, for every token of a forward pass,
the selected expert ids, the gate weights the experts actually apply and, optionally,
the norm of each routed expert's output.

How (see ``docs/TRANSFORMERS_MOE.md``): there are five adapters; each family's registry record
(:mod:`moescope.families`) names the one it uses (``Family.hooks``), and the experts class
it applies to.

- ``fused``: families whose experts class is decorated with ``use_experts_implementation``
  (mixtral, qwen2/3_moe, deepseek_v2/v3, glm4_moe, olmoe, gpt_oss, phimoe, granitemoe,
  jamba, and any future family built the same way). A forward *pre-hook* on the experts
  module reads its ``top_k_index`` / ``top_k_weights`` arguments: exactly what the
  experts consume, after every family-specific routing rule (softmax-then-top-k,
  top-k-then-softmax, sigmoid, group-limited with correction bias, scaling factors).
  To get output norms without running any expert twice, the experts' forward is replaced
  on the instance by a per-expert loop equivalent to transformers' eager one that also
  writes ``||expert_e(x_t)||`` for each routed pair; only routed pairs are computed.
- ``dbrx``: the experts module takes the same arguments, so the same pre-hook; its own
  2-D ``[E*I, H]`` weight layout gets its own norm-capturing loop.
- ``llama4``: the router returns dense sigmoid scores (zero off the top-k) and the experts
  run on every token with the score folded into their input; a forward hook on the router
  decodes ids (top-k of the router logits, as the router does) and weights, and a forward
  hook on the experts reads the routed rows of their ``[E*T, H]`` output.
- ``switch``: the experts get a one-hot dispatch mask (all-zero for tokens dropped by the
  capacity limit); ids are decoded from it (``-1`` = dropped), and a forward hook on each
  ``expert_{i}`` module reads its output rows.
- ``nllb``: the sparse MLP's forward is replaced on the instance by
  :func:`moescope.execution.nllb.dispatch_forward`, which calls the block's own router and
  sends each token to the experts with a nonzero combine weight (top-1 and top-2 after the
  capacity limit; transformers 5.x's own experts loop does not, see that module); it
  reports ids (``-1`` = dropped), the weights it applies and the experts' output norms.

:func:`expert_weight_vectors` and :func:`router_rows` read a site's experts and router
the way its family holds them (fused, DBRX-packed rows, one module per expert), for
:mod:`moescope.redundancy.run`.

Recorded tensors are flat over tokens, ``[B*S, k]`` in row-major batch order, as the
routers see them; masking padded tokens is the caller's job (see :mod:`moescope.tracing`).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moescope import families
from moescope.errors import NotMoEError
from moescope.execution.normcapture import dbrx_forward_with_norms, fused_forward_with_norms
from moescope.families import layer_of as _layer_of

if TYPE_CHECKING:
    import numpy as np


@dataclass
class MoESite:
    """One routed-expert block.

    Attributes:
        name: module path of the MoE block (``model.layers.3.mlp``).
        layer: decoder layer index as in the checkpoint.
        stack: ``""`` for decoder-only models, ``encoder``/``decoder`` for encoder-decoders.
        kind: adapter: ``fused``, ``dbrx``, ``llama4``, ``switch`` or ``nllb``.
        num_experts: routed experts in this block.
        block: the MoE block module.
        experts: the experts module.
        router: the router module where the adapter hooks it (llama4), else ``None``.
        family: the registry family whose experts class this is (None: an unregistered
            family whose experts module is decorated like the fused ones).
    """

    name: str
    layer: int
    stack: str
    kind: str
    num_experts: int
    block: Any = field(repr=False)
    experts: Any = field(repr=False)
    router: Any = field(default=None, repr=False)
    family: str | None = None


@dataclass
class LayerRecord:
    """What one MoE block decided in the last forward pass (flat over ``B*S`` tokens).

    Attributes:
        ids: ``[T, k]`` int64 selected experts; ``-1`` where a token was dropped (switch, nllb).
        weights: ``[T, k]`` gate weights the experts apply (``0`` where dropped).
        norms: ``[T, k]`` float32 L2 norm of each routed expert's output, or ``None``.
        norms_are_weighted: the gate weight is applied before the expert (llama4), so its
            output already is the contribution and :attr:`weighted_norms` is :attr:`norms`.
    """

    ids: Any
    weights: Any
    norms: Any = None
    norms_are_weighted: bool = False

    @property
    def weighted_norms(self) -> Any:
        """``[T, k]`` norm of the contribution added to the layer output (None without norms);
        computed when asked (the trace's reducer works it out for many batches at once)."""
        if self.norms is None or self.norms_are_weighted:
            return self.norms
        return self.norms * self.weights.float().abs()


def _stack_of(name: str) -> str:
    head = name.split(".")
    for part in head:
        if part in ("encoder", "decoder"):
            return part
    return ""


def _is_fused_experts(module: Any) -> bool:
    # use_experts_implementation sets these on every instance it decorates.
    return hasattr(module, "_is_expert_parallel") and hasattr(module, "has_gate")


def _overrides_decorated_forward(experts: Any) -> bool:
    """Whether the experts module's class overrides the forward ``use_experts_implementation`` put on a base.

    The decorator wraps ``forward`` (``functools.wraps``: the wrapper has ``__wrapped__``). A
    subclass of a decorated class with its own forward (ergo's experts repeat each token per
    route, apply a per-expert RMSNorm to each route and sum the weighted routes around the
    decorated projections) does more than the eager loop :func:`fused_forward_with_norms`
    reproduces: swapping that loop in would change the model's output and every later layer's
    routing. A class never decorated (DBRX's) has its own norm-capturing loop.
    """
    own = type(experts).__dict__.get("forward")
    decorated = any(hasattr(c.__dict__.get("forward"), "__wrapped__") for c in type(experts).__mro__)
    return decorated and own is not None and not hasattr(own, "__wrapped__")


@functools.cache
def _experts_classes() -> dict[str, families.Family]:
    """Experts class name -> family record, from the registry."""
    return {f.hooks.experts_class: f for f in families.all_families() if f.hooks is not None}


def _adapter(block: Any, experts: Any) -> tuple[str, str | None] | None:
    """(adapter, family name) for one MoE block, or None when it is not one."""
    record = _experts_classes().get(type(experts).__name__)
    if record is not None and record.hooks is not None:
        adapter = record.hooks.adapter
        if adapter == "llama4" and not hasattr(block, record.hooks.router_module):
            return None
        return adapter, record.name
    # an unregistered family built like the decorated ones: its experts take ids and weights
    return ("fused", None) if _is_fused_experts(experts) else None


def find_moe_sites(model: Any) -> list[MoESite]:
    """Every routed-expert block of ``model``, in module order.

    Args:
        model: a transformers model (any head).

    Returns:
        One :class:`MoESite` per MoE block; empty for dense models.
    """
    sites: list[MoESite] = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if experts is None:
            continue
        layer = _layer_of(name)
        if layer is None:
            continue
        found = _adapter(module, experts)
        if found is None:
            continue
        kind, fam = found
        router = None
        if kind == "llama4":
            record = families.lookup(fam)
            assert record is not None and record.hooks is not None
            router = getattr(module, record.hooks.router_module)
        num = getattr(experts, "num_experts", None)
        if num is None:
            num = len(experts) if kind in ("switch", "nllb") else int(module.num_experts)
        sites.append(MoESite(name, layer, _stack_of(name), kind, int(num), module, experts, router, fam))
    return sites


def require_moe_sites(model: Any, ref: str = "the model") -> list[MoESite]:
    """Like :func:`find_moe_sites`, but a dense model is an error.

    Raises:
        NotMoEError: no routed-expert block was found.
    """
    sites = find_moe_sites(model)
    if not sites:
        mtype = getattr(getattr(model, "config", None), "model_type", "?")
        raise NotMoEError(
            f"{ref} ({mtype}) has no routed experts; nothing to trace — try a MoE model such as demo."
        )
    return sites


def config_top_k(config: Any) -> int | None:
    """Experts per token from a transformers config object, by the family's registry record.

    A family whose routing rule fixes k (phimoe's sparsemixer: 2, switch: 1) gets that k
    whatever the config says. For a family without a record, the fields of
    :data:`moescope.arch.discover.TOP_K_KEYS` are read (the top level, then a nested text
    config); ``None`` when none is present (callers refuse).
    """
    record = families.lookup(getattr(config, "model_type", None))
    if record is None:  # the fields the generic adapter reads (moescope.arch.discover)
        from moescope.arch.discover import TOP_K_KEYS

        scopes = [
            config,
            *(getattr(config, a, None) for a in ("text_config", "language_config", "llm_config")),
        ]
        for scope in (x for x in scopes if x is not None):
            for key in TOP_K_KEYS:
                k = getattr(scope, key, None)
                if isinstance(k, int) and not isinstance(k, bool) and k > 0:
                    return k
        return None
    f = record.fields
    if f.fixed_top_k is not None:
        return f.fixed_top_k
    scope = config
    if f.text_config and getattr(config, "text_config", None) is not None:
        scope = config.text_config
    value: Any = scope
    for part in (f.top_k or "").split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
    if value is None:
        value = f.top_k_default
    return int(value) if isinstance(value, int) and value > 0 else None


# --------------------------------------------------------------------------- expert weights


def expert_weight_vectors(experts: Any, num_experts: int, family: str | None = None) -> np.ndarray:
    """``[E, D]`` flattened parameters per expert of an experts module.

    The family's registry record (:mod:`moescope.families`) says how its experts module
    holds them: fused ``[E, ...]`` parameters, DBRX's packed ``[E*I, H]`` rows (expert j's
    rows are contiguous, so ``[E, -1]`` is exact), or one child module per expert (switch's
    ``ModuleDict``). For an unregistered family the module's shape decides.
    """
    import torch

    record = families.lookup(family) if family else None
    adapter = record.hooks.adapter if record is not None and record.hooks is not None else None
    own = list(experts.parameters(recurse=False))
    # children with weights (nllb's experts ModuleDict also holds a parameter-free dropout)
    children = [c for c in experts.children() if list(c.parameters())] if not own else []
    per_module = adapter in ("switch", "nllb") or (
        adapter is None and len(children) == num_experts and all(list(c.parameters()) for c in children)
    )
    if per_module:
        parts = [torch.cat([p.detach().float().reshape(-1) for p in c.parameters()]) for c in children]
        return torch.stack(parts).numpy()
    rows = []
    for p in experts.parameters():
        packed = adapter in ("dbrx", None) and p.ndim >= 1 and p.shape[0] % num_experts == 0
        if packed or (p.ndim >= 1 and p.shape[0] == num_experts):
            rows.append(p.detach().float().reshape(num_experts, -1))
    if not rows:
        raise ValueError("no expert parameters found")
    return torch.cat(rows, dim=1).numpy()


#: float64 elements per expert in one block of :func:`expert_weight_gram` (8 MiB per expert)
_GRAM_BLOCK = 1 << 20


def expert_weight_gram(experts: Any, num_experts: int, family: str | None = None) -> np.ndarray:
    """``[E, E]`` float64 Gram matrix of :func:`expert_weight_vectors`, without building them.

    The flattened vectors of a big layer are large (64 DeepSeek-V2-Lite experts: 2.2 GB in
    float32, twice that in float64); here each parameter is read in column blocks of
    :data:`_GRAM_BLOCK` elements per expert, cast to float64 and accumulated, so the extra
    memory is one block, not the layer.
    """
    import torch

    record = families.lookup(family) if family else None
    adapter = record.hooks.adapter if record is not None and record.hooks is not None else None
    own = list(experts.parameters(recurse=False))
    # children with weights (nllb's experts ModuleDict also holds a parameter-free dropout)
    children = [c for c in experts.children() if list(c.parameters())] if not own else []
    per_module = adapter in ("switch", "nllb") or (
        adapter is None and len(children) == num_experts and all(list(c.parameters()) for c in children)
    )
    pieces: list[Any] = []  # [E, n] views in the parameters' own dtype
    if per_module:
        per_child = [list(c.parameters()) for c in children]
        for k in range(len(per_child[0])):
            pieces.append(torch.stack([params[k].detach().reshape(-1) for params in per_child]))
    else:
        for p in experts.parameters():
            packed = adapter in ("dbrx", None) and p.ndim >= 1 and p.shape[0] % num_experts == 0
            if packed or (p.ndim >= 1 and p.shape[0] == num_experts):
                pieces.append(p.detach().reshape(num_experts, -1))
    if not pieces:
        raise ValueError("no expert parameters found")
    gram = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    with torch.no_grad():
        for piece in pieces:
            for start in range(0, piece.shape[1], _GRAM_BLOCK):
                blk = piece[:, start : start + _GRAM_BLOCK].to(torch.float64)
                gram += blk @ blk.T
    return gram.numpy()


def router_rows(block: Any, num_experts: int, family: str | None = None) -> np.ndarray | None:
    """The router weight ``[E, H]`` of a MoE block, or None when not found.

    A registered family's record names the router weight under the block
    (``gate.weight``, ``router.layer.weight``, ...); otherwise the first 2-D ``gate``/``router``
    weight with E rows outside the experts is taken.
    """
    record = families.lookup(family) if family else None
    if record is not None and record.hooks is not None:
        try:
            p = block.get_parameter(record.hooks.router)
        except AttributeError:
            return None
        return p.detach().float().numpy() if p.ndim == 2 and p.shape[0] == num_experts else None
    for name, p in block.named_parameters():
        if name.startswith("experts.") or "shared" in name:
            continue
        leaf = name.split(".")
        if any(part in ("gate", "router") for part in leaf) and leaf[-1] == "weight" and p.ndim == 2:
            if p.shape[0] == num_experts:
                return p.detach().float().numpy()
    return None


# --------------------------------------------------------------------------- recorder


class RoutingRecorder:
    """Hooks on every MoE block; after each forward, :attr:`records` holds one entry per site.

    Use as a context manager: hooks (and norm-capturing forwards) are attached on enter
    and removed on exit, leaving the model as it was.

    Args:
        sites: blocks from :func:`find_moe_sites`.
        record_norms: also record each routed expert's output norm (no expert runs twice).
    """

    def __init__(self, sites: list[MoESite], *, record_norms: bool = True) -> None:
        self.sites = sites
        self.record_norms = record_norms
        self._ids: dict[int, Any] = {}
        self._weights: dict[int, Any] = {}
        self._norms: dict[int, Any] = {}
        self._handles: list[Any] = []
        self._restore: list[tuple[Any, str, Any]] = []  # (module, attribute, instance value or None)

    # -- public -----------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget the last forward's records."""
        self._ids.clear()
        self._weights.clear()
        self._norms.clear()

    @property
    def records(self) -> list[LayerRecord | None]:
        """One :class:`LayerRecord` per site for the last forward (``None`` if it did not run)."""
        out: list[LayerRecord | None] = []
        for i in range(len(self.sites)):
            if i not in self._ids:
                out.append(None)
                continue
            ids, weights = self._ids[i], self._weights[i]
            if self.sites[i].kind == "fused" and weights is not None and ids.shape == weights.shape:
                # a slot the block gives weight exactly 0 contributes nothing: longcat_flash's zero
                # experts and zaya's skip class reach the experts as a real id with weight 0
                # (longcat spreads them over the experts); counted as not routed, like a drop
                ids = ids.masked_fill(weights == 0, -1)
            # llama4 folds the weight into the expert input: its output already is the contribution
            out.append(LayerRecord(ids, weights, self._norms.get(i), self.sites[i].kind == "llama4"))
        return out

    def __enter__(self) -> RoutingRecorder:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        """Register the hooks (idempotent only through :meth:`detach`)."""
        for i, site in enumerate(self.sites):
            if site.kind in ("fused", "dbrx"):
                self._handles.append(
                    site.experts.register_forward_pre_hook(self._args_hook(i), with_kwargs=True)
                )
                # an experts class with its own forward keeps it: ids and weights come from the
                # pre-hook (what it receives and applies), output norms are not recorded (lacks)
                if self.record_norms and not _overrides_decorated_forward(site.experts):
                    make = fused_forward_with_norms if site.kind == "fused" else dbrx_forward_with_norms
                    self._swap_forward(site.experts, types.MethodType(make(self, i), site.experts))
            elif site.kind == "llama4":
                self._handles.append(site.router.register_forward_hook(self._llama4_router_hook(i)))
                if self.record_norms:
                    self._handles.append(site.experts.register_forward_hook(self._llama4_experts_hook(i)))
            elif site.kind == "nllb":
                # the block's forward runs the router's dispatch and reports what it applied
                from moescope.execution.nllb import dispatch_forward

                block = site.block
                forward = dispatch_forward(self._nllb_sink(i), norms=self.record_norms)
                self._swap_forward(block, types.MethodType(forward, block))
            elif site.kind == "switch":
                self._handles.append(
                    site.experts.register_forward_pre_hook(self._switch_hook(i), with_kwargs=True)
                )
                if self.record_norms:
                    for e in range(site.num_experts):
                        module = site.experts[f"expert_{e}"]
                        self._handles.append(module.register_forward_hook(self._switch_expert_hook(i, e)))

    def detach(self) -> None:
        """Remove every hook and restore the experts' own forward."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, attr, value in reversed(self._restore):
            if value is None:  # the instance attribute shadowed the class's forward: drop it
                module.__dict__.pop(attr, None)
            else:  # accelerate's _old_forward, nllb's installed dispatch
                setattr(module, attr, value)
        self._restore.clear()

    def _swap_forward(self, module: Any, forward: Any) -> None:
        """Run ``forward`` as ``module``'s forward until :meth:`detach` puts the old one back.

        accelerate (device_map) wraps forward to load offloaded weights first and then calls
        ``_old_forward``: that is replaced then, so the weights are there.
        """
        attr = "_old_forward" if "_old_forward" in module.__dict__ else "forward"
        self._restore.append((module, attr, module.__dict__.get(attr)))
        setattr(module, attr, forward)

    # -- hooks --------------------------------------------------------------------------------
    def _args_hook(self, i: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            rest = list(args[1:]) + list(kwargs.values())
            self._ids[i] = rest[0]
            self._weights[i] = rest[1]

        return hook

    def _llama4_router_hook(self, i: int) -> Callable[..., None]:
        k = self.sites[i].block.top_k

        def hook(module: Any, args: Any, output: Any) -> None:
            import torch

            scores, logits = output
            # the router takes torch.topk of its logits; the same call gives the same ids
            ids = torch.topk(logits, k, dim=1).indices
            self._ids[i] = ids
            self._weights[i] = scores.gather(1, ids)

        return hook

    def _llama4_experts_hook(self, i: int) -> Callable[..., None]:
        n_exp = self.sites[i].num_experts

        def hook(module: Any, args: Any, output: Any) -> None:
            ids = self._ids[i]
            per_expert = output.view(n_exp, ids.shape[0], -1)
            rows = per_expert[ids, ids.new_tensor(range(ids.shape[0]))[:, None]]
            self._norms[i] = rows.float().norm(dim=-1)

        return hook

    def _nllb_sink(self, i: int) -> Callable[[Any, Any, Any], None]:
        def sink(ids: Any, weights: Any, norms: Any) -> None:
            self._ids[i] = ids
            self._weights[i] = weights
            if norms is not None:
                self._norms[i] = norms

        return sink

    def _switch_hook(self, i: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            import torch

            rest = list(args[1:]) + list(kwargs.values())
            onehot, weights = rest[0], rest[1]  # [T, 1, E], [T, 1]
            flat = onehot.reshape(onehot.shape[0], -1)
            kept = flat.sum(dim=-1, keepdim=True) > 0
            ids = torch.where(
                kept, flat.argmax(dim=-1, keepdim=True), torch.full_like(kept, -1, dtype=torch.long)
            )
            self._ids[i] = ids
            self._weights[i] = torch.where(
                kept, weights.reshape(-1, 1), torch.zeros_like(weights.reshape(-1, 1))
            )
            if self.record_norms:
                self._norms[i] = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)

        return hook

    def _switch_expert_hook(self, i: int, e: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            # the experts loop feeds expert e the tokens routed to it, in ascending order
            tok = (self._ids[i][:, 0] == e).nonzero().squeeze(-1)
            self._norms[i][tok, 0] = output.float().norm(dim=-1)

        return hook
