"""Architecture knowledge: one normalised MoE description per checkpoint, and a tensor classifier.

``moe_spec(config)`` reads a transformers ``config.json`` dict (no torch, no transformers)
into a :class:`MoESpec`: which decoder layers are MoE, routed experts, top-k, shared
experts, expert width, scoring rule and the config field that holds the expert count.
``classify(name, spec)`` puts every checkpoint tensor in one component (``embedding``,
``attention``, ``dense_mlp``, ``routed_experts``, ``shared_experts``, ``router``, ``norm``,
``lm_head``, ``mtp``, ``vision``, ``other``) and knows which stored tensors are not
parameters (quantisation scales, buffers such as ``e_score_correction_bias``) and how many
logical parameters a packed tensor encodes (MXFP4 ``*_blocks``: two per byte).

The families table is the single place that knows a family's field names; later commands
(trace, prune) read the same :class:`MoESpec`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from moescope.errors import ConfigError

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

#: families whose MoE layout moescope knows (kimi_k2 reads as deepseek_v3)
MOE_FAMILIES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "olmoe",
    "gpt_oss",
    "phimoe",
    "granitemoe",
    "granitemoeshared",
    "dbrx",
    "llama4",
    "jamba",
    "switch_transformers",
)

_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")

_ALIASES = {"kimi_k2": "deepseek_v3", "llama4_text": "llama4", "glm4v_moe_text": "glm4_moe"}

# Families whose config classes default tie_word_embeddings to True when the field is absent.
_TIED_BY_DEFAULT = {
    "gpt2",
    "granitemoe",
    "granitemoeshared",
    "jamba",
    "switch_transformers",
    "gemma",
    "gemma2",
}


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


def _get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        cur: Any = cfg
        for part in key.split("."):
            if not isinstance(cur, dict) or part not in cur:
                cur = None
                break
            cur = cur[part]
        if cur is not None:
            return cur
    return default


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a (possibly multimodal) config."""
    tc = cfg.get("text_config")
    if isinstance(tc, dict):
        merged = dict(tc)
        merged.setdefault("model_type", cfg.get("model_type"))
        if "tie_word_embeddings" not in merged and "tie_word_embeddings" in cfg:
            merged["tie_word_embeddings"] = cfg["tie_word_embeddings"]
        return merged
    return cfg


def family_of(cfg: dict[str, Any]) -> str:
    """Normalised family key of a config (``kimi_k2`` -> ``deepseek_v3``)."""
    mt = cfg.get("model_type")
    mt = mt.lower() if isinstance(mt, str) else ""
    if not mt:
        archs = cfg.get("architectures")
        if isinstance(archs, list) and archs and isinstance(archs[0], str) and "Deepseek" in archs[0]:
            mt = "deepseek_v3"
    return _ALIASES.get(mt, mt)


def moe_spec(cfg: dict[str, Any], where: str = "config.json") -> MoESpec:
    """Read a config dict into a :class:`MoESpec`.

    Run :func:`moescope.validate.validate_config` first: it checks every field read here
    (types, ranges, top-k against the expert count) with precise messages; the checks here
    are the last line for callers that skip it.

    Args:
        cfg: a transformers config as a dict (``json.load`` of ``config.json``).
        where: the file the config came from, for error messages.

    Returns:
        The normalised description; dense families get ``is_moe=False``.

    Raises:
        ConfigError: when MoE fields are malformed or contradict each other (top_k > experts).
    """

    def _int(_cfg: dict[str, Any], key: str, value: Any) -> int:
        if type(value) is not int:  # floats (1e12), strings and booleans are typos, not counts
            raise ConfigError(f"{where}: {key} is {value!r}; it must be a whole number (fix the config).")
        if value < 0:
            raise ConfigError(f"{where}: {key} is {value}; it must not be negative (fix the config).")
        return value

    fam = family_of(cfg)
    tcfg = text_config(cfg) if fam == "llama4" else cfg
    tie_default = fam in _TIED_BY_DEFAULT
    spec = MoESpec(
        model_type=str(cfg.get("model_type") or ""),
        family=fam,
        tie_word_embeddings=bool(_get(tcfg, "tie_word_embeddings", default=tie_default)),
    )
    if fam == "gpt2":
        spec.tie_word_embeddings = True
    if fam == "moescope_spec":
        spec.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", True))
    n_layers = _get(tcfg, "num_hidden_layers", "n_layer", "n_layers", "num_layers", default=0)
    spec.num_layers = _int(cfg, "num_hidden_layers", n_layers)

    def setk(exp_key: str, k_key: str) -> None:
        # transformers' attribute_map aliases mean a saved config may hold either name
        # (Qwen3-MoE configs from transformers 5 say num_local_experts, published ones num_experts).
        for key in (exp_key, *_EXPERT_KEYS):
            if _get(tcfg, key) is not None:
                exp_key = key
                break
        spec.num_experts = _int(cfg, exp_key, _get(tcfg, exp_key, default=0))
        spec.top_k = _int(cfg, k_key, _get(tcfg, k_key, default=0))
        spec.num_experts_field, spec.top_k_field = exp_key, k_key

    def layer_list(key: str, value: Any) -> list[int]:
        if not isinstance(value, list) or any(type(i) is not int for i in value):
            raise ConfigError(
                f"{where}: {key} is {value!r}; it must be a list of layer indices (fix the config)."
            )
        return value

    L = spec.num_layers
    if fam in ("mixtral", "gpt_oss", "phimoe", "granitemoe", "granitemoeshared"):
        setk("num_local_experts", "num_experts_per_tok")
        if fam == "phimoe":
            spec.top_k = spec.top_k or 2
        spec.moe_layers = list(range(L))
        spec.expert_intermediate_size = _int(
            cfg, "intermediate_size", _get(cfg, "intermediate_size", default=0)
        )
        spec.expert_width_field = "intermediate_size"
        spec.scoring = {
            "mixtral": "softmax",
            "phimoe": "sparsemixer",
        }.get(fam, "softmax_after_topk")
        spec.norm_topk_prob = True
        if fam == "granitemoeshared":
            spec.shared_intermediate_size = _int(
                cfg, "shared_intermediate_size", _get(cfg, "shared_intermediate_size", default=0)
            )
            spec.num_shared_experts = 1 if spec.shared_intermediate_size else 0
    elif fam in ("qwen2_moe", "qwen3_moe", "olmoe"):
        setk("num_experts", "num_experts_per_tok")
        if fam == "olmoe":
            spec.moe_layers = list(range(L))
            spec.expert_intermediate_size = _int(
                cfg, "intermediate_size", _get(cfg, "intermediate_size", default=0)
            )
            spec.expert_width_field = "intermediate_size"
        else:
            step = _int(cfg, "decoder_sparse_step", _get(cfg, "decoder_sparse_step", default=1)) or 1
            only = set(layer_list("mlp_only_layers", _get(cfg, "mlp_only_layers", default=[]) or []))
            spec.moe_layers = [
                i for i in range(L) if i not in only and spec.num_experts > 0 and (i + 1) % step == 0
            ]
            spec.expert_intermediate_size = _int(
                cfg, "moe_intermediate_size", _get(cfg, "moe_intermediate_size", default=0)
            )
            spec.expert_width_field = "moe_intermediate_size"
        if fam == "qwen2_moe":
            spec.shared_intermediate_size = _int(
                cfg,
                "shared_expert_intermediate_size",
                _get(cfg, "shared_expert_intermediate_size", default=0),
            )
            spec.num_shared_experts = 1 if spec.shared_intermediate_size else 0
        spec.scoring = "softmax"
        spec.norm_topk_prob = bool(_get(cfg, "norm_topk_prob", default=fam != "qwen2_moe"))
    elif fam in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        setk("n_routed_experts", "num_experts_per_tok")
        first = _int(cfg, "first_k_dense_replace", _get(cfg, "first_k_dense_replace", default=0))
        freq = _int(cfg, "moe_layer_freq", _get(cfg, "moe_layer_freq", default=1)) or 1
        spec.moe_layers = [i for i in range(L) if i >= first and i % freq == 0 and spec.num_experts > 0]
        spec.expert_intermediate_size = _int(
            cfg, "moe_intermediate_size", _get(cfg, "moe_intermediate_size", default=0)
        )
        spec.expert_width_field = "moe_intermediate_size"
        spec.num_shared_experts = _int(cfg, "n_shared_experts", _get(cfg, "n_shared_experts", default=0))
        spec.shared_intermediate_size = spec.expert_intermediate_size * spec.num_shared_experts
        spec.n_group = _int(cfg, "n_group", _get(cfg, "n_group", default=1)) or 1
        spec.topk_group = _int(cfg, "topk_group", _get(cfg, "topk_group", default=1)) or 1
        if fam == "deepseek_v2":
            spec.scoring = "softmax"
            spec.norm_topk_prob = False
            if _get(cfg, "topk_method", default="greedy") == "greedy":
                spec.n_group = spec.topk_group = 1
        else:
            spec.scoring = "sigmoid"
            spec.norm_topk_prob = bool(_get(cfg, "norm_topk_prob", default=True))
        spec.mtp_layers = _int(
            cfg, "num_nextn_predict_layers", _get(cfg, "num_nextn_predict_layers", default=0)
        )
    elif fam == "dbrx":
        spec.num_experts = _int(
            cfg, "ffn_config.moe_num_experts", _get(cfg, "ffn_config.moe_num_experts", default=4)
        )
        spec.top_k = _int(cfg, "ffn_config.moe_top_k", _get(cfg, "ffn_config.moe_top_k", default=1))
        spec.num_experts_field, spec.top_k_field = "ffn_config.moe_num_experts", "ffn_config.moe_top_k"
        spec.expert_intermediate_size = _int(
            cfg, "ffn_config.ffn_hidden_size", _get(cfg, "ffn_config.ffn_hidden_size", default=0)
        )
        spec.expert_width_field = "ffn_config.ffn_hidden_size"
        spec.moe_layers = list(range(L))
        spec.scoring = "softmax"
        spec.norm_topk_prob = True
    elif fam == "llama4":
        setk("num_local_experts", "num_experts_per_tok")
        layers = _get(tcfg, "moe_layers")
        if layers is None:
            step = (
                _int(cfg, "interleave_moe_layer_step", _get(tcfg, "interleave_moe_layer_step", default=1))
                or 1
            )
            layers = list(range(step - 1, L, step))
        spec.moe_layers = layer_list("moe_layers", layers)
        spec.expert_intermediate_size = _int(
            cfg, "intermediate_size", _get(tcfg, "intermediate_size", default=0)
        )
        spec.expert_width_field = "intermediate_size"
        spec.shared_intermediate_size = spec.expert_intermediate_size
        spec.num_shared_experts = 1
        spec.scoring = "sigmoid"
        spec.norm_topk_prob = False
    elif fam == "jamba":
        setk("num_experts", "num_experts_per_tok")
        period = _int(cfg, "expert_layer_period", _get(cfg, "expert_layer_period", default=2)) or 1
        offset = _int(cfg, "expert_layer_offset", _get(cfg, "expert_layer_offset", default=1))
        spec.moe_layers = [i for i in range(L) if i % period == offset] if spec.num_experts > 1 else []
        spec.expert_intermediate_size = _int(
            cfg, "intermediate_size", _get(cfg, "intermediate_size", default=0)
        )
        spec.expert_width_field = "intermediate_size"
        spec.scoring = "softmax"
        spec.norm_topk_prob = False
    elif fam == "switch_transformers":
        spec.num_experts = _int(cfg, "num_experts", _get(cfg, "num_experts", default=8))
        spec.top_k = 1
        spec.num_experts_field, spec.top_k_field = "num_experts", None
        enc = _int(cfg, "num_layers", _get(cfg, "num_layers", default=12))
        dec = _int(cfg, "num_decoder_layers", _get(cfg, "num_decoder_layers", default=enc))
        spec.num_layers = enc + dec
        spec.encoder_layers = enc

        def sparse(n: int, stack: str) -> list[int]:
            # As transformers does: a saved *_sparse_step wins, else the step comes from
            # num_sparse_*_layers (default 3); block i is sparse when i % step == 1, every
            # block when step == 1, none when step == 0.
            if _get(cfg, f"{stack}_sparse_step") is not None:
                step = _int(cfg, f"{stack}_sparse_step", _get(cfg, f"{stack}_sparse_step"))
            else:
                n_sparse = _int(
                    cfg, f"num_sparse_{stack}_layers", _get(cfg, f"num_sparse_{stack}_layers", default=3)
                )
                step = n // n_sparse if n_sparse > 0 else n
            return [i for i in range(n) if step > 0 and (i % step == 1 or step == 1)]

        # encoder blocks are numbered 0..enc-1, decoder blocks enc..enc+dec-1 in moescope's layer index
        spec.moe_layers = sparse(enc, "encoder") + [enc + i for i in sparse(dec, "decoder")]
        spec.expert_intermediate_size = _int(cfg, "d_ff", _get(cfg, "d_ff", default=0))
        spec.expert_width_field = "d_ff"
        spec.scoring = "softmax"
        spec.norm_topk_prob = False
    elif fam == "moescope_spec":
        setk("num_experts", "num_experts_per_tok")
        spec.moe_layers = layer_list("moe_layers", cfg.get("moe_layers", []))
        spec.expert_intermediate_size = _int(
            cfg, "moe_intermediate_size", cfg.get("moe_intermediate_size", 0)
        )
        spec.expert_width_field = "moe_intermediate_size"
        spec.num_shared_experts = _int(cfg, "n_shared_experts", cfg.get("n_shared_experts", 0))
        spec.shared_intermediate_size = spec.num_shared_experts * spec.expert_intermediate_size
        spec.encoder_layers = _int(cfg, "encoder_layers", cfg.get("encoder_layers", 0))
        spec.scoring = "softmax"
    else:
        spec.known = fam in _DENSE_FAMILIES
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


_DENSE_FAMILIES = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gpt2",
    "gemma",
    "gemma2",
    "phi3",
    "olmo",
    "olmo2",
    "granite",
    "gpt_neox",
    "falcon",
    "starcoder2",
}

# ---------------------------------------------------------------------------------------
# Tensor classification
# ---------------------------------------------------------------------------------------

# At most 18 digits: a layer or expert number is an int64, and int() of a longer run of digits
# (a crafted header) would be slow or refused by Python's int-string limit.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d{1,18})\.")
_EXPERT_RE = re.compile(r"\.experts\.(?:expert_)?(\d{1,18})\.")
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


def layer_index(name: str, spec: MoESpec) -> int | None:
    """Decoder layer index in moescope's numbering (switch: decoder blocks after encoder)."""
    m = _LAYER_RE.search(name)
    if not m:
        return None
    idx = int(m.group(1))
    if spec.family == "switch_transformers" and name.startswith("decoder."):
        return idx + spec.encoder_layers
    return idx


def classify(name: str, spec: MoESpec, ndim: int = 2) -> TensorClass:
    """Put one tensor in a component.

    Args:
        name: tensor name as stored (per-expert or fused layout, original or renamed).
        spec: the checkpoint's :class:`MoESpec`.
        ndim: number of dimensions (1-D tensors are never matmul weights).

    Returns:
        The tensor's :class:`TensorClass`.
    """
    lm = _LAYER_RE.search(name)
    layer = expert = None
    key = name
    if lm is not None:
        ls, le = lm.span(1)
        layer = int(name[ls:le])
        if spec.family == "switch_transformers" and name.startswith("decoder."):
            layer += spec.encoder_layers
        em = _EXPERT_RE.search(name, le - 1)
        if em is not None:
            es, ee = em.span(1)
            expert = int(name[es:ee])
            key = f"{name[:ls]}#{name[le:es]}#{name[ee:]}"
        else:
            key = f"{name[:ls]}#{name[le:]}"
    # A checkpoint has ~100k tensors but a few dozen name shapes: classify each shape once,
    # with the layer and expert numbers blanked out (cached).
    moe = spec.moe_set
    mtp_layer = layer is not None and layer >= spec.num_layers > 0 and spec.family != "switch_transformers"
    in_moe = layer is None or not moe or layer in moe
    component, is_param, factor, matmul = _classify_shape(key, ndim >= 2, layer is None, in_moe, mtp_layer)
    return TensorClass(
        component, layer, expert if component == "routed_experts" else None, is_param, factor, matmul
    )


@functools.lru_cache(maxsize=65536)
def _classify_shape(
    name: str, multi_dim: bool, outside_layers: bool, router_ok: bool, mtp_layer: bool
) -> tuple[str, bool, int, bool]:
    """(component, is_param, param_factor, is_matmul) of a name with numbers blanked."""
    is_param = not _NOT_PARAM_RE.search(name)
    factor = 2 if name.endswith("_blocks") else 1
    base = name[: -len("_blocks")] if factor == 2 else name
    lname = base.lower()
    is_bias = lname.endswith(".bias") or lname.endswith("_bias")
    matmul = is_param and multi_dim and not is_bias

    def tc(component: str, mm: bool = matmul) -> tuple[str, bool, int, bool]:
        return component, is_param, factor, mm and component not in ("embedding", "vision", "mtp")

    if _VISION_RE.search(lname):
        return tc("vision")
    if lname.startswith("mtp.") or ".mtp." in lname or mtp_layer:
        return tc("mtp")
    if "shared_expert" in lname or ".shared_mlp." in lname:
        return tc("shared_experts")
    if ".experts." in lname or lname.endswith(".experts"):
        return tc("routed_experts")
    if (_ROUTER_RE.search(lname) or _ROUTER2_RE.search(lname)) and router_ok:
        return tc("router")
    if _EMBED_RE.search(lname) and outside_layers:
        return tc("embedding", mm=False)
    if _HEAD_RE.search(lname) and outside_layers:
        return tc("lm_head")
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
    r"(embed_tokens|\.wte\.|\.wpe\.|^wte\.|^wpe\.|word_embeddings|embed_in\.|tok_embeddings|^shared\.weight|"
    r"\.embed_positions\.|position_embeddings)"
)
_HEAD_RE = re.compile(r"(^|\.)(lm_head|embed_out|output)\.(weight|bias)$")
_ATTN_RE = re.compile(
    r"(self_attn|\.attn\.|\.attention\.|mamba|\.mixer\.|norm_attn_norm\.attn|\.layer\.0\.SelfAttention|"
    r"EncDecAttention|relative_attention)"
)
_NORM_RE = re.compile(r"(norm|ln_\d|ln_f|\.ln\.|layer_norm)")
_MLP_RE = re.compile(r"\.(mlp|feed_forward|ffn|DenseReluDense|fc\d|c_fc|dense_h_to_4h|dense_4h_to_h)")
