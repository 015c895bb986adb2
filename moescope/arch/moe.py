"""Architecture knowledge: one normalised MoE description per checkpoint, and a tensor classifier.

``moe_spec(config)`` reads a transformers ``config.json`` dict (no torch, no transformers)
into a :class:`MoESpec`: which decoder layers are MoE, routed experts, top-k, shared
experts, expert width, scoring rule and the config field that holds the expert count.
``classify(name, spec)`` puts every checkpoint tensor in one component (``embedding``,
``attention``, ``dense_mlp``, ``routed_experts``, ``shared_experts``, ``router``, ``norm``,
``lm_head``, ``mtp``, ``vision``, ``other``) and knows which stored tensors are not
parameters (quantisation scales, buffers such as ``e_score_correction_bias``) and how many
logical parameters a packed tensor encodes (MXFP4 ``*_blocks``: two per byte).

Per-family facts (field names, layer placement, routing defaults, tensor names such as
granite's ``block_sparse_moe.input_linear``) come from the family registry
(:mod:`moescope.families`); this module applies them the same way for every family.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from moescope import families
from moescope.errors import ConfigError
from moescope.families import (
    DENSE_FAMILIES,
    LAYER_RE,
    PER_EXPERT_RE,
    Family,
    Reader,
    family_of,
    text_config,
)

COMPONENTS = (
    "embedding",
    "attention",
    "dense_mlp",
    "routed_experts",
    "shared_experts",
    "router",
    "norm",
    "lm_head",
    "mtp",
    "vision",
    "other",
)

#: the transformers MoE families of the registry (kimi_k2 reads as deepseek_v3)
MOE_FAMILIES = families.moe_family_names()

__all__ = [
    "COMPONENTS",
    "ENCODER_DECODER",
    "MOE_FAMILIES",
    "MoESpec",
    "TensorClass",
    "classify",
    "family_of",
    "layer_index",
    "moe_spec",
    "routing_groups",
    "rows_per_expert",
    "text_config",
]


@dataclass
class MoESpec:
    """What a checkpoint's config says about its layers and experts.

    Attributes:
        model_type: the config's ``model_type`` as written.
        family: normalised family key (``kimi_k2`` -> ``deepseek_v3``).
        is_moe: whether any layer routes tokens to experts.
        num_layers: decoder layers (for encoder-decoder: encoder + decoder blocks).
        moe_layers: indices of the MoE layers, as in the checkpoint's layer numbering.
        num_experts: routed experts per MoE layer.
        top_k: experts each token is routed to.
        num_shared_experts: always-on experts per MoE layer (0 when none).
        expert_intermediate_size: width of one routed expert's MLP.
        shared_intermediate_size: total width of the shared expert(s) MLP.
        scoring: ``softmax``, ``sigmoid``, ``softmax_after_topk``, ``sparsemixer``.
        norm_topk_prob: whether the top-k weights are renormalised (None when not applicable).
        n_group / topk_group: group-limited routing (deepseek); 1 / 1 when not used.
        num_experts_field: dotted config key that holds the expert count.
        top_k_field: dotted config key that holds top-k.
        expert_width_field: dotted config key that holds the routed experts' width.
        tie_word_embeddings: whether the LM head shares the input embedding.
        mtp_layers: number of multi-token-prediction layers stored after the decoder layers.
        known: whether moescope knows this family (False: dense fallback).
        generic: read from transformers' modules (no registry record): :mod:`moescope.arch.discover`.
    """

    model_type: str
    family: str
    is_moe: bool = False
    num_layers: int = 0
    moe_layers: list[int] = field(default_factory=list)
    num_experts: int = 0
    top_k: int = 0
    num_shared_experts: int = 0
    expert_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    scoring: str | None = None
    norm_topk_prob: bool | None = None
    n_group: int = 1
    topk_group: int = 1
    num_experts_field: str | None = None
    top_k_field: str | None = None
    expert_width_field: str | None = None
    tie_word_embeddings: bool = False
    mtp_layers: int = 0
    encoder_layers: int = 0
    known: bool = True
    generic: bool = False

    @property
    def moe_set(self) -> frozenset[int]:
        """``moe_layers`` as a set (cached per list object, for the per-tensor classifier)."""
        cached = self.__dict__.get("_moe_set")
        if cached is None or cached[0] is not self.moe_layers or len(cached[1]) != len(self.moe_layers):
            cached = (self.moe_layers, frozenset(self.moe_layers))
            self.__dict__["_moe_set"] = cached
        return cached[1]

    @property
    def topk_ratio(self) -> float | None:
        """k / N, the share of routed experts one token uses."""
        return self.top_k / self.num_experts if self.is_moe and self.num_experts else None


def moe_spec(cfg: dict[str, Any], where: str = "config.json") -> MoESpec:
    """Read a config dict into a :class:`MoESpec`, by the family's registry record.

    Run :func:`moescope.arch.validate.validate_config` first: it checks every field read here
    (types, ranges, top-k against the expert count) with precise messages; the checks here
    are the last line for callers that skip it.

    Args:
        cfg: a transformers config as a dict (``json.load`` of ``config.json``).
        where: the file the config came from, for error messages.

    Returns:
        The normalised description; dense and unknown families get ``is_moe=False``
        (unknown ones ``known=False``).

    Raises:
        ConfigError: when MoE fields are malformed or contradict each other (top_k > experts).
    """
    fam = family_of(cfg)
    record = families.lookup(fam)
    tcfg = text_config(cfg) if record is not None and record.fields.text_config else cfg
    r = Reader(tcfg, where)
    if record is not None:
        tie_default = record.tie_default
    else:
        tie_default = fam in families.DENSE_TIED_BY_DEFAULT
    spec = MoESpec(
        model_type=str(cfg.get("model_type") or ""),
        family=fam,
        tie_word_embeddings=bool(r.get("tie_word_embeddings", default=tie_default)),
    )
    if fam == "gpt2":  # GPT-2's head is always the embedding, whatever the config says
        spec.tie_word_embeddings = True
    spec.num_layers = r.num_layers()
    if record is None:
        spec.known = fam in DENSE_FAMILIES
        if not spec.known and fam != "moescope_spec":
            _read_generic(spec, cfg, where)
    else:
        _read_family(spec, record, r)
    spec.is_moe = bool(spec.num_experts > 1 and spec.moe_layers)
    if spec.is_moe:
        if spec.top_k < 1:
            raise ConfigError(
                f"{where}: {spec.top_k_field} is {spec.top_k} but the config has {spec.num_experts} experts; "
                "each token must be routed to at least 1 expert (fix the config)."
            )
        if spec.top_k > spec.num_experts:
            raise ConfigError(
                f"{where}: the config routes each token to {spec.top_k} experts ({spec.top_k_field}) but "
                f"has only {spec.num_experts} ({spec.num_experts_field}) (fix the config)."
            )
    else:
        spec.moe_layers = []
        if fam not in MOE_FAMILIES:
            spec.num_experts = spec.top_k = 0
    return spec


#: config fields of the shared experts' count and total width, for families without a record
_SHARED_COUNT_KEYS = (
    "n_shared_experts",
    "num_shared_experts",
    "shared_expert_count",
    "moe_num_shared_experts",
)
_SHARED_WIDTH_KEYS = (
    "shared_expert_intermediate_size",
    "shared_intermediate_size",
    "moe_shared_expert_intermediate_size",
)
_EXPERT_WIDTH_KEYS = (
    "moe_intermediate_size",
    "expert_intermediate_size",
    "moe_ffn_hidden_size",
    "intermediate_size",
)


def _read_generic(spec: MoESpec, cfg: dict[str, Any], where: str) -> None:
    """Fill ``spec`` from the model transformers builds for ``cfg`` (:mod:`moescope.arch.discover`).

    Leaves ``spec.known`` False only when the installed transformers does not know the
    ``model_type`` either.

    Raises:
        ConfigError: the model has experts but its experts per token cannot be told.
    """
    from moescope.arch.discover import discover

    found = discover(cfg, where)
    if found is None:
        return
    spec.known = True
    spec.generic = True
    scope = cfg.get(found.text_scope) if found.text_scope else cfg
    r = Reader(scope if isinstance(scope, dict) else cfg, where)
    spec.num_layers = r.num_layers() or spec.num_layers
    if not found.is_moe:
        return
    layers = sorted({s.layer for s in found.sites if s.layer is not None and s.num_experts > 1})
    spec.moe_layers = layers
    spec.num_experts = found.num_experts
    spec.num_experts_field = found.num_experts_field
    if found.top_k is None:
        raise ConfigError(
            f"{where}: model_type {spec.model_type!r} has {found.num_experts} routed experts but neither its "
            f"router nor its config says how many each token uses (looked for num_experts_per_tok, moe_topk, top_k, ...); "
            "add num_experts_per_tok to the config."
        )
    spec.top_k, spec.top_k_field = found.top_k, found.top_k_field
    width_key = next((k for k in _EXPERT_WIDTH_KEYS if isinstance(r.get(k), int)), None)
    if width_key is not None:
        spec.expert_intermediate_size, spec.expert_width_field = int(r.get(width_key)), width_key
    shared = [s for s in found.sites if s.shared]
    if shared:
        n = next((r.get(k) for k in _SHARED_COUNT_KEYS if isinstance(r.get(k), int)), None)
        spec.num_shared_experts = int(n) if n else 1
        w = next((r.get(k) for k in _SHARED_WIDTH_KEYS if isinstance(r.get(k), int)), None)
        spec.shared_intermediate_size = (
            int(w) if w else spec.num_shared_experts * spec.expert_intermediate_size
        )
    spec.norm_topk_prob = r.get("norm_topk_prob") if isinstance(r.get("norm_topk_prob"), bool) else None


def _read_family(spec: MoESpec, record: Family, r: Reader) -> None:
    """Fill ``spec`` from the config fields the family record names."""
    f = record.fields
    # transformers' attribute_map aliases mean a saved config may hold any of the names
    exp_key = next((k for k in f.experts if r.has(k)), f.experts[0])
    spec.num_experts = r.count(exp_key, f.experts_default if f.experts_default is not None else 0)
    spec.num_experts_field = exp_key
    if f.fixed_top_k is not None:
        spec.top_k, spec.top_k_field = f.fixed_top_k, f.top_k
    else:
        assert f.top_k is not None  # a record without fixed_top_k names the field (tested)
        spec.top_k = r.count(f.top_k, f.top_k_default if f.top_k_default is not None else 0)
        spec.top_k_field = f.top_k
    spec.expert_intermediate_size = r.count(f.width, 0)
    spec.expert_width_field = f.width
    if f.shared_count:
        spec.num_shared_experts = r.count(f.shared_count, 0)
        spec.shared_intermediate_size = spec.num_shared_experts * spec.expert_intermediate_size
    elif f.shared_width:
        spec.shared_intermediate_size = r.count(f.shared_width, 0)
        spec.num_shared_experts = 1 if spec.shared_intermediate_size else 0
    elif f.shared_always:
        spec.num_shared_experts = 1
        spec.shared_intermediate_size = spec.expert_intermediate_size
    layers = record.placement(r, spec.num_experts)
    spec.num_layers, spec.moe_layers, spec.encoder_layers = layers
    spec.scoring = record.routing.scoring
    norm = record.routing.renormalise
    spec.norm_topk_prob = bool(r.get(f.norm_topk, default=norm)) if f.norm_topk else norm
    spec.n_group, spec.topk_group = groups(record, r)
    if f.mtp:
        spec.mtp_layers = r.count(f.mtp, 0)


def groups(record: Family, r: Reader) -> tuple[int, int]:
    """``(n_group, topk_group)`` of group-limited routing, ``(1, 1)`` when routing is not limited.

    deepseek_v2 limits groups only with ``topk_method == "group_limited_greedy"`` (its
    default is ``greedy``); deepseek_v3-style routing always does when ``n_group > 1``.
    """
    mode = record.routing.groups
    if mode is None or (mode == "topk_method" and r.get("topk_method") != "group_limited_greedy"):
        return 1, 1
    return r.count("n_group", 1) or 1, r.count("topk_group", 1) or 1


def rows_per_expert(spec: MoESpec) -> int:
    """Rows of dimension 0 that one expert owns in a fused experts tensor.

    1 for ``[E, ...]`` tensors; the expert width for families whose registry record says
    experts are packed as rows (DBRX's ``[E*I, H]``). 0 when the width is unknown.
    """
    record = families.lookup(spec.family)
    if record is not None and record.tensors.packed:
        return spec.expert_intermediate_size
    return 1


def routing_groups(cfg: dict[str, Any], where: str = "config.json") -> tuple[int, int, bool]:
    """``(n_group, topk_group, needs_two_per_group)`` of a config; ``(1, 1, False)`` when not limited.

    deepseek_v3-style routing scores a group by the sum of its top two experts, so a group
    must keep at least two.
    """
    record = families.lookup(family_of(cfg))
    if record is None:
        # a family without a record: groups as its config states them; each group may need two
        # experts (deepseek_v3-style group scores), the conservative reading
        scope = text_config(cfg) if isinstance(cfg.get("text_config"), dict) else cfg
        r = Reader(scope, where)
        n_group = r.count("n_group", 1) if isinstance(scope.get("n_group"), int) else 1
        topk_group = r.count("topk_group", 1) if isinstance(scope.get("topk_group"), int) else 1
        return (n_group, topk_group or 1, True) if n_group > 1 else (1, 1, False)
    tcfg = text_config(cfg) if record.fields.text_config else cfg
    n_group, topk_group = groups(record, Reader(tcfg, where))
    if n_group <= 1:
        return 1, 1, False
    return n_group, topk_group, record.routing.group_needs_two


# ---------------------------------------------------------------------------------------
# Tensor classification
# ---------------------------------------------------------------------------------------

_VISION_RE = re.compile(
    r"(vision_model|vision_tower|visual\.|multi_modal_projector|vision_encoder|image_newline|mm_projector)"
)
_NOT_PARAM_RE = re.compile(
    r"(_scales$|\.weight_scale_inv$|\.weight_scale$|\.input_scale$|\.scales$|\.qzeros$|\.g_idx$|"
    r"e_score_correction_bias$|\.inv_freq$|\.attn\.bias$|\.attn\.masked_bias$|\.masked_bias$)"
)


class TensorClass(NamedTuple):
    """Where one stored tensor belongs.

    Attributes:
        component: one of :data:`COMPONENTS`.
        layer: decoder layer index, or None for tensors outside the layer stack.
        expert: expert index for per-expert tensors; None for fused ``[E, ...]`` tensors.
        is_param: False for quantisation scales and saved buffers (not parameters).
        param_factor: logical parameters per stored element (2 for MXFP4 ``*_blocks``).
        is_matmul: whether the tensor multiplies activations (counted in FLOPs).
    """

    component: str
    layer: int | None
    expert: int | None
    is_param: bool = True
    param_factor: int = 1
    is_matmul: bool = False


#: transformers encoder-decoder MoE families (switch_transformers, nllb_moe): their decoder
#: blocks are numbered after the encoder's, as in moescope's layer numbering
ENCODER_DECODER = frozenset(
    f.name for f in families.all_families() if not f.causal_lm and f.config_class is not None
)

#: where the decoder stack's tensors start: switch ``decoder.block.N.``, nllb ``model.decoder.layers.N.``
_DECODER_PREFIXES = ("decoder.", "model.decoder.")


def _decoder_offset(name: str, spec: MoESpec) -> int:
    """What a tensor's block index gains in moescope's numbering (the encoder's blocks, in its decoder)."""
    if spec.family in ENCODER_DECODER and name.startswith(_DECODER_PREFIXES):
        return spec.encoder_layers
    return 0


def layer_index(name: str, spec: MoESpec) -> int | None:
    """Decoder layer index in moescope's numbering (encoder-decoders: decoder blocks after encoder)."""
    m = LAYER_RE.search(name)
    if not m:
        return None
    return int(m.group(1)) + _decoder_offset(name, spec)


def classify(name: str, spec: MoESpec, ndim: int = 2) -> TensorClass:
    """Put one tensor in a component.

    Args:
        name: tensor name as stored (per-expert or fused layout, original or renamed).
        spec: the checkpoint's :class:`MoESpec`.
        ndim: number of dimensions (1-D tensors are never matmul weights).

    Returns:
        The tensor's :class:`TensorClass`.
    """
    lm = LAYER_RE.search(name)
    layer = expert = None
    key = name
    if lm is not None:
        ls, le = lm.span(1)
        layer = int(name[ls:le]) + _decoder_offset(name, spec)
        em = PER_EXPERT_RE.search(name, le - 1)
        if em is not None:
            es, ee = em.span(2)
            expert = int(name[es:ee])
            key = f"{name[:ls]}#{name[le:es]}#{name[ee:]}"
        else:
            key = f"{name[:ls]}#{name[le:]}"
    # A checkpoint has ~100k tensors but a few dozen name shapes: classify each shape once,
    # with the layer and expert numbers blanked out (cached).
    moe = spec.moe_set
    mtp_layer = layer is not None and layer >= spec.num_layers > 0 and spec.family not in ENCODER_DECODER
    in_moe = layer is None or not moe or layer in moe
    component, is_param, factor, matmul = _classify_shape(
        key, ndim >= 2, layer is None, in_moe, mtp_layer, spec.family
    )
    return TensorClass(
        component, layer, expert if component == "routed_experts" else None, is_param, factor, matmul
    )


#: (routed, shared, router, buffer endings, tower parts, stored buffers, stored towers, stored params)
_Markers = tuple[
    tuple[str, ...],
    tuple[str, ...],
    tuple[str, ...],
    tuple[str, ...],
    tuple[str, ...],
    frozenset[str],
    frozenset[str],
    frozenset[str],
]


@functools.cache
def _family_markers(family: str) -> _Markers:
    """Name parts that mark a family's routed and shared experts beyond the generic ``.experts.``.

    Granite stores its routed experts as ``block_sparse_moe.input_linear`` / ``output_linear``
    and its shared expert as ``shared_mlp``; the registry says so. A family without a record
    gets (routed, shared, router) from the modules :mod:`moescope.arch.discover` found.
    """
    record = families.lookup(family)
    if record is None:
        from moescope.arch.discover import discovered

        found = discovered(family)
        if found is None:
            return (), (), (), (), (), frozenset(), frozenset(), frozenset()
        towers = tuple(f".{t.lower()}." for t in found.towers)
        return (
            *found.markers(),
            tuple(f".{b}" for b in found.buffers),
            towers,
            found.stored_buffers,
            found.stored_towers,
            found.stored_params,
        )
    t = record.tensors
    routed = tuple(f".{b}.{p}".lower() for b in t.blocks for p in t.experts if p != "experts.")
    return routed, tuple(f".{p}".lower() for p in t.shared), (), (), (), frozenset(), frozenset(), frozenset()


@functools.lru_cache(maxsize=65536)
def _classify_shape(
    name: str, multi_dim: bool, outside_layers: bool, router_ok: bool, mtp_layer: bool, family: str = ""
) -> tuple[str, bool, int, bool]:
    """(component, is_param, param_factor, is_matmul) of a name with numbers blanked."""
    routed, shared, routers, buffers, towers, stored_buffers, stored_towers, stored_params = _family_markers(
        family
    )
    is_param = not _NOT_PARAM_RE.search(name) and not (buffers and name.endswith(buffers))
    if name in stored_buffers:  # a buffer transformers saves under another name (gate.bias)
        is_param = False
    elif name in stored_params:  # a learned correction bias (laguna, ernie): a parameter here
        is_param = True
    factor = 2 if name.endswith("_blocks") else 1
    base = name[: -len("_blocks")] if factor == 2 else name
    lname = base.lower()
    is_bias = lname.endswith(".bias") or lname.endswith("_bias")
    matmul = is_param and multi_dim and not is_bias

    def tc(component: str, mm: bool = matmul) -> tuple[str, bool, int, bool]:
        return component, is_param, factor, mm and component not in ("embedding", "vision", "mtp")

    if (
        _VISION_RE.search(lname)
        or name in stored_towers
        or (towers and any(t in "." + lname for t in towers))
    ):
        return tc("vision")
    if lname.startswith("mtp.") or ".mtp." in lname or mtp_layer:
        return tc("mtp")
    if name in stored_params and router_ok:
        # a learned correction bias, added to every token's router scores: router-like, always
        # active, wherever the checkpoint stores it (laguna saves its gate's under mlp.experts.)
        return tc("router")
    if "shared_expert" in lname or any(m in lname for m in shared):
        return tc("shared_experts")
    if ".experts." in lname or lname.endswith(".experts") or any(m in lname for m in routed):
        return tc("routed_experts")
    if (
        _ROUTER_RE.search(lname) or _ROUTER2_RE.search(lname) or any(m in lname for m in routers)
    ) and router_ok:
        return tc("router")
    if _EMBED_RE.search(lname) and outside_layers:
        return tc("embedding", mm=False)
    if _HEAD_RE.search(lname) and outside_layers:
        return tc("lm_head")
    if _LAYER_NORM_RE.search(lname):  # nllb's self_attn_layer_norm: a norm, not attention
        return tc("norm", mm=False)
    if _ATTN_RE.search(base):
        return tc("attention")
    if _NORM_RE.search(lname):
        return tc("norm", mm=False)
    if _MLP_RE.search(base) or ".layer.1." in base or ".layer.2." in base:
        return tc("dense_mlp")
    return tc("other", mm=False)


_ROUTER_RE = re.compile(
    r"\.(mlp|block_sparse_moe|feed_forward|moe|ffn)\.(gate|router)(\.layer)?\.(weight|bias|e_score_correction_bias)$"
)
_ROUTER2_RE = re.compile(r"\.router\.(classifier\.)?(weight|bias)$")
_EMBED_RE = re.compile(
    r"(embed_tokens|\.wte\.|\.wpe\.|^wte\.|^wpe\.|word_embeddings|embed_in\.|tok_embeddings|^(model\.)?shared\.weight|"
    r"\.embed_positions\.|position_embeddings)"
)
_HEAD_RE = re.compile(r"(^|\.)(lm_head|embed_out|output)\.(weight|bias)$")
_ATTN_RE = re.compile(
    r"(self_attn|\.attn\.|\.attention\.|mamba|\.mixer\.|norm_attn_norm\.attn|\.layer\.0\.SelfAttention|"
    r"EncDecAttention|relative_attention|cross_attention\.|encoder_attn\.)"
)
_LAYER_NORM_RE = re.compile(r"(self_attn|cross_attention|encoder_attn|ff|final)_layer_norm\.(weight|bias)$")
_NORM_RE = re.compile(r"(norm|ln_\d|ln_f|\.ln\.|layer_norm)")
_MLP_RE = re.compile(r"\.(mlp|feed_forward|ffn|DenseReluDense|fc\d|c_fc|dense_h_to_4h|dense_4h_to_h)")
