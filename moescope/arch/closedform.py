"""Tensor inventories computed from a config alone (closed forms per family).

When only a config is available (a bare ``config.json``, a spec file, or a hub id whose
weights we do not read), moescope lists the parameter tensors the transformers model
would hold — names in transformers' in-memory layout, shapes from the config fields —
and accounts them exactly like tensors read from safetensors headers. This module never
imports torch or transformers; :func:`meta_inventory` is the fallback for families with no
closed form here (it builds the model on the meta device). The tensor types live in
:mod:`moescope.arch.inventory`; generic spec files are listed by :func:`moescope.arch.specfile.spec_inventory`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moescope.arch.discover import build_meta_model
from moescope.arch.inventory import Inventory, TensorInfo
from moescope.arch.moe import MoESpec, family_of
from moescope.arch.specfile import spec_inventory
from moescope.errors import ConfigError
from moescope.families import get as _get

__all__ = [
    "config_inventory",
    "has_closed_form",
    "meta_inventory",
]


def _req(cfg: dict[str, Any], where: str, *keys: str, default: Any = None) -> int:
    """A required whole-number field (the first of ``keys`` present)."""
    v = _get(cfg, *keys, default=default)
    if v is None:
        raise ConfigError(
            f"{where}: has no {keys[0]}; moescope needs it to count parameters from the config alone "
            "(fix the config, or pass the checkpoint directory with its safetensors weights)."
        )
    if type(v) is not int:  # validate_config refuses these first; this is the last line
        raise ConfigError(f"{where}: {keys[0]} is {v!r}; it must be a whole number (fix the config).")
    return v


class _Builder:
    def __init__(self) -> None:
        self.items = Inventory()

    def add(self, name: str, *shape: int) -> None:
        self.items.append(TensorInfo(name, tuple(int(s) for s in shape)))

    def linear(self, name: str, out_f: int, in_f: int, bias: bool = False) -> None:
        self.add(f"{name}.weight", out_f, in_f)
        if bias:
            self.add(f"{name}.bias", out_f)

    def gated_mlp(self, prefix: str, hidden: int, inter: int, bias: bool = False) -> None:
        self.linear(f"{prefix}.gate_proj", inter, hidden, bias)
        self.linear(f"{prefix}.up_proj", inter, hidden, bias)
        self.linear(f"{prefix}.down_proj", hidden, inter, bias)


def _attention(b: _Builder, p: str, cfg: dict[str, Any], fam: str, hidden: int, where: str) -> None:
    heads = _req(cfg, where, "num_attention_heads")
    kv = int(_get(cfg, "num_key_value_heads", default=heads) or heads)
    hd = int(_get(cfg, "head_dim", default=hidden // heads) or hidden // heads)
    if fam in ("deepseek_v2", "deepseek_v3"):
        q_lora = _get(cfg, "q_lora_rank")
        kv_lora = _req(cfg, where, "kv_lora_rank")
        rope = _req(cfg, where, "qk_rope_head_dim")
        nope = _req(cfg, where, "qk_nope_head_dim")
        v_hd = _req(cfg, where, "v_head_dim")
        bias = bool(_get(cfg, "attention_bias", default=False))
        if q_lora:
            b.linear(f"{p}.q_a_proj", int(q_lora), hidden, bias)
            b.add(f"{p}.q_a_layernorm.weight", int(q_lora))
            b.linear(f"{p}.q_b_proj", heads * (nope + rope), int(q_lora))
        else:
            b.linear(f"{p}.q_proj", heads * (nope + rope), hidden)
        b.linear(f"{p}.kv_a_proj_with_mqa", kv_lora + rope, hidden, bias)
        b.add(f"{p}.kv_a_layernorm.weight", kv_lora)
        b.linear(f"{p}.kv_b_proj", heads * (nope + v_hd), kv_lora)
        b.linear(f"{p}.o_proj", hidden, heads * v_hd, bias)
        return
    qkv_bias = o_bias = False
    if fam in ("qwen2", "qwen2_moe"):
        qkv_bias = True
    elif fam == "glm4_moe":
        qkv_bias = bool(_get(cfg, "attention_bias", default=False))
    elif fam in (
        "llama",
        "mistral",
        "qwen3",
        "qwen3_moe",
        "mixtral",
        "olmoe",
        "granitemoe",
        "granitemoeshared",
        "phimoe",
        "gpt_oss",
    ):
        qkv_bias = o_bias = bool(_get(cfg, "attention_bias", default=fam in ("phimoe", "gpt_oss")))
    b.linear(f"{p}.q_proj", heads * hd, hidden, qkv_bias)
    b.linear(f"{p}.k_proj", kv * hd, hidden, qkv_bias)
    b.linear(f"{p}.v_proj", kv * hd, hidden, qkv_bias)
    b.linear(f"{p}.o_proj", hidden, heads * hd, o_bias)
    if fam in ("qwen3", "qwen3_moe") or (fam == "glm4_moe" and _get(cfg, "use_qk_norm", default=False)):
        b.add(f"{p}.q_norm.weight", hd)
        b.add(f"{p}.k_norm.weight", hd)
    elif fam == "olmoe":
        b.add(f"{p}.q_norm.weight", heads * hd)
        b.add(f"{p}.k_norm.weight", kv * hd)
    if fam == "gpt_oss":
        b.add(f"{p}.sinks", heads)


def _need_expert_width(spec: MoESpec, where: str) -> None:
    """A MoE config must give the experts' width: without it every expert would count 0."""
    if spec.is_moe and spec.expert_intermediate_size < 1:
        raise ConfigError(
            f"{where}: has no {spec.expert_width_field or 'expert width'}; moescope needs the routed "
            "experts' width to count parameters from the config alone (fix the config)."
        )


def _decoder_lm(cfg: dict[str, Any], spec: MoESpec, where: str) -> Inventory:
    """Llama-style decoder stacks: llama, mistral, qwen2/3(+moe), mixtral, olmoe, deepseek, glm4_moe,
    gpt_oss, phimoe, granitemoe(shared)."""
    fam = spec.family
    _req(cfg, where, "num_hidden_layers")
    hidden = _req(cfg, where, "hidden_size")
    vocab = _req(cfg, where, "vocab_size")
    _need_expert_width(spec, where)
    b = _Builder()
    b.add("model.embed_tokens.weight", vocab, hidden)
    ln_bias = fam == "phimoe"
    moe = set(spec.moe_layers)
    E, I = spec.num_experts, spec.expert_intermediate_size

    def layer(i: int, is_moe: bool) -> None:
        p = f"model.layers.{i}"
        _attention(b, f"{p}.self_attn", cfg, fam, hidden, where)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            b.add(f"{p}.{norm}.weight", hidden)
            if ln_bias:
                b.add(f"{p}.{norm}.bias", hidden)
        if not is_moe:
            b.gated_mlp(f"{p}.mlp", hidden, _req(cfg, where, "intermediate_size"))
            return
        block = "block_sparse_moe" if fam in ("granitemoe", "granitemoeshared") else "mlp"
        m = f"{p}.{block}"
        if fam in ("gpt_oss", "phimoe", "granitemoe", "granitemoeshared"):
            b.linear(f"{m}.router", E, hidden, bias=fam == "gpt_oss")
        else:
            b.add(f"{m}.gate.weight", E, hidden)
        if fam == "gpt_oss":
            b.add(f"{m}.experts.gate_up_proj", E, hidden, 2 * I)
            b.add(f"{m}.experts.gate_up_proj_bias", E, 2 * I)
            b.add(f"{m}.experts.down_proj", E, I, hidden)
            b.add(f"{m}.experts.down_proj_bias", E, hidden)
        else:
            b.add(f"{m}.experts.gate_up_proj", E, 2 * I, hidden)
            b.add(f"{m}.experts.down_proj", E, hidden, I)
        if fam == "qwen2_moe" and spec.shared_intermediate_size:
            b.gated_mlp(f"{m}.shared_expert", hidden, spec.shared_intermediate_size)
            b.add(f"{m}.shared_expert_gate.weight", 1, hidden)
        elif fam in ("deepseek_v2", "deepseek_v3", "glm4_moe") and spec.num_shared_experts:
            b.gated_mlp(f"{m}.shared_experts", hidden, spec.shared_intermediate_size)
        elif fam == "granitemoeshared" and spec.shared_intermediate_size:
            b.add(f"{p}.shared_mlp.input_linear.weight", 2 * spec.shared_intermediate_size, hidden)
            b.add(f"{p}.shared_mlp.output_linear.weight", hidden, spec.shared_intermediate_size)

    for i in range(spec.num_layers):
        layer(i, i in moe)
    b.add("model.norm.weight", hidden)
    if ln_bias:
        b.add("model.norm.bias", hidden)
    if not spec.tie_word_embeddings:
        b.linear(
            "lm_head", vocab, hidden, bias=fam == "phimoe" and bool(_get(cfg, "lm_head_bias", default=True))
        )
    # Multi-token-prediction layers (DeepSeek-V3, GLM-4.5: num_nextn_predict_layers) are stored
    # after the decoder as the checkpoints hold them: an MoE decoder layer plus its own
    # embedding, two norms, the [H, 2H] projection and a head. transformers does not build them;
    # they are listed so that the config path reports mtp_params and stored bytes as the header
    # path does (the classifier puts every tensor of a layer past num_hidden_layers in ``mtp``).
    for j in range(spec.mtp_layers if fam in ("deepseek_v3", "glm4_moe") else 0):
        i = spec.num_layers + j
        p = f"model.layers.{i}"
        b.add(f"{p}.embed_tokens.weight", vocab, hidden)
        b.add(f"{p}.enorm.weight", hidden)
        b.add(f"{p}.hnorm.weight", hidden)
        b.linear(f"{p}.eh_proj", hidden, 2 * hidden)
        layer(i, spec.is_moe)
        b.add(f"{p}.shared_head.norm.weight", hidden)
        b.add(f"{p}.shared_head.head.weight", vocab, hidden)
    return b.items


def _dbrx(cfg: dict[str, Any], spec: MoESpec, where: str) -> Inventory:
    _req(cfg, where, "n_layers", "num_hidden_layers")
    d = _req(cfg, where, "d_model")
    heads = _req(cfg, where, "n_heads")
    vocab = _req(cfg, where, "vocab_size")
    kv = _req(cfg, where, "attn_config.kv_n_heads", default=1)
    hd = d // heads
    _need_expert_width(spec, where)
    E, I = spec.num_experts, spec.expert_intermediate_size
    b = _Builder()
    b.add("transformer.wte.weight", vocab, d)
    for i in range(spec.num_layers):
        p = f"transformer.blocks.{i}"
        b.add(f"{p}.norm_attn_norm.norm_1.weight", d)
        b.add(f"{p}.norm_attn_norm.attn.Wqkv.weight", (heads + 2 * kv) * hd, d)
        b.add(f"{p}.norm_attn_norm.attn.out_proj.weight", d, d)
        b.add(f"{p}.norm_attn_norm.norm_2.weight", d)
        b.add(f"{p}.ffn.router.layer.weight", E, d)
        for w in ("w1", "v1", "w2"):
            b.add(f"{p}.ffn.experts.mlp.{w}", E * I, d)
    b.add("transformer.norm_f.weight", d)
    if not spec.tie_word_embeddings:
        b.add("lm_head.weight", vocab, d)
    return b.items


def _gpt2(cfg: dict[str, Any], spec: MoESpec, where: str) -> Inventory:
    _req(cfg, where, "n_layer", "num_hidden_layers")
    h = _req(cfg, where, "n_embd", "hidden_size")
    vocab = _req(cfg, where, "vocab_size")
    npos = _req(cfg, where, "n_positions", "max_position_embeddings")
    inner = _get(cfg, "n_inner", default=None) or 4 * h
    b = _Builder()
    b.add("transformer.wte.weight", vocab, h)
    b.add("transformer.wpe.weight", npos, h)
    for i in range(spec.num_layers):
        p = f"transformer.h.{i}"
        for ln in ("ln_1", "ln_2"):
            b.add(f"{p}.{ln}.weight", h)
            b.add(f"{p}.{ln}.bias", h)
        b.add(f"{p}.attn.c_attn.weight", h, 3 * h)
        b.add(f"{p}.attn.c_attn.bias", 3 * h)
        b.add(f"{p}.attn.c_proj.weight", h, h)
        b.add(f"{p}.attn.c_proj.bias", h)
        b.add(f"{p}.mlp.c_fc.weight", h, inner)
        b.add(f"{p}.mlp.c_fc.bias", inner)
        b.add(f"{p}.mlp.c_proj.weight", inner, h)
        b.add(f"{p}.mlp.c_proj.bias", h)
    b.add("transformer.ln_f.weight", h)
    b.add("transformer.ln_f.bias", h)
    return b.items


_CLOSED_FORMS: dict[str, Callable[[dict[str, Any], MoESpec, str], Inventory]] = {
    **{
        f: _decoder_lm
        for f in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "mixtral",
            "qwen2_moe",
            "qwen3_moe",
            "olmoe",
            "deepseek_v2",
            "deepseek_v3",
            "glm4_moe",
            "gpt_oss",
            "phimoe",
            "granitemoe",
            "granitemoeshared",
        )
    },
    "dbrx": _dbrx,
    "gpt2": _gpt2,
}


def _spec(cfg: dict[str, Any], spec: MoESpec, where: str) -> Inventory:
    return spec_inventory(cfg, spec)


_CLOSED_FORMS["moescope_spec"] = _spec


def has_closed_form(cfg: dict[str, Any]) -> bool:
    """Whether :func:`config_inventory` can list this family without transformers."""
    return family_of(cfg) in _CLOSED_FORMS


def config_inventory(cfg: dict[str, Any], spec: MoESpec, where: str = "config.json") -> Inventory:
    """Parameter tensors the transformers model would hold, from the config alone.

    Families without a closed form here fall back to :func:`meta_inventory`. Run
    :func:`moescope.arch.validate.validate_config` first (``moescope params`` does).

    Args:
        cfg: the config dict.
        spec: its :class:`MoESpec`.
        where: the file the config came from, for error messages.

    Raises:
        ConfigError: a required field is missing or malformed, or transformers does not
            know the model type or cannot build it from these values.
    """
    fn = _CLOSED_FORMS.get(spec.family)
    if fn is None:
        return meta_inventory(cfg, where)
    return fn(cfg, spec, where)


def meta_inventory(cfg: dict[str, Any], where: str = "config.json") -> Inventory:
    """Inventory from the transformers model built on the meta device (parameters only, tied once).

    Raises:
        ConfigError: transformers does not know the model type, or its config class or model
            refuses these values (whatever it raises becomes one line naming ``where``).
    """
    try:
        model = build_meta_model(cfg)
        return Inventory(TensorInfo(n, tuple(int(s) for s in p.shape)) for n, p in model.named_parameters())
    except ConfigError as exc:
        if str(exc).startswith(f"{where}:"):
            raise
        raise ConfigError(f"{where}: {exc}") from exc
    except Exception as exc:  # transformers validates configs its own way, with many error types
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConfigError(
            f"{where}: transformers cannot build model_type {cfg.get('model_type')!r} from this config "
            f"({type(exc).__name__}: {first}); fix the config, or pass the checkpoint with its "
            "safetensors weights."
        ) from exc
