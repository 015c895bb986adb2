"""Generic spec files: account architectures that have no public checkpoint (GLaM, GShard, GPT-3...).

A spec is a small JSON file with ``"model_type": "moescope_spec"`` and the dimensions a
paper publishes. ``moescope params`` accounts it like any config. Fields (defaults in
brackets):

- ``name``, ``source``: what it is and where the numbers come from (free text);
- ``num_layers``: decoder layers; ``encoder_layers`` [0] for encoder-decoder models
  (decoder layers then also get cross-attention);
- ``hidden_size``, ``num_heads``, ``head_dim`` [hidden/heads], ``num_kv_heads`` [num_heads];
- ``ffn_size``: dense MLP width; ``gated_mlp`` [false]: three matrices (SwiGLU/GEGLU) instead of two;
- ``num_experts`` [0], ``top_k`` [2], ``expert_ffn_size`` [ffn_size], ``experts_gated``
  [gated_mlp], ``num_shared_experts`` [0];
- MoE placement: ``moe_layers`` (list of layer indices, encoder first) or ``moe_every`` [1]
  with ``moe_offset`` [moe_every-1]: layer i of each stack is MoE when i % moe_every == moe_offset;
- ``vocab_size``, ``tie_word_embeddings`` [true], ``position_embeddings`` [0] (learned positions),
  ``bias`` [false] (biases on linear layers), ``norm`` [``rmsnorm``] or ``layernorm`` (with bias).

Layers are numbered encoder first, then decoder, in one sequence.
"""

from __future__ import annotations

from typing import Any

from moescope.closedform import Inventory, TensorInfo
from moescope.errors import ConfigError

_REQUIRED = ("num_layers", "hidden_size", "num_heads", "ffn_size", "vocab_size")


def spec_to_config(spec: dict[str, Any], where: str = "spec") -> dict[str, Any]:
    """Validate a generic spec and normalise it into a config dict moescope accounts.

    Raises:
        ConfigError: a required field is missing or a value is impossible.
    """
    missing = [k for k in _REQUIRED if k not in spec]
    if missing:
        raise ConfigError(f"{where}: spec lacks {', '.join(missing)}; see `moescope.spec` for the fields.")

    def num(key: str, default: Any = None) -> int:
        v = spec.get(key, default)
        try:
            iv = int(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key}={v!r} is not an integer; fix the spec.") from None
        if iv < 0:
            raise ConfigError(f"{where}: {key}={iv} is negative; fix the spec.")
        return iv

    dec = num("num_layers")
    enc = num("encoder_layers", 0)
    hidden = num("hidden_size")
    heads = num("num_heads")
    experts = num("num_experts", 0)
    every = num("moe_every", 1) or 1
    offset = num("moe_offset", every - 1)
    if "moe_layers" in spec:
        moe = [int(i) for i in spec["moe_layers"]]
    elif experts > 1:
        moe = [i for i in range(enc) if i % every == offset] + [
            enc + i for i in range(dec) if i % every == offset
        ]
    else:
        moe = []
    top_k = num("top_k", 2 if experts > 1 else 0)
    if experts > 1 and not 1 <= top_k <= experts:
        raise ConfigError(
            f"{where}: top_k={top_k} must be between 1 and num_experts={experts}; fix the spec."
        )
    return {
        "model_type": "moescope_spec",
        "name": spec.get("name", where),
        "source": spec.get("source"),
        "num_hidden_layers": enc + dec,
        "encoder_layers": enc,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "head_dim": num("head_dim", hidden // heads if heads else 0),
        "num_key_value_heads": num("num_kv_heads", heads),
        "intermediate_size": num("ffn_size"),
        "gated_mlp": bool(spec.get("gated_mlp", False)),
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": num("expert_ffn_size", spec["ffn_size"]),
        "experts_gated": bool(spec.get("experts_gated", spec.get("gated_mlp", False))),
        "n_shared_experts": num("num_shared_experts", 0),
        "moe_layers": moe,
        "vocab_size": num("vocab_size"),
        "tie_word_embeddings": bool(spec.get("tie_word_embeddings", True)),
        "position_embeddings": num("position_embeddings", 0),
        "bias": bool(spec.get("bias", False)),
        "norm": spec.get("norm", "rmsnorm"),
    }


def spec_inventory(cfg: dict[str, Any], spec: Any) -> Inventory:
    """Parameter tensors of a normalised spec (names in a llama-like layout)."""
    h = cfg["hidden_size"]
    heads, hd, kv = cfg["num_attention_heads"], cfg["head_dim"], cfg["num_key_value_heads"]
    bias, ln_bias = cfg["bias"], cfg["norm"] == "layernorm"
    enc = cfg["encoder_layers"]
    out: Inventory = []

    def add(name: str, *shape: int) -> None:
        out.append(TensorInfo(name, tuple(shape)))

    def linear(name: str, o: int, i: int) -> None:
        add(f"{name}.weight", o, i)
        if bias:
            add(f"{name}.bias", o)

    def norm(name: str) -> None:
        add(f"{name}.weight", h)
        if ln_bias:
            add(f"{name}.bias", h)

    def attention(p: str) -> None:
        linear(f"{p}.q_proj", heads * hd, h)
        linear(f"{p}.k_proj", kv * hd, h)
        linear(f"{p}.v_proj", kv * hd, h)
        linear(f"{p}.o_proj", h, heads * hd)

    add("model.embed_tokens.weight", cfg["vocab_size"], h)
    if cfg["position_embeddings"]:
        add("model.embed_positions.weight", cfg["position_embeddings"], h)
    moe = set(cfg["moe_layers"])
    E, I = cfg["num_experts"], cfg["moe_intermediate_size"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        attention(f"{p}.self_attn")
        norm(f"{p}.input_layernorm")
        norm(f"{p}.post_attention_layernorm")
        if enc and i >= enc:
            attention(f"{p}.self_attn.cross")  # cross-attention of decoder layers
            norm(f"{p}.cross_attention_layernorm")
        if i in moe:
            add(f"{p}.mlp.gate.weight", E, h)
            ups = 2 if cfg["experts_gated"] else 1
            add(f"{p}.mlp.experts.gate_up_proj", E, ups * I, h)
            add(f"{p}.mlp.experts.down_proj", E, h, I)
            if cfg["n_shared_experts"]:
                s = cfg["n_shared_experts"] * I
                add(f"{p}.mlp.shared_experts.up_proj.weight", ups * s, h)
                add(f"{p}.mlp.shared_experts.down_proj.weight", h, s)
        else:
            f = cfg["intermediate_size"]
            if cfg["gated_mlp"]:
                linear(f"{p}.mlp.gate_proj", f, h)
            linear(f"{p}.mlp.up_proj", f, h)
            linear(f"{p}.mlp.down_proj", h, f)
    norm("model.norm")
    if enc:
        norm("model.encoder_norm")
    if not cfg["tie_word_embeddings"]:
        add("lm_head.weight", cfg["vocab_size"], h)
    return out
