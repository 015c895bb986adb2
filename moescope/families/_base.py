"""The family record: every fact moescope needs about one Mixture-of-Experts family.

A :class:`Family` is plain data (no torch, no transformers): config field names, MoE layer
placement, routing rule, tensor naming, hook adapter, pruning support, attention facts. The
stages read it: :mod:`moescope.arch.moe` (``MoESpec``, tensor classifier), :mod:`moescope.execution.routing`
(hooks), :mod:`moescope.pruning` (layout, slices, config rewrite, top-k) and
:mod:`moescope.redundancy.run` (expert weights, router rows). Field names are dotted paths into
``config.json`` (``ffn_config.moe_num_experts``).

:class:`Reader` reads a config dict with the checks every stage shares (whole numbers, not
negative, layer lists) and the messages that name the field and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from moescope.errors import ConfigError

#: config keys that hold the decoder layer count, first present wins
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")

#: routed-expert count fields of the transformers families; a saved config may hold any of
#: them through ``attribute_map`` aliases (Qwen3-MoE from transformers 5 says num_local_experts)
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")

#: routing rules; each names one recomputation in tests/test_routing.py
RULES = {
    "softmax_topk": "softmax",  # softmax -> top-k (-> renormalise when norm_topk_prob)
    "softmax_topk_pnorm": "softmax",  # dbrx: softmax -> top-k -> divide by the p-norm
    "topk_softmax": "softmax_after_topk",  # top-k of the logits (+bias) -> softmax over the k
    "topk_sigmoid": "sigmoid",  # llama4: top-k of the logits -> sigmoid of those
    "sparsemixer": "sparsemixer",  # phimoe: two masked argmax steps, k is always 2
    "softmax_group_limited": "softmax",  # deepseek_v2: group score = max, x scaling, no renorm
    "sigmoid_group_limited": "sigmoid",  # deepseek_v3: sigmoid + correction bias, group = top-2 sum
    "capacity_top1": "softmax",  # switch: top-1 of the softmax, tokens over capacity dropped
    "capacity_top2": "softmax",  # nllb-moe: top-1 and top-2 of the softmax, each under capacity
}

PLACEMENTS = ("all", "sparse_step", "dense_prefix", "interleave", "period", "listed", "switch", "nllb")
ADAPTERS = ("fused", "dbrx", "llama4", "switch", "nllb")
STORED = ("per_expert", "fused", "packed", "modules")

# The decoder block index of a tensor or module name: ``model.layers.3.``, dbrx
# ``transformer.blocks.3.``, switch ``encoder.block.3.``, gpt2 ``h.3.``. At most 18 digits: a
# layer number is an int64, and int() of a longer run (a crafted header) would be slow or refused.
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d{1,18})(?=\.|$)")


# A per-expert tensor: ``experts.{j}.`` (most families) or ``experts.expert_{j}.`` (switch, nllb-moe);
# group 1 is ``expert_`` or empty, group 2 the expert index.
PER_EXPERT_RE = re.compile(r"\.experts\.((?:expert_)?)(\d{1,18})\.")


def layer_of(name: str) -> int | None:
    """The first decoder-block index in a tensor or module name (None outside the stack)."""
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of ``keys`` (dotted paths) present and not null in ``cfg``."""
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


class Reader:
    """Reads fields of one config with shared validation and messages.

    Args:
        cfg: the config dict (for multimodal families, already the text part).
        where: the file it came from, for messages.
    """

    def __init__(self, cfg: dict[str, Any], where: str) -> None:
        self.cfg = cfg
        self.where = where

    def get(self, *keys: str, default: Any = None) -> Any:
        """The first of ``keys`` present (see :func:`get`)."""
        return get(self.cfg, *keys, default=default)

    def has(self, key: str) -> bool:
        """Whether ``key`` is present and not null."""
        return get(self.cfg, key) is not None

    def count(self, key: str, default: int | None = 0, *, value: Any = None) -> int:
        """A whole, non-negative number at ``key`` (``value`` when given), else ``default``.

        Raises:
            ConfigError: floats (``1e12``), strings and booleans are typos, not counts.
        """
        if value is None:
            value = get(self.cfg, key, default=default)
        if type(value) is not int:
            raise ConfigError(
                f"{self.where}: {key} is {value!r}; it must be a whole number (fix the config)."
            )
        if value < 0:
            raise ConfigError(f"{self.where}: {key} is {value}; it must not be negative (fix the config).")
        return value

    def layer_list(self, key: str, value: Any) -> list[int]:
        """``value`` as a list of layer indices.

        Raises:
            ConfigError: not a list of whole numbers.
        """
        if not isinstance(value, list) or any(type(i) is not int for i in value):
            raise ConfigError(
                f"{self.where}: {key} is {value!r}; it must be a list of layer indices (fix the config)."
            )
        return value

    def num_layers(self) -> int:
        """Decoder layers (the first of :data:`LAYER_COUNT_KEYS` present)."""
        return self.count("num_hidden_layers", value=self.get(*LAYER_COUNT_KEYS, default=0))


class Layers(NamedTuple):
    """Where the MoE layers are: counts in moescope's layer numbering."""

    num_layers: int
    moe_layers: list[int]
    encoder_layers: int = 0


@dataclass(frozen=True)
class Fields:
    """Config field names (dotted) and the defaults transformers applies when one is absent.

    Attributes:
        experts: routed-expert count fields; the first present wins (aliases).
        top_k: the experts-per-token field; None when the routing rule fixes k.
        width: the routed experts' MLP width.
        experts_default: count when no field is present (transformers' default), else None.
        top_k_default: k when ``top_k`` is absent (transformers' default), else None: refuse.
        fixed_top_k: k the routing rule always uses, whatever the config says.
        shared_count: field holding the number of shared experts.
        shared_width: field holding the shared expert(s)' total width.
        shared_always: one shared expert of the routed width in every MoE layer (llama4).
        mtp: field holding the multi-token-prediction layers stored after the decoder.
        text_config: the fields live in ``text_config`` of a multimodal config.
        norm_topk: field that switches top-k renormalisation on or off.
    """

    experts: tuple[str, ...]
    top_k: str | None
    width: str
    experts_default: int | None = None
    top_k_default: int | None = None
    fixed_top_k: int | None = None
    shared_count: str | None = None
    shared_width: str | None = None
    shared_always: bool = False
    mtp: str | None = None
    text_config: bool = False
    norm_topk: str | None = None


@dataclass(frozen=True)
class Placement:
    """Which decoder layers are MoE.

    Attributes:
        rule: one of :data:`PLACEMENTS`:
            ``all``: every layer;
            ``sparse_step``: ``i not in fields[1] and (i+1) % fields[0] == 0`` (qwen2_moe);
            ``dense_prefix``: ``i >= fields[0] and i % fields[1] == 0`` (deepseek);
            ``interleave``: the list ``fields[0]``, else every ``fields[1]``-th layer (llama4);
            ``period``: ``i % fields[0] == fields[1]`` (jamba; defaults ``defaults``);
            ``listed``: the list ``fields[0]`` (moescope specs; encoder layers in ``fields[1]``);
            ``switch``: encoder then decoder blocks, every ``*_sparse_step``-th sparse.
            ``nllb``: encoder then decoder layers, layer i of a stack sparse when
            ``(i + 1) % *_sparse_step == 0`` (nllb-moe).
        fields: the config fields the rule reads.
        defaults: their defaults where transformers has one.
    """

    rule: str
    fields: tuple[str, ...] = ()
    defaults: tuple[int, ...] = ()

    def __call__(self, r: Reader, num_experts: int) -> Layers:
        """The layer count and MoE layer indices of one config."""
        if self.rule == "switch":
            return _switch_layers(r)
        if self.rule == "nllb":
            return _nllb_layers(r)
        n = r.num_layers()
        if self.rule == "all":
            return Layers(n, list(range(n)))
        if self.rule == "sparse_step":
            step = r.count(self.fields[0], 1) or 1
            only = set(r.layer_list(self.fields[1], r.get(self.fields[1], default=[]) or []))
            return Layers(
                n, [i for i in range(n) if i not in only and num_experts > 0 and (i + 1) % step == 0]
            )
        if self.rule == "dense_prefix":
            first = r.count(self.fields[0], 0)
            freq = r.count(self.fields[1], 1) or 1
            return Layers(n, [i for i in range(n) if i >= first and i % freq == 0 and num_experts > 0])
        if self.rule == "interleave":
            layers = r.get(self.fields[0])
            if layers is None:
                step = r.count(self.fields[1], 1) or 1
                layers = list(range(step - 1, n, step))
            return Layers(n, r.layer_list(self.fields[0], layers))
        if self.rule == "period":
            period = r.count(self.fields[0], self.defaults[0]) or 1
            offset = r.count(self.fields[1], self.defaults[1])
            return Layers(n, [i for i in range(n) if i % period == offset] if num_experts > 1 else [])
        if self.rule == "listed":
            enc = r.count(self.fields[1], 0)
            return Layers(n, r.layer_list(self.fields[0], r.cfg.get(self.fields[0], [])), enc)
        raise ValueError(f"unknown placement rule {self.rule!r}")


def _switch_layers(r: Reader) -> Layers:
    """Encoder blocks 0..enc-1, decoder blocks enc..enc+dec-1 in moescope's numbering.

    As transformers does: a saved ``*_sparse_step`` wins, else the step comes from
    ``num_sparse_*_layers`` (default 3); block i is sparse when i % step == 1, every block
    when step == 1, none when step == 0.
    """
    enc = r.count("num_layers", 12)
    dec = r.count("num_decoder_layers", enc)

    def sparse(n: int, stack: str) -> list[int]:
        if r.has(f"{stack}_sparse_step"):
            step = r.count(f"{stack}_sparse_step")
        else:
            n_sparse = r.count(f"num_sparse_{stack}_layers", 3)
            step = n // n_sparse if n_sparse > 0 else n
        return [i for i in range(n) if step > 0 and (i % step == 1 or step == 1)]

    return Layers(enc + dec, sparse(enc, "encoder") + [enc + i for i in sparse(dec, "decoder")], enc)


def _nllb_layers(r: Reader) -> Layers:
    """Encoder layers 0..enc-1, decoder layers enc..enc+dec-1 in moescope's numbering.

    As ``NllbMoeEncoder``/``NllbMoeDecoder`` build them: layer i of a stack is sparse when
    ``(i + 1) % step == 0``, none when the step is 0 (defaults: 12 + 12 layers, step 4).
    """
    enc = r.count("encoder_layers", 12)
    dec = r.count("decoder_layers", 12)

    def sparse(n: int, stack: str) -> list[int]:
        step = r.count(f"{stack}_sparse_step", 4)
        return [i for i in range(n) if step > 0 and (i + 1) % step == 0]

    return Layers(enc + dec, sparse(enc, "encoder") + [enc + i for i in sparse(dec, "decoder")], enc)


@dataclass(frozen=True)
class Routing:
    """How the router picks experts and weights.

    Attributes:
        rule: one of :data:`RULES` (each has a recomputation in the tests).
        renormalise: whether top-k weights are renormalised (the default when ``Fields.norm_topk``
            names a field), None when the question does not apply.
        groups: group-limited routing: None; ``always`` (when ``n_group > 1``); or
            ``topk_method`` (only with ``topk_method == "group_limited_greedy"``, deepseek_v2).
        drops_tokens: tokens over an expert's capacity are dropped (switch, nllb-moe).
    """

    rule: str
    renormalise: bool | None
    groups: str | None = None
    drops_tokens: bool = False

    @property
    def scoring(self) -> str:
        """The ``MoESpec.scoring`` name of the rule."""
        return RULES[self.rule]

    @property
    def group_needs_two(self) -> bool:
        """A group is scored by its top two experts, so it must keep at least two."""
        return self.rule == "sigmoid_group_limited"


@dataclass(frozen=True)
class Tensors:
    """Tensor naming, relative to a decoder layer (``model.layers.N.``).

    Attributes:
        blocks: MoE block names under the layer, the stored (``save_pretrained``) name first,
            then the in-memory one if transformers renames it on load.
        routers: router tensors under a block with one row per expert (weights, biases,
            ``e_score_correction_bias``), stored and in-memory names.
        experts: prefixes of routed-expert tensors under a block (``experts.`` everywhere;
            granite stores ``input_linear.`` / ``output_linear.``).
        shared: prefixes of shared-expert tensors under the layer (kept whole by pruning).
        stored: what ``save_pretrained`` writes: ``per_expert`` (``experts.{j}.*``), ``fused``
            (``[E, ...]``), ``packed`` (dbrx: ``[E*width, H]`` rows) or ``modules``
            (``experts.expert_{j}.*``).
        transposed: fused up/gate projections stored ``[E, H, 2I]`` (gpt_oss, llama4).
        rows_by_shape: any other block tensor whose first dimension is E holds one row per
            expert (router weights, biases, correction biases) and is sliced: the rule of the
            generic adapter, whose records are read from the modules.
    """

    blocks: tuple[str, ...]
    routers: tuple[str, ...]
    experts: tuple[str, ...] = ("experts.",)
    shared: tuple[str, ...] = ()
    stored: str = "per_expert"
    transposed: bool = False
    rows_by_shape: bool = False

    @property
    def packed(self) -> bool:
        """Experts packed as rows of 2-D tensors: dim 0 is E x width, not E."""
        return self.stored == "packed"


@dataclass(frozen=True)
class Hooks:
    """What :mod:`moescope.execution.routing` needs to record a family's routing.

    Attributes:
        adapter: one of :data:`ADAPTERS`: ``fused`` (pre-hook on an experts module decorated
            with ``use_experts_implementation``), ``dbrx``, ``llama4``, ``switch`` or ``nllb``.
        experts_class: transformers class of the experts module.
        router: in-memory path of the router weight under the MoE block.
    """

    adapter: str
    experts_class: str
    router: str

    @property
    def router_module(self) -> str:
        """Attribute of the MoE block that holds the router module."""
        return self.router.split(".")[0]


@dataclass(frozen=True)
class Attention:
    """Attention and KV-cache facts that differ by family.

    Attributes:
        kind: ``gqa`` (MHA/GQA/MQA by head counts), ``mla`` (DeepSeek latent KV) or
            ``hybrid`` (attention only in some layers; jamba: ``attn_layer_period/offset``).
        sliding: where ``sliding_window`` applies: None (never), ``all_layers`` (mistral-like,
            unless ``use_sliding_window`` is false), ``layer_types`` (per-layer list), or
            ``max_window_layers`` (qwen-like, layers from ``max_window_layers`` on, with
            ``use_sliding_window``).
    """

    kind: str = "gqa"
    sliding: str | None = None


@dataclass(frozen=True)
class Family:
    """Everything moescope knows about one MoE family (one module under ``moescope/families/``).

    Attributes:
        name: the config's ``model_type``.
        summary: one line: what the family is, example checkpoints.
        config_class: transformers config class, None for moescope's own spec format.
        fields: config field names.
        placement: which layers are MoE.
        routing: the routing rule and its defaults.
        tensors: checkpoint naming and layout.
        hooks: what routing needs; None when the format has no model to run.
        attention: attention/KV facts.
        aliases: other ``model_type`` values read as this family (``kimi_k2``).
        closed_form: name of the closed-form inventory in :mod:`moescope.arch.closedform`, None
            when parameters are counted on the meta device.
        tie_default: ``tie_word_embeddings`` when the config omits it.
        experts_implementation: ``from_pretrained`` accepts ``experts_implementation``.
        causal_lm: ``AutoModelForCausalLM`` loads it (False: encoder-decoder).
        prune: None when ``moescope prune`` supports the family, else why not.
    """

    name: str
    summary: str
    config_class: str | None
    fields: Fields
    placement: Placement
    routing: Routing
    tensors: Tensors
    hooks: Hooks | None
    attention: Attention = Attention()
    aliases: tuple[str, ...] = ()
    closed_form: str | None = "decoder_lm"
    tie_default: bool = False
    experts_implementation: bool = True
    causal_lm: bool = True
    prune: str | None = None
