"""Validate a config before any arithmetic, so bad input gets one clean error, never odd numbers.

``moescope params`` turns config fields into tensor shapes, layer loops and FLOP counts. A
negative width, a string where a count belongs, ``num_hidden_layers: 1e12`` or an MoE config
with zero experts would otherwise print impossible numbers, try to allocate terabytes, or
end in a traceback. :func:`validate_config` runs first and raises one
:class:`~moescope.errors.ConfigError` that names the file, the field, the bad value and the
fix, e.g. ``cfg.json: num_local_experts is 0; a MoE config needs at least 1 expert (fix the
config).``

What it checks (fields that are absent or ``null`` are left to the family's defaults):

- every known count or width is a whole number (not a float, string or boolean) within
  sane bounds (:data:`MAX_LAYERS`, :data:`MAX_EXPERTS`, :data:`MAX_HIDDEN`...);
- flags moescope reads (``tie_word_embeddings``, ``norm_topk_prob``...) are booleans;
- head counts: ``num_attention_heads % num_key_value_heads == 0``, and the hidden size is
  a multiple of the head count where the family derives ``head_dim`` from it;
- MoE families: at least one routed expert, ``1 <= top_k <= num_experts``, group-limited
  routing groups that fit, MoE / dense layer index lists in range, periods above offsets;
- a sliding window, when sliding attention is on, of at least one token;
- DBRX's nested ``ffn_config`` / ``attn_config`` and multimodal ``text_config`` alike.

This module only reads the dict; it imports nothing heavy.
"""

from __future__ import annotations

import json
from typing import Any

from moescope.arch.moe import MOE_FAMILIES, family_of
from moescope.errors import ConfigError
from moescope.families import DENSE_FAMILIES, EXPERT_COUNT_KEYS
from moescope.families import get as _get

#: a decoder stack deeper than this is not a real model (and would take minutes to list)
MAX_LAYERS = 10_000
#: routed experts per MoE layer
MAX_EXPERTS = 100_000
#: hidden size, head dimension, LoRA ranks
MAX_HIDDEN = 1_000_000
#: MLP and expert widths
MAX_WIDTH = 10_000_000
#: attention heads
MAX_HEADS = 100_000
#: vocabulary entries
MAX_VOCAB = 100_000_000
#: positions and sliding windows (2^32 tokens)
MAX_POSITIONS = 1 << 32
#: routed experts over all layers (layers x experts); a meta-device build makes one module each
MAX_EXPERT_INSTANCES = 10_000_000

FIX = "(fix the config)"

_L = ("layer count", 1, MAX_LAYERS)
_H = ("hidden size", 1, MAX_HIDDEN)
_W = ("MLP width", 1, MAX_WIDTH)
_HEADS = ("head count", 1, MAX_HEADS)
_E = ("expert count", 0, MAX_EXPERTS)
_K = ("top-k", 0, MAX_EXPERTS)
_STEP = ("layer step", 1, MAX_LAYERS)
_OFFSET = ("layer offset", 0, MAX_LAYERS)

#: integer fields moescope (or transformers' meta-device build) turns into shapes or loops:
#: field -> (what it is, smallest, largest)
INT_FIELDS: dict[str, tuple[str, int, int]] = {
    "num_hidden_layers": _L,
    "n_layer": _L,
    "n_layers": _L,
    "num_layers": _L,
    "num_decoder_layers": ("decoder layer count", 0, MAX_LAYERS),
    "encoder_layers": ("encoder layer count", 0, MAX_LAYERS),
    "decoder_layers": ("decoder layer count", 0, MAX_LAYERS),
    "num_nextn_predict_layers": ("MTP layer count", 0, MAX_LAYERS),
    "hidden_size": _H,
    "d_model": _H,
    "n_embd": _H,
    "intermediate_size": _W,
    "intermediate_size_mlp": _W,
    "d_ff": _W,
    "encoder_ffn_dim": _W,
    "decoder_ffn_dim": _W,
    "n_inner": _W,
    "moe_intermediate_size": ("expert width", 1, MAX_WIDTH),
    "ffn_hidden_size": ("expert width", 1, MAX_WIDTH),
    "shared_expert_intermediate_size": ("shared-expert width", 0, MAX_WIDTH),
    "shared_intermediate_size": ("shared-expert width", 0, MAX_WIDTH),
    "vocab_size": ("vocabulary size", 1, MAX_VOCAB),
    "num_attention_heads": _HEADS,
    "n_heads": _HEADS,
    "n_head": _HEADS,
    "num_heads": _HEADS,
    "encoder_attention_heads": _HEADS,
    "decoder_attention_heads": _HEADS,
    "num_key_value_heads": ("key/value head count", 1, MAX_HEADS),
    "kv_n_heads": ("key/value head count", 1, MAX_HEADS),
    "head_dim": ("head dimension", 1, MAX_HIDDEN),
    "d_kv": ("head dimension", 1, MAX_HIDDEN),
    "v_head_dim": ("value head dimension", 1, MAX_HIDDEN),
    "qk_nope_head_dim": ("head dimension", 0, MAX_HIDDEN),
    "qk_rope_head_dim": ("RoPE head dimension", 0, MAX_HIDDEN),
    "kv_lora_rank": ("KV LoRA rank", 1, MAX_HIDDEN),
    "q_lora_rank": ("query LoRA rank", 0, MAX_HIDDEN),
    "sliding_window": ("sliding window", 0, MAX_POSITIONS),
    "max_position_embeddings": ("position count", 1, MAX_POSITIONS),
    "n_positions": ("position count", 1, MAX_POSITIONS),
    "position_embeddings": ("position count", 0, MAX_POSITIONS),
    "max_window_layers": ("layer count", 0, MAX_POSITIONS),
    "num_local_experts": _E,
    "num_experts": _E,
    "n_routed_experts": _E,
    "moe_num_experts": _E,
    "num_experts_per_tok": _K,
    "moe_top_k": _K,
    "experts_per_token": _K,
    "num_selected_experts": _K,
    "n_shared_experts": ("shared-expert count", 0, MAX_EXPERTS),
    "n_group": ("expert group count", 1, MAX_EXPERTS),
    "topk_group": ("expert group count", 1, MAX_EXPERTS),
    "decoder_sparse_step": _STEP,
    "encoder_sparse_step": _STEP,
    "moe_layer_freq": _STEP,
    "interleave_moe_layer_step": _STEP,
    "expert_layer_period": ("layer period", 1, MAX_LAYERS),
    "attn_layer_period": ("layer period", 1, MAX_LAYERS),
    "expert_layer_offset": _OFFSET,
    "attn_layer_offset": _OFFSET,
    "first_k_dense_replace": ("dense layer count", 0, MAX_LAYERS),
    "num_sparse_encoder_layers": ("sparse layer count", 0, MAX_LAYERS),
    "num_sparse_decoder_layers": ("sparse layer count", 0, MAX_LAYERS),
}

#: flags moescope reads; a string such as "false" would otherwise count as true
BOOL_FIELDS = (
    "tie_word_embeddings",
    "norm_topk_prob",
    "attention_bias",
    "use_sliding_window",
    "use_qk_norm",
    "lm_head_bias",
)
_SPEC_BOOL_FIELDS = ("gated_mlp", "experts_gated", "bias")

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
_HIDDEN_KEYS = ("hidden_size", "d_model", "n_embd")
_HEAD_KEYS = ("num_attention_heads", "n_heads", "n_head", "num_heads")

#: MoE family -> (expert-count field, its default, top-k field, its default) as moe_spec reads them
_MOE_FIELDS: dict[str, tuple[str, int | None, str | None, int | None]] = {
    **{f: ("num_local_experts", None, "num_experts_per_tok", None) for f in ("mixtral", "gpt_oss")},
    "phimoe": ("num_local_experts", None, "num_experts_per_tok", 2),
    "granitemoe": ("num_local_experts", None, "num_experts_per_tok", None),
    "granitemoeshared": ("num_local_experts", None, "num_experts_per_tok", None),
    "llama4": ("num_local_experts", None, "num_experts_per_tok", None),
    **{f: ("num_experts", None, "num_experts_per_tok", None) for f in ("qwen2_moe", "qwen3_moe", "olmoe")},
    "jamba": ("num_experts", None, "num_experts_per_tok", None),
    **{
        f: ("n_routed_experts", None, "num_experts_per_tok", None)
        for f in ("deepseek_v2", "deepseek_v3", "glm4_moe")
    },
    "dbrx": ("ffn_config.moe_num_experts", 4, "ffn_config.moe_top_k", 1),
    "switch_transformers": ("num_experts", 8, None, 1),
    "nllb_moe": ("num_experts", 128, None, 2),
}

#: families that derive head_dim = hidden // heads when head_dim is not given
_DERIVED_HEAD_DIM = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "glm4_moe",
    "gpt_oss",
    "phimoe",
    "granitemoe",
    "granitemoeshared",
    "granite",
    "llama4",
    "jamba",
    "dbrx",
    "gpt2",
    "moescope_spec",
}


#: families whose fields moescope reads itself
KNOWN_FAMILIES = frozenset(MOE_FAMILIES) | frozenset(DENSE_FAMILIES) | {"moescope_spec"}


def show(value: Any, limit: int = 60) -> str:
    """A value as JSON text, shortened: what the user wrote, for error messages."""
    try:
        text = json.dumps(value, default=repr)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_int(value: Any, field: str, where: str, noun: str, lo: int, hi: int, fix: str = FIX) -> int:
    """``value`` as an int in ``[lo, hi]``, or a :class:`ConfigError` naming ``field`` and the fix.

    Floats (even whole ones such as ``1e12``), strings and booleans are refused: transformers
    would fail on them too, and ``"32"`` or ``true`` are typos, not counts.
    """
    if type(value) is not int:
        kind = {bool: "true/false", float: "a number with a decimal point", str: "a string"}.get(
            type(value), f"a JSON {type(value).__name__}"
        )
        raise ConfigError(
            f"{where}: {field} is {show(value)}; the {noun} must be a whole number, not {kind} {fix}."
        )
    if value < lo:
        need = "must not be negative" if lo == 0 else f"must be at least {lo}"
        raise ConfigError(f"{where}: {field} is {value}; the {noun} {need} {fix}.")
    if value > hi:
        raise ConfigError(
            f"{where}: {field} is {value}; the {noun} must be at most {hi:,}, no real model has more {fix}."
        )
    return value


def check_bool(value: Any, field: str, where: str, fix: str = FIX) -> bool:
    """``value`` if it is a JSON boolean, else a :class:`ConfigError`."""
    if type(value) is not bool:
        raise ConfigError(f"{where}: {field} is {show(value)}; write true or false {fix}.")
    return value


def check_index_list(value: Any, field: str, where: str, num_layers: int | None, fix: str = FIX) -> list[int]:
    """A list of layer indices, each a whole number in ``[0, num_layers)`` when that is known."""
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {field} is {show(value)}; it must be a list of layer indices {fix}.")
    for item in value:
        if type(item) is not int:
            raise ConfigError(
                f"{where}: {field} holds {show(item)}; layer indices must be whole numbers {fix}."
            )
        if item < 0 or (num_layers is not None and item >= num_layers):
            span = f"0-{num_layers - 1}" if num_layers else "none"
            raise ConfigError(
                f"{where}: {field} holds layer {item} but the model has {num_layers} layers ({span}); "
                f"list layer indices in range {fix}."
            )
    return value


def _first(scope: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, int] | tuple[None, None]:
    """The first of ``keys`` that holds a whole number (the relations below compare only those:
    a family moescope does not know may use these names for something else)."""
    for key in keys:
        if type(scope.get(key)) is int:
            return key, scope[key]
    return None, None


def _scopes(cfg: dict[str, Any], fam: str, where: str) -> list[tuple[str, dict[str, Any]]]:
    """(prefix, dict) for the config and the nested dicts moescope reads."""
    scopes: list[tuple[str, dict[str, Any]]] = [("", cfg)]
    nested = ["text_config"] + (["ffn_config", "attn_config"] if fam == "dbrx" else [])
    for key in nested:
        sub = cfg.get(key)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise ConfigError(f"{where}: {key} is {show(sub)}; it must be a JSON object {FIX}.")
        scopes.append((f"{key}.", sub))
    return scopes


def _check_identity(cfg: dict[str, Any], where: str) -> None:
    mt = cfg.get("model_type")
    if mt is not None and not isinstance(mt, str):
        raise ConfigError(f'{where}: model_type is {show(mt)}; it must be a string such as "mixtral" {FIX}.')
    archs = cfg.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ConfigError(
            f"{where}: architectures is {show(archs)}; it must be a list of class names such as "
            f'["MixtralForCausalLM"] {FIX}.'
        )


def _check_fields(scope: dict[str, Any], prefix: str, fam: str, where: str) -> None:
    # A family moescope does not know may give a field another shape (per-layer lists in some
    # architectures); its scalars are still checked, as transformers builds shapes from them.
    known = fam in KNOWN_FAMILIES
    for key, (noun, lo, hi) in INT_FIELDS.items():
        value = scope.get(key)
        if not known and key == "head_dim" and value == 0:
            continue  # some families write 0 for "derived from the hidden size and heads" (glm5_next)
        if value is not None and (known or not isinstance(value, (list, dict))):
            check_int(value, prefix + key, where, noun, lo, hi)
    bools = BOOL_FIELDS + (_SPEC_BOOL_FIELDS if fam == "moescope_spec" else ())
    for key in bools:
        value = scope.get(key)
        if value is not None:
            check_bool(value, prefix + key, where)


def _num_layers(scope: dict[str, Any]) -> int | None:
    _, n = _first(scope, _LAYER_KEYS)
    return n


def _check_attention(scope: dict[str, Any], prefix: str, fam: str, where: str) -> None:
    hkey, hidden = _first(scope, _HIDDEN_KEYS)
    qkey, heads = _first(scope, _HEAD_KEYS)
    attn = scope.get("attn_config")
    kv_scope: dict[str, Any] = attn if fam == "dbrx" and isinstance(attn, dict) else scope
    kvkey, kv = _first(kv_scope, ("num_key_value_heads", "kv_n_heads"))
    if kvkey is not None and kv_scope is not scope:
        kvkey = f"attn_config.{kvkey}"
    if heads is not None and kv is not None and heads % kv:
        raise ConfigError(
            f"{where}: {prefix}{kvkey} is {kv} but {prefix}{qkey} ({heads}) is not a multiple of it; "
            f"each key/value head must serve the same number of query heads {FIX}."
        )
    head_dim = scope.get("head_dim")
    if fam in _DERIVED_HEAD_DIM and head_dim is None and hidden is not None and heads is not None:
        if hidden % heads:
            raise ConfigError(
                f"{where}: {prefix}{hkey} ({hidden}) is not a multiple of {prefix}{qkey} ({heads}) and "
                f"there is no head_dim; set head_dim or a head count that divides the hidden size {FIX}."
            )


def _window_in_use(scope: dict[str, Any], fam: str) -> bool:
    types = scope.get("layer_types")
    if isinstance(types, list) and "sliding_attention" in types:
        return True
    use = scope.get("use_sliding_window")
    if fam in ("mistral", "mixtral", "phimoe"):
        return use is not False
    return use is True


def _check_layers(scope: dict[str, Any], prefix: str, fam: str, where: str) -> None:
    n = _num_layers(scope)
    types = scope.get("layer_types")
    if types is not None:
        if not (isinstance(types, list) and all(isinstance(t, str) for t in types)):
            raise ConfigError(
                f"{where}: {prefix}layer_types is {show(types)}; it must be a list of strings such as "
                f'"full_attention" {FIX}.'
            )
        if n is not None and len(types) != n:
            raise ConfigError(
                f"{where}: {prefix}layer_types has {len(types)} entr{'y' if len(types) == 1 else 'ies'} but "
                f"the model has {n} layers; "
                f"give one type per layer {FIX}."
            )
    if scope.get("sliding_window") == 0 and _window_in_use(scope, fam):
        raise ConfigError(
            f"{where}: {prefix}sliding_window is 0 but sliding attention is on; set a window of at least "
            f"1 token, or null to turn it off {FIX}."
        )
    for pkey, okey, pdef, odef in (
        ("expert_layer_period", "expert_layer_offset", 2, 1),
        ("attn_layer_period", "attn_layer_offset", 8, 4),
    ):
        if fam != "jamba" or (pkey not in scope and okey not in scope):
            continue
        period = int(scope[pkey]) if scope.get(pkey) is not None else pdef
        offset = int(scope[okey]) if scope.get(okey) is not None else odef
        if offset >= period:
            raise ConfigError(
                f"{where}: {prefix}{okey} is {offset} but {prefix}{pkey} is {period}; the offset must be "
                f"below the period, or no layer matches {FIX}."
            )
    if fam in ("qwen2_moe", "qwen3_moe") and scope.get("mlp_only_layers") is not None:
        check_index_list(scope["mlp_only_layers"], prefix + "mlp_only_layers", where, n)
    if fam in ("llama4", "moescope_spec") and scope.get("moe_layers") is not None:
        check_index_list(scope["moe_layers"], prefix + "moe_layers", where, n)
    first = scope.get("first_k_dense_replace")
    if (
        fam in ("deepseek_v2", "deepseek_v3", "glm4_moe")
        and first is not None
        and n is not None
        and first > n
    ):
        raise ConfigError(
            f"{where}: {prefix}first_k_dense_replace is {first} but the model has {n} layers; it counts "
            f"the leading dense layers, at most {n} {FIX}."
        )


def _check_moe(cfg: dict[str, Any], fam: str, where: str) -> None:
    fields = _MOE_FIELDS.get(fam)
    if fields is None:
        return
    exp_key, exp_default, k_key, k_default = fields
    text = cfg.get("text_config")
    tcfg: dict[str, Any] = text if fam == "llama4" and isinstance(text, dict) else cfg
    prefix = "text_config." if tcfg is not cfg else ""
    # transformers' attribute_map aliases: a saved config may hold any of the expert-count names
    keys = (exp_key,) if "." in exp_key else (exp_key, *EXPERT_COUNT_KEYS)
    present = [(k, _get(tcfg, k)) for k in keys if _get(tcfg, k) is not None]
    for key, value in present:
        if value < 1:
            raise ConfigError(
                f"{where}: {prefix}{key} is {value}; a MoE config needs at least 1 expert {FIX}."
            )
    if present:
        exp_key, experts = present[0]
    elif exp_default is not None:
        experts = exp_default
    else:
        raise ConfigError(
            f"{where}: has no {prefix}{exp_key}; a {fam} config needs its routed-expert count {FIX}."
        )
    k = _get(tcfg, k_key) if k_key else None
    if k is None:
        k = k_default
    if k is None:
        if experts > 1:
            raise ConfigError(
                f"{where}: has no {prefix}{k_key}; a {fam} config with {experts} experts needs the "
                f"number of experts each token is routed to {FIX}."
            )
    elif k < 1:
        raise ConfigError(
            f"{where}: {prefix}{k_key} is {k}; each token must be routed to at least 1 expert "
            f"(between 1 and {experts}) {FIX}."
        )
    elif k > experts:
        raise ConfigError(
            f"{where}: {prefix}{k_key} is {k}: the config routes each token to {k} experts but has only "
            f"{experts} ({prefix}{exp_key}); top-k must be between 1 and {experts} {FIX}."
        )
    layers = _num_layers(tcfg)
    if fam == "switch_transformers":
        layers = (cfg.get("num_layers") or 12) + (
            cfg.get("num_decoder_layers") or cfg.get("num_layers") or 12
        )
    elif fam == "nllb_moe":
        layers = (cfg.get("encoder_layers") or 12) + (cfg.get("decoder_layers") or 12)
    if layers is not None and layers * experts > MAX_EXPERT_INSTANCES:
        raise ConfigError(
            f"{where}: {layers} layers x {experts} experts ({prefix}{exp_key}) is more than "
            f"{MAX_EXPERT_INSTANCES:,} routed experts in all; that is not a real model {FIX}."
        )
    if fam in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        n_group = cfg.get("n_group") or 1
        topk_group = cfg.get("topk_group") or 1
        greedy = fam == "deepseek_v2" and (cfg.get("topk_method") or "greedy") == "greedy"
        if greedy:
            return
        if topk_group > n_group:
            raise ConfigError(
                f"{where}: topk_group is {topk_group} but n_group is {n_group}; a token can use at most "
                f"all {n_group} expert groups {FIX}."
            )
        if experts % n_group:
            raise ConfigError(
                f"{where}: {exp_key} ({experts}) is not a multiple of n_group ({n_group}); the experts "
                f"must split into equal groups {FIX}."
            )


def validate_config(cfg: Any, where: str = "config") -> None:
    """Check a config dict's dimensions before any accounting.

    Args:
        cfg: a transformers config as a dict (``json.load`` of ``config.json``), or a
            normalised moescope spec.
        where: the file it came from, for the error message.

    Raises:
        ConfigError: one line naming ``where``, the field, the bad value and the fix.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {show(cfg)} {FIX}.")
    _check_identity(cfg, where)
    fam = family_of(cfg)
    scopes = _scopes(cfg, fam, where)
    for prefix, scope in scopes:
        _check_fields(scope, prefix, fam, where)
    for prefix, scope in scopes:
        if prefix in ("", "text_config."):
            _check_attention(scope, prefix, fam, where)
            _check_layers(scope, prefix, fam, where)
    _check_moe(cfg, fam, where)
    if fam == "moescope_spec":
        norm = cfg.get("norm", "rmsnorm")
        if norm not in ("rmsnorm", "layernorm"):
            raise ConfigError(f'{where}: norm is {show(norm)}; write "rmsnorm" or "layernorm" {FIX}.')
        enc, n = cfg.get("encoder_layers"), _num_layers(cfg)
        if enc is not None and n is not None and enc > n:
            raise ConfigError(f"{where}: encoder_layers ({enc}) exceeds num_hidden_layers ({n}) {FIX}.")
