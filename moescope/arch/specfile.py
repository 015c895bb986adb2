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

Every value is checked before any arithmetic (:func:`spec_to_config`): counts and widths
are whole numbers within :mod:`moescope.arch.validate`'s bounds (at least 1, except
``encoder_layers``, ``num_experts``, ``num_shared_experts``, ``moe_offset`` and
``position_embeddings``, which may be 0), flags are true/false, ``num_heads`` is a multiple
of ``num_kv_heads`` and divides ``hidden_size`` unless ``head_dim`` is given,
``1 <= top_k <= num_experts``, ``moe_offset < moe_every``, and ``moe_layers`` indices lie in
``0 .. encoder_layers + num_layers - 1`` (and need ``num_experts >= 2``).
"""

from __future__ import annotations

from typing import Any

from moescope.arch.inventory import Inventory, TensorInfo
from moescope.arch.moe import MoESpec, moe_spec
from moescope.arch.validate import (
    MAX_EXPERT_INSTANCES,
    MAX_EXPERTS,
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    MAX_WIDTH,
    check_bool,
    check_index_list,
    check_int,
    show,
    validate_config,
)
from moescope.errors import ConfigError

_REQUIRED = ("num_layers", "hidden_size", "num_heads", "ffn_size", "vocab_size")
_FIX = "(fix the spec)"

#: keys of a normalised spec (the output of :func:`spec_to_config`)
_NORMALISED = frozenset(
    (
        "num_hidden_layers", "encoder_layers", "hidden_size", "num_attention_heads", "head_dim",
        "num_key_value_heads", "intermediate_size", "gated_mlp", "num_experts", "num_experts_per_tok",
        "moe_intermediate_size", "experts_gated", "n_shared_experts", "moe_layers", "vocab_size",
        "tie_word_embeddings", "position_embeddings", "bias", "norm",
    )
)  # fmt: skip


def is_raw_spec(cfg: dict[str, Any]) -> bool:
    """Whether ``cfg`` is a spec as written (not yet through :func:`spec_to_config`)."""
    return cfg.get("model_type") == "moescope_spec" and not (
        _NORMALISED <= cfg.keys() and "ffn_size" not in cfg
    )


class _Fields:
    """Reads a spec's fields, each checked as it is read (whole numbers in bounds, booleans)."""

    def __init__(self, spec: dict[str, Any], where: str) -> None:
        self.spec, self.where = spec, where

    def num(self, key: str, noun: str, lo: int, hi: int, default: int | None = None) -> int:
        v = self.spec.get(key)
        if v is None:
            if default is None:
                raise ConfigError(
                    f"{self.where}: spec lacks {key}; see `moescope.arch.specfile` for the fields."
                )
            return default
        return check_int(v, key, self.where, noun, lo, hi, _FIX)

    def flag(self, key: str, default: bool) -> bool:
        v = self.spec.get(key)
        return default if v is None else check_bool(v, key, self.where, _FIX)


def config_spec(cfg: dict[str, Any], where: str) -> tuple[dict[str, Any], MoESpec]:
    """The config accounting uses (a raw spec normalised by :func:`spec_to_config`), checked
    by :func:`~moescope.arch.validate.validate_config` before any arithmetic, and its
    :class:`~moescope.arch.moe.MoESpec`.

    Raises:
        ConfigError: a malformed or impossible field, named with ``where``.
    """
    if is_raw_spec(cfg):
        cfg = spec_to_config(cfg, where)
    validate_config(cfg, where)
    return cfg, moe_spec(cfg, where)


def spec_to_config(spec: dict[str, Any], where: str = "spec") -> dict[str, Any]:
    """Validate a generic spec and normalise it into a config dict moescope accounts.

    Every field is checked before it is used: whole numbers within the bounds of
    :mod:`moescope.arch.validate`, booleans, ``norm``, head counts that divide, ``top_k`` between 1
    and ``num_experts``, ``moe_layers`` indices inside the model, ``moe_offset < moe_every``.

    Raises:
        ConfigError: a required field is missing or a value is impossible; one line naming
            ``where``, the field, the value and the fix.
    """
    missing = [k for k in _REQUIRED if spec.get(k) is None]
    if missing:
        raise ConfigError(
            f"{where}: spec lacks {', '.join(missing)}; see `moescope.arch.specfile` for the fields."
        )
    f = _Fields(spec, where)
    for key in ("name", "source"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise ConfigError(f"{where}: {key} is {show(spec[key])}; it must be a string {_FIX}.")
    dec = f.num("num_layers", "layer count", 1, MAX_LAYERS)
    enc = f.num("encoder_layers", "encoder layer count", 0, MAX_LAYERS, 0)
    hidden = f.num("hidden_size", "hidden size", 1, MAX_HIDDEN)
    heads = f.num("num_heads", "head count", 1, MAX_HEADS)
    if spec.get("head_dim") is None and hidden % heads:
        raise ConfigError(
            f"{where}: hidden_size ({hidden}) is not a multiple of num_heads ({heads}) and there is no "
            f"head_dim; set head_dim or a head count that divides the hidden size {_FIX}."
        )
    head_dim = f.num("head_dim", "head dimension", 1, MAX_HIDDEN, hidden // heads)
    kv = f.num("num_kv_heads", "key/value head count", 1, MAX_HEADS, heads)
    if heads % kv:
        raise ConfigError(
            f"{where}: num_kv_heads is {kv} but num_heads ({heads}) is not a multiple of it; each "
            f"key/value head must serve the same number of query heads {_FIX}."
        )
    ffn = f.num("ffn_size", "MLP width", 1, MAX_WIDTH)
    experts = f.num("num_experts", "expert count", 0, MAX_EXPERTS, 0)
    moe, top_k = _moe_placement(f, enc, dec, experts)
    norm = spec.get("norm", "rmsnorm")
    if norm not in ("rmsnorm", "layernorm"):
        raise ConfigError(f'{where}: norm is {show(norm)}; write "rmsnorm" or "layernorm" {_FIX}.')
    gated = f.flag("gated_mlp", False)
    name = spec.get("name")
    return {
        "model_type": "moescope_spec",
        "name": name if name is not None else where,
        "source": spec.get("source"),
        "num_hidden_layers": enc + dec,
        "encoder_layers": enc,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "head_dim": head_dim,
        "num_key_value_heads": kv,
        "intermediate_size": ffn,
        "gated_mlp": gated,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": f.num("expert_ffn_size", "expert width", 1, MAX_WIDTH, ffn),
        "experts_gated": f.flag("experts_gated", gated),
        "n_shared_experts": f.num("num_shared_experts", "shared-expert count", 0, MAX_EXPERTS, 0),
        "moe_layers": moe,
        "vocab_size": f.num("vocab_size", "vocabulary size", 1, MAX_VOCAB),
        "tie_word_embeddings": f.flag("tie_word_embeddings", True),
        "position_embeddings": f.num("position_embeddings", "position count", 0, MAX_POSITIONS, 0),
        "bias": f.flag("bias", False),
        "norm": norm,
    }


def _moe_placement(f: _Fields, enc: int, dec: int, experts: int) -> tuple[list[int], int]:
    """(MoE layer indices, top-k) of a spec, from ``moe_layers`` or ``moe_every``/``moe_offset``."""
    where = f.where
    every = f.num("moe_every", "MoE layer step", 1, MAX_LAYERS, 1)
    offset = f.num("moe_offset", "MoE layer offset", 0, MAX_LAYERS, every - 1)
    if offset >= every:
        raise ConfigError(
            f"{where}: moe_offset is {offset} but moe_every is {every}; the offset must be below the "
            f"step, or no layer is MoE {_FIX}."
        )
    if f.spec.get("moe_layers") is not None:
        moe = list(check_index_list(f.spec["moe_layers"], "moe_layers", where, enc + dec, _FIX))
        if moe and experts < 2:
            raise ConfigError(
                f"{where}: moe_layers lists MoE layers but num_experts is {experts}; a MoE layer needs at "
                f"least 2 experts {_FIX}."
            )
    elif experts > 1:
        moe = [i for i in range(enc) if i % every == offset] + [
            enc + i for i in range(dec) if i % every == offset
        ]
    else:
        moe = []
    top_k = f.num("top_k", "top-k", 0, MAX_EXPERTS, 2 if experts > 1 else 0)
    if experts > 1 and not 1 <= top_k <= experts:
        raise ConfigError(
            f"{where}: top_k is {top_k}; it must be between 1 and num_experts ({experts}) {_FIX}."
        )
    if (enc + dec) * experts > MAX_EXPERT_INSTANCES:
        raise ConfigError(
            f"{where}: {enc + dec} layers x {experts} experts is more than {MAX_EXPERT_INSTANCES:,} "
            f"routed experts in all; that is not a real model {_FIX}."
        )
    return moe, top_k


def spec_inventory(cfg: dict[str, Any], spec: Any) -> Inventory:
    """Parameter tensors of a normalised spec (names in a llama-like layout)."""
    h = cfg["hidden_size"]
    heads, hd, kv = cfg["num_attention_heads"], cfg["head_dim"], cfg["num_key_value_heads"]
    bias, ln_bias = cfg["bias"], cfg["norm"] == "layernorm"
    enc = cfg["encoder_layers"]
    out = Inventory()

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
