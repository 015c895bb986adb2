"""Census of the MoE families of the installed transformers, and tiny models of each.

A helper module for tests (not a test file). ``moe_families()`` lists, at call time, the
model types of the installed transformers that have a Mixture-of-Experts: those whose
modeling source uses the ``@use_experts_implementation`` decorator, plus the two
encoder-decoder families ``switch_transformers`` and ``nllb-moe``. A model directory can
serve several model types (``aria`` and ``aria_text``); each one counts whose config class
lives in that directory, declares an expert count (itself or in a nested sub-config) and
that an Auto model class can build (sub-configs such as ``qwen3_omni_moe_text`` cannot).

``tiny_config(model_type)`` shrinks the config class's defaults generically: attributes are
matched by name (hidden sizes, layer counts, heads, widths, expert counts, per-layer lists,
token ids, nested sub-configs), then ``_OVERRIDES`` patches the few families the generic
rules get wrong. ``build(model_type)`` makes the tiny model (float32, CPU, eval mode) with
the class ``model_class(config)`` picks. ``SKIP`` names the families that cannot be built
or run even tiny, with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import re
from typing import Any

import torch
import transformers
from transformers import PretrainedConfig
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

#: The two MoE families that do not use ``@use_experts_implementation`` (capacity-limited
#: top-1/top-2 routing in an encoder-decoder). nllb_moe's model type has a hyphen.
ENCODER_DECODER_MOE = ("switch_transformers", "nllb-moe")

HIDDEN = 64
HEADS = 4
KV_HEADS = 4  # = HEADS: MLA families and several validators demand kv heads == heads
HEAD_DIM = 16
DENSE_WIDTH = 48  # dense MLP intermediate size
EXPERT_WIDTH = 24  # routed expert intermediate size
SHARED_WIDTH = 40  # shared expert intermediate size
EXPERTS = 8
TOP_K = 2
VOCAB = 112
MAX_POSITIONS = 128
MAX_PARAMS = 20_000_000  # build() refuses bigger "tiny" models (memory guard)

#: Families that cannot be built or run even tiny, with the reason.
SKIP: dict[str, str] = {}

_EXPERT_COUNT = re.compile(r"^(num_experts|n_routed_experts|num_local_experts|moe_num_experts)$")


@functools.cache
def _config_dirs() -> dict[str, str]:
    """Config class name -> model directory holding it, by reading configuration sources."""
    root = pathlib.Path(transformers.__file__).parent / "models"
    out: dict[str, str] = {}
    for path in sorted(root.glob("*/configuration_*.py")):
        for match in re.finditer(r"^class (\w+)\(", path.read_text(encoding="utf-8"), re.M):
            out.setdefault(match.group(1), path.parent.name)
    return out


def moe_directories() -> list[str]:
    """Model directories whose modeling source uses ``use_experts_implementation``."""
    root = pathlib.Path(transformers.__file__).parent / "models"
    found = {
        path.parent.name
        for path in root.glob("*/modeling_*.py")
        if "use_experts_implementation" in path.read_text(encoding="utf-8")
    }
    return sorted(found | {"switch_transformers", "nllb_moe"})


def _declares_experts(config: PretrainedConfig) -> bool:
    """Whether the config or a nested sub-config has an expert-count attribute."""

    def walk(d: dict[str, Any]) -> bool:
        for key, value in d.items():
            if isinstance(key, str) and _EXPERT_COUNT.match(key):
                return True
            if isinstance(value, dict) and walk(value):
                return True
        return False

    return walk(config.to_dict())


def _auto_kinds(model_type: str) -> list[str]:
    table = [
        ("causal", modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
        ("image_text", modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES),
        ("seq2seq", modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
        ("base", modeling_auto.MODEL_MAPPING_NAMES),
    ]
    return [kind for kind, names in table if model_type in names]


def moe_families() -> list[str]:
    """Model types of the installed transformers that have a MoE, sorted."""
    dirs = set(moe_directories())
    where = _config_dirs()
    out = []
    for model_type, class_name in CONFIG_MAPPING_NAMES.items():
        if where.get(class_name) not in dirs or not _auto_kinds(model_type):
            continue
        if _declares_experts(CONFIG_MAPPING[model_type]()):
            out.append(model_type)
    return sorted(out)


# ---------------------------------------------------------------- tiny configs

#: Values for MoE fields whose class default is None (dots1, deepseek_v2, gemma4, ...).
_NONE_FILL: dict[str, int] = {
    "n_routed_experts": EXPERTS,
    "num_experts": EXPERTS,
    "num_local_experts": EXPERTS,
    "num_experts_per_tok": TOP_K,
    "top_k_experts": TOP_K,
    "moe_intermediate_size": EXPERT_WIDTH,
    "n_shared_experts": 1,
    "head_dim": HEAD_DIM,
}


def _layer_count_key(d: dict[str, Any]) -> str | None:
    for key in ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "depth", "num_blocks"):
        if isinstance(d.get(key), int):
            return key
    return None


def _choose_layers(d: dict[str, Any], n_layers: int, want: int) -> list[int]:
    """Original layer indices to keep: the first layer of every distinct combination of the
    per-layer lists (so each layer type survives), filled up to ``want`` from the tail."""
    lists = [v for k, v in d.items() if isinstance(v, list) and len(v) == n_layers and n_layers > 1]
    chosen: list[int] = []
    seen: set[tuple[Any, ...]] = set()
    for i in range(n_layers):
        combo = tuple(str(v[i]) for v in lists)
        if combo not in seen:
            seen.add(combo)
            chosen.append(i)
    nxt = chosen[-1] + 1 if chosen else 0
    while len(chosen) < want and nxt < n_layers:
        chosen.append(nxt)
        nxt += 1
    return sorted(chosen)[: max(want, 6)]


def _scale_section(section: list[int], total: int) -> list[int]:
    """Scale an mrope-like section list so that it sums to ``total``."""
    old = sum(section) or 1
    out = [max(1, math.floor(s * total / old)) for s in section]
    out[0] += total - sum(out)
    return out


def _shrink_rope(rope: dict[str, Any], head_dim: int) -> dict[str, Any]:
    rope = dict(rope)
    for key in ("mrope_section", "mrope_sections"):
        if isinstance(rope.get(key), list):
            rope[key] = _scale_section(rope[key], head_dim // 2)
    return rope


def _width(key: str) -> int:
    if "shared" in key or "share_" in key:
        return SHARED_WIDTH
    if "moe" in key or "expert" in key:
        return EXPERT_WIDTH
    return DENSE_WIDTH


def _shrink(cls: type[PretrainedConfig], d: dict[str, Any], text: bool) -> dict[str, Any]:
    """The keyword arguments that shrink the defaults ``d`` of config class ``cls``."""
    out: dict[str, Any] = {}
    layer_key = _layer_count_key(d)
    n_layers = d[layer_key] if layer_key else 0
    dense_prefix = (
        any(
            isinstance(d.get(k), int) and d[k] > 0
            for k in ("first_k_dense_replace", "num_dense_layers", "num_dense_blocks")
        )
        or bool(d.get("mlp_only_layers"))
        or (d.get("moe_layer_start_index") or 0) > 0
    )
    want = (3 if dense_prefix else 2) if text else 1
    keep = _choose_layers(d, n_layers, want) if n_layers else []
    new_layers = len(keep) if n_layers else 0
    moe = any(isinstance(k, str) and _EXPERT_COUNT.match(k) for k in d)
    sliding = any(isinstance(v, list) and any("sliding" in str(x) for x in v) for v in d.values())
    for key, value in d.items():
        if key in getattr(cls, "sub_configs", {}) or key.endswith("_config"):
            continue
        if isinstance(value, bool):
            continue
        if value is None:
            if key in _NONE_FILL and (moe or key == "head_dim"):
                out[key] = _NONE_FILL[key]
            elif key == "sliding_window" and sliding:
                out[key] = 16
            continue
        # per-layer lists (of layer kinds, not of per-stage sizes): keep the chosen layers
        per_layer = isinstance(value, list) and n_layers > 1 and len(value) == n_layers
        if per_layer and not all(isinstance(v, int) for v in value):
            out[key] = [value[i] for i in keep]
            continue
        if key == layer_key:
            out[key] = new_layers
        elif key in (
            "num_hidden_layers",
            "num_layers",
            "num_decoder_layers",
            "encoder_layers",
            "decoder_layers",
        ):
            out[key] = new_layers or 2
        elif key in (
            "hidden_size",
            "d_model",
            "n_embd",
            "embed_dim",
            "text_hidden_size",
            "out_hidden_size",
            "moe_hidden_size",
            "projector_hidden_size",
        ):
            if isinstance(value, int):
                out[key] = HIDDEN
        elif key in ("index_n_heads", "index_num_heads") and isinstance(value, int):
            out[key] = 1
        elif key.endswith(("num_attention_heads", "num_heads", "attention_heads")) or key == "n_head":
            if isinstance(value, int):
                out[key] = HEADS
        elif key.endswith(("num_key_value_heads", "num_kv_heads", "n_kv_heads")) or key in (
            "multi_query_group_num",
        ):
            out[key] = KV_HEADS
        elif key.endswith("head_dim") and key != "qk_rope_head_dim" or key in ("d_kv", "kv_channels"):
            if isinstance(value, int):
                out[key] = HEAD_DIM
        elif key in ("qk_rope_head_dim",):
            out[key] = 8
        elif key in ("kv_lora_rank", "q_lora_rank", "o_lora_rank", "moe_latent_size"):
            if isinstance(value, int):
                out[key] = 32
        elif _EXPERT_COUNT.match(key):
            if isinstance(value, int):
                out[key] = EXPERTS
        elif key in (
            "num_experts_per_tok",
            "moe_topk",
            "moe_k",
            "top_k_experts",
            "num_experts_per_token",
            "num_selected_experts",
            "experts_per_token",
        ):
            if isinstance(value, int):
                out[key] = TOP_K
        elif key in ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"):
            if isinstance(value, int) and value > 1:
                out[key] = 1
        elif key in ("n_group", "num_expert_group"):
            if isinstance(value, int) and value > 1:
                out[key] = 2
        elif key == "topk_group":
            if isinstance(value, int) and value > 1:
                out[key] = 1
        elif key in ("n_groups", "mamba_n_groups", "ssm_n_groups") and isinstance(value, int):
            out[key] = 1
        elif key in ("zero_expert_num",):
            out[key] = 2
        elif key in (
            "first_k_dense_replace",
            "num_dense_layers",
            "num_dense_blocks",
            "moe_layer_start_index",
        ):
            if isinstance(value, int) and value > 0:
                out[key] = 1
        elif key == "moe_layer_end_index":
            out[key] = new_layers - 1
        elif key == "mlp_only_layers":
            out[key] = [0] if value else []
        elif key in ("num_nextn_predict_layers", "num_mtp_layers", "mtp_num_layers"):
            if isinstance(value, int) and value > 1:
                out[key] = 1
        elif (key.startswith("vocab_size") or key.endswith("vocab_size")) and text:
            if isinstance(value, int):
                out[key] = VOCAB
        elif key == "max_position_embeddings":
            out[key] = MAX_POSITIONS
        elif key in ("sliding_window", "sliding_window_size") and isinstance(value, int):
            out[key] = 16
        elif key in ("index_topk",) and isinstance(value, int):
            out[key] = 4
        elif (
            "intermediate_size" in key
            or "ffn_hidden_size" in key
            or key.endswith("ffn_dim")
            or key
            in (
                "d_ff",
                "share_expert_dim",
                "shared_intermediate_size",
                "first_dense_intermediate_size",
                "dense_intermediate_size",
            )
        ):
            if isinstance(value, int) and value > 0:
                out[key] = _width(key)
            elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
                out[key] = [_width(key) - 8 * j for j in range(len(value))]
        elif key.endswith("_token_id") and isinstance(value, int) and text and value >= VOCAB:
            out[key] = VOCAB - 1 - (abs(hash(key)) % 8)
        elif (
            re.search(r"(hidden_sizes|_dims|_channels_list)$", key)
            and isinstance(value, list)
            and value
            and all(isinstance(v, int) for v in value)
        ):
            scale = max(1, max(value) // HIDDEN)
            out[key] = [max(8, v // scale) for v in value]
        elif key == "depths" and isinstance(value, list):
            out[key] = [1] * len(value)
        elif key == "per_layer_config":
            continue  # dots3_note rebuilds it from swa_* arguments (see _OVERRIDES)
        elif re.search(r"(indexes|indices|layer_ids)$", key) and isinstance(value, (list, tuple)):
            out[key] = [i for i in range(min(len(value), new_layers or 1))]
        elif (
            isinstance(value, int)
            and value > 256
            and re.search(r"(_size|_dim|_channels|_width)$", key)
            and not re.search(r"(image|patch|window|chunk|position|max_|vocab|batch)", key)
        ):
            out[key] = 64
    rope_dim, nope_dim = d.get("qk_rope_head_dim"), d.get("qk_nope_head_dim")
    if isinstance(rope_dim, int) and isinstance(nope_dim, int) and rope_dim > 0:
        # keep the nope/rope ratio: mistral4 rotates head_dim * partial_rotary_factor dims
        out["qk_nope_head_dim"] = max(8, 8 * nope_dim // rope_dim)
    if "head_dim" in out and d.get("qk_rope_head_dim") and d.get("head_dim") == d["qk_rope_head_dim"]:
        out["head_dim"] = out["qk_rope_head_dim"]  # longcat_flash: head_dim is the rope width
    if "qk_head_dim" in d:  # longcat_flash: a field, nope + rope
        out["qk_head_dim"] = out.get("qk_nope_head_dim", HEAD_DIM) + out.get("qk_rope_head_dim", 8)
    if dataclasses.is_dataclass(cls):  # derived attributes (qk_head_dim, ...) are not passed
        fields = {f.name for f in dataclasses.fields(cls)}
        # bailing_hybrid declares fields under attribute_map aliases (num_local_experts) while
        # to_dict() shows the targets (num_experts): pass the value under the field's name
        for alias, target in (getattr(cls, "attribute_map", None) or {}).items():
            if target in out and target not in fields and alias in fields:
                out[alias] = out.pop(target)
        out = {k: v for k, v in out.items() if k in fields}
    rope = d.get("rope_parameters")
    if isinstance(rope, dict):
        rotary = out.get("qk_rope_head_dim") or out.get("head_dim") or HEAD_DIM
        factor = rope.get("partial_rotary_factor") or d.get("partial_rotary_factor") or 1
        out["rope_parameters"] = _shrink_rope(rope, int(rotary * factor))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = d.get(key)
        if text and isinstance(value, int) and value >= VOCAB:
            out[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[key]
        if text and isinstance(value, list):
            out[key] = [v if v < VOCAB else 2 for v in value]
    for name, sub_cls in getattr(cls, "sub_configs", {}).items():
        sub = d.get(name)
        if isinstance(sub, dict):
            sub_text = text and name in ("text_config", "thinker_config", "talker_config")
            out[name] = _shrink(sub_cls, sub, sub_text or name == "text_config")
            if isinstance(out[name].get("out_hidden_size"), int):
                out[name]["out_hidden_size"] = HIDDEN
    return out


#: Per-family corrections of the generic shrink, keyed by model directory and applied to
#: the text config (the top-level config where there is no ``text_config``), dicts merged;
#: a ``*_config`` key goes to that sub-config of a composite config.
_OVERRIDES: dict[str, dict[str, Any]] = {
    # sparse_step 4 with 2 layers would leave no sparse layer; no router jitter, capacity 8.
    "switch_transformers": dict(
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        encoder_sparse_step=2,
        decoder_sparse_step=2,
        expert_capacity=8,
        router_jitter_noise=0.0,
    ),
    # sparse_step 4 with 2 layers would leave no sparse layer; no token dropout.
    "nllb_moe": dict(encoder_sparse_step=2, decoder_sparse_step=2, expert_capacity=8, moe_token_dropout=0.0),
    # the MoE block is off by default (enable_moe_block=False, expert fields None); the
    # per-layer-input embedding is vocab x (layers * 256) otherwise.
    "gemma4": dict(enable_moe_block=True, hidden_size_per_layer_input=16),
    "diffusion_gemma": dict(enable_moe_block=True, hidden_size_per_layer_input=16),
    # attention every 8th layer from 4 by default: no attention layer in 2 layers.
    "jamba": dict(attn_layer_period=2, attn_layer_offset=0),
    # all layers are mamba by default; 128 mamba heads for a 128-wide inner dim otherwise.
    "granitemoehybrid": dict(layer_types=["linear_attention", "attention"], mamba_n_heads=8),
    # layer_types defaults to None and the decoder layer indexes it.
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"]),
    # mlp_layer_types defaults to None and the decoder layer indexes it.
    "deepseek_ocr2": dict(num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"]),
    # the QSA indexer fields default to None but indexed_attention layers need them.
    "qwen4_exp": dict(
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=16,
        indexer_budget=8,
        indexer_compress_ratio=2,
    ),
    # mrope_section defaults to [8, 12, 12] in the rotary module when the config has none.
    "glm4v_moe": dict(rope_parameters=dict(mrope_section=[2, 1, 1])),
    # partial_rotary_factor 0.334 of head_dim 16 gives an odd rotary width.
    # sliding layers have 2x the kv heads, which must not exceed the query heads.
    "mimo_v2_flash": dict(
        num_key_value_heads=2,
        rope_parameters=dict(
            full_attention=dict(partial_rotary_factor=0.5),
            sliding_attention=dict(partial_rotary_factor=0.5),
        ),
    ),
    # sliding layers exist but sliding_window defaults to None.
    "step3p7": dict(sliding_window=16),
    # the config validator wants index_topk divisible by index_kpool (16).
    # DSA layers must be NoPE (qk_rope_head_dim 0).
    "glm5_next": dict(index_topk=16, qk_rope_head_dim=0),
    # sliding layers' MLA sizes come from swa_* arguments (full size by default) into
    # per_layer_config; the validator wants kv heads == heads, head_dim = nope + rope.
    "dots3_note": dict(
        swa_num_attention_heads=HEADS,
        swa_num_key_value_heads=HEADS,
        swa_q_lora_rank=32,
        swa_kv_lora_rank=32,
        swa_head_dim=24,
        swa_qk_nope_head_dim=16,
        swa_v_head_dim=16,
    ),
    # the vision tower's widths grow with patch_size**2 * temporal_patch_size per stage
    # (614400 wide by default): a 4x4x2 patch in 3 stages keeps them small.
    "inkling": dict(vision_config=dict(patch_size=4, temporal_patch_size=2, n_layers=3)),
    # the config validator allows top-1 routing only.
    "zaya": dict(num_experts_per_tok=1),
    # the rope init reads mrope_section (default [22, 22, 20]) even without one in the config.
    "ernie4_5_vl_moe": dict(rope_parameters=dict(mrope_section=[3, 3, 2])),
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _fix_mrope(cls: type[PretrainedConfig], kwargs: dict[str, Any]) -> PretrainedConfig:
    """Build the config; rebuild once if a post-init-made mrope_section does not fit the
    tiny rotary dimension."""
    config = cls(**kwargs)
    text = config.get_text_config()
    rope = dict(getattr(text, "rope_parameters", None) or {})
    section = rope.get("mrope_section")
    if not isinstance(section, list):
        return config
    rotary = getattr(text, "qk_rope_head_dim", None) or getattr(text, "head_dim", None)
    rotary = rotary or text.hidden_size // text.num_attention_heads
    factor = rope.get("partial_rotary_factor") or getattr(text, "partial_rotary_factor", 1) or 1
    target = int(rotary * factor) // 2
    if sum(section) == target:
        return config
    rope["mrope_section"] = _scale_section(section, target)
    if text is config:
        return cls(**{**kwargs, "rope_parameters": rope})
    sub = {**kwargs.get("text_config", {}), "rope_parameters": rope}
    return cls(**{**kwargs, "text_config": sub})


def _directory(model_type: str) -> str:
    return _config_dirs().get(CONFIG_MAPPING_NAMES[model_type], model_type)


def tiny_config(model_type: str) -> PretrainedConfig:
    """A tiny config of ``model_type``: the class defaults shrunk generically."""
    cls = CONFIG_MAPPING[model_type]
    kwargs = _shrink(cls, cls().to_dict(), text=True)
    extra = _OVERRIDES.get(_directory(model_type), {})
    subs = {k: v for k, v in extra.items() if k.endswith("_config") and k in kwargs}
    rest = {k: v for k, v in extra.items() if k not in subs}
    kwargs = _merge(kwargs, subs)
    if "text_config" in kwargs:
        kwargs["text_config"] = _merge(kwargs["text_config"], rest)
    else:
        kwargs = _merge(kwargs, rest)
    return _fix_mrope(cls, kwargs)


def model_class(config: PretrainedConfig) -> tuple[type, str]:
    """The Auto class for text tracing of ``config`` and its kind string."""
    table = [
        ("causal", transformers.AutoModelForCausalLM),
        ("image_text", transformers.AutoModelForImageTextToText),
        ("seq2seq", transformers.AutoModelForSeq2SeqLM),
        ("base", transformers.AutoModel),
    ]
    for kind, auto in table:
        if type(config) in auto._model_mapping:
            return auto, kind
    raise ValueError(f"no Auto class maps {type(config).__name__}")


def build(model_type: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model of ``model_type`` in float32 on CPU, eval mode."""
    config = tiny_config(model_type)
    auto, _ = model_class(config)
    with torch.device("meta"):
        probe = auto.from_config(config, dtype=torch.float32)
    size = sum(p.numel() for p in probe.parameters())
    if size > MAX_PARAMS:
        raise ValueError(f"{model_type}: tiny model has {size} parameters (> {MAX_PARAMS})")
    torch.manual_seed(seed)
    model = auto.from_config(config, dtype=torch.float32)
    return model.to("cpu", torch.float32).eval()
