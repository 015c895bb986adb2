"""``moescope params``: total versus active parameters, FLOPs and memory of a checkpoint.

How: a :class:`~moescope.checkpoint.ref.Checkpoint` (config + tensors read from safetensors
headers, or a tensor inventory computed from the config) is classified tensor by tensor
(:func:`moescope.arch.moe.classify`) and summed per component and per layer.

Conventions (also in the README and ``moescope params --help``):

- ``total_params``: every parameter, tied tensors once, quantised tensors counted as the
  logical parameters they encode (MXFP4 blocks: 2 per byte; scales are not parameters).
  MTP layers are reported apart (``mtp_params``) and not included, as transformers does
  not build them; vision towers are included in the total.
- ``active_params``: total minus, per MoE layer, routed-expert parameters × (1 − k/N);
  embedding and LM head included (the Mixtral "12.9B" convention). Vision towers are
  not active for text. ``active_params_no_embedding`` leaves the input embedding out
  (the gpt-oss convention; with tied embeddings the shared matrix stays, as the head).
- ``flops_per_token``: 2 × active matmul weights (no embedding lookup, LM head
  included) + attention scores and values against ``context`` keys (sliding windows
  respected): 2 · heads · (d_qk + d_v) · min(context, window) per attention layer.
- ``kv_cache_bytes_per_token``: bf16 K and V per token over all attention layers
  (MLA: the compressed latent plus the RoPE key, as DeepSeek caches it).
"""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from math import prod
from typing import Any

from moescope.arch.closedform import config_inventory
from moescope.arch.inventory import Inventory, as_inventory, gc_paused
from moescope.arch.moe import COMPONENTS, ENCODER_DECODER, MoESpec, classify
from moescope.arch.specfile import config_spec
from moescope.arch.storedsize import estimate_stored_bytes
from moescope.arch.tensorclasses import ClassGroup, ShardClassifier, classify_groups, spec_from_names
from moescope.checkpoint.ref import Checkpoint, open_checkpoint
from moescope.errors import ConfigError
from moescope.families import get as _get

DEFAULT_CONTEXT = 4096


@dataclass
class LayerRow:
    """One row of ``--per-layer``: a decoder layer, or a tensor group outside the stack."""

    layer: int | None
    kind: str
    params: int
    active_params: int | None


@dataclass
class ParamsReport:
    """Everything ``moescope params`` reports for one model. JSON keys = field names."""

    model: str
    model_type: str
    is_moe: bool
    total_params: int
    active_params: int | None
    active_params_no_embedding: int | None
    flops_per_token: int | None
    context: int
    num_experts: int
    top_k: int
    num_shared_experts: int
    moe_layers: list[int]
    num_layers: int
    activation_ratio: float | None
    topk_ratio: float | None
    components: dict[str, int]
    active_components: dict[str, int] | None
    weight_bytes: int | None
    #: ``"headers"`` (read: the sum of the safetensors headers' tensor sizes), ``"config"``
    #: (estimated from the config, ``quantization_config`` included) or None (unknown)
    weight_bytes_source: str | None
    #: how a config estimate was made (``"fp8 128x128 blocks + bfloat16"``); None from headers
    weight_bytes_format: str | None
    weight_dtypes: dict[str, int]
    memory_bytes: dict[str, int | None]
    kv_cache_bytes_per_token: int | None
    kv_cache_bytes_at_context: int | None
    kv_cache_layout: str | None
    mtp_params: int
    vision_params: int
    source: str
    source_kind: str
    notes: list[str] = field(default_factory=list)
    per_layer: list[LayerRow] = field(default_factory=list)

    def to_dict(self, per_layer: bool = False) -> dict[str, Any]:
        """JSON-ready dict (``per_layer`` rows only when asked)."""
        d = asdict(self)
        if not per_layer:
            d.pop("per_layer")
        return d


@dataclass
class _Acc:
    """Sums over the classified tensors (one pass over the class groups)."""

    total: int = 0
    by_comp: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    routed_by_layer: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    layer_params: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    matmul_dense: int = 0
    matmul_routed_by_layer: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    mtp: int = 0
    vision: int = 0
    embed_shapes: list[tuple[int, ...]] = field(default_factory=list)
    head_present: bool = False
    tied_skip: bool = False
    head_matmul: int = 0
    experts_seen: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))
    fused_experts: dict[int, int] = field(default_factory=dict)
    expert_like_unknown: bool = False
    weight_bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def _attention_layers(cfg: dict[str, Any], spec: MoESpec) -> tuple[list[dict[str, Any]], str]:
    """Per attention layer: heads, qk/v head dims, KV elements per token, sliding window."""
    fam = spec.family
    text = cfg.get("text_config")
    c: dict[str, Any] = text if isinstance(text, dict) else cfg
    hidden = int(_get(c, "hidden_size", "d_model", "n_embd", default=0) or 0)
    heads = int(
        _get(c, "num_attention_heads", "n_heads", "n_head", "num_heads", "encoder_attention_heads", default=0)
        or 0
    )
    if not hidden or not heads:
        return [], "unknown"
    kv = int(_get(c, "num_key_value_heads", "attn_config.kv_n_heads", default=heads) or heads)
    hd = int(_get(c, "head_dim", "d_kv", default=hidden // heads) or hidden // heads)
    n = spec.num_layers
    layer_ids = list(range(n))
    if fam == "jamba":
        period = int(_get(c, "attn_layer_period", default=8))
        offset = int(_get(c, "attn_layer_offset", default=4))
        layer_ids = [i for i in range(n) if i % period == offset]
    windows: list[int | None] = [None] * n
    types = _get(c, "layer_types")
    sw = _get(c, "sliding_window")
    if isinstance(types, list) and len(types) == n:
        windows = [int(sw) if t == "sliding_attention" and sw else None for t in types]
    elif sw and fam in ("mistral", "mixtral", "phimoe") and _get(c, "use_sliding_window", default=True):
        windows = [int(sw)] * n
    elif sw and _get(c, "use_sliding_window", default=False):
        max_win = int(_get(c, "max_window_layers", default=n))
        windows = [int(sw) if i >= max_win else None for i in range(n)]
    if fam in ("deepseek_v2", "deepseek_v3"):
        rope = int(_get(c, "qk_rope_head_dim", default=64))
        nope = int(_get(c, "qk_nope_head_dim", default=128))
        v = int(_get(c, "v_head_dim", default=128))
        lora = int(_get(c, "kv_lora_rank", default=512))
        rows = [
            dict(layer=i, heads=heads, dqk=nope + rope, dv=v, kv_elems=lora + rope, window=None)
            for i in layer_ids
        ]
        return rows, "MLA"
    layout = "MHA" if kv == heads else ("MQA" if kv == 1 else "GQA")
    if any(windows):
        layout += "+sliding"
    rows = [
        dict(layer=i, heads=heads, dqk=hd, dv=hd, kv_elems=2 * kv * hd, window=windows[i]) for i in layer_ids
    ]
    return rows, layout


def _resolve(ck: Checkpoint) -> tuple[dict[str, Any] | None, MoESpec, Inventory, str, list[str]]:
    """(config, spec, tensors, where, notes) of a checkpoint, its config validated first."""
    cfg = ck.config
    notes = list(ck.notes)
    where = ck.config_where if cfg is not None else (ck.location or ck.ref)
    if cfg is not None:
        # Every field is checked before any arithmetic: a bad value is one clean error,
        # never an impossible number, a huge allocation or a traceback.
        cfg, spec = config_spec(cfg, where)
        tensors = ck.tensors or as_inventory(config_inventory(cfg, spec, where))
    else:
        tensors = ck.tensors
        spec = spec_from_names(tensors)
    if not spec.known and cfg is not None:
        notes.append(f"model_type {spec.model_type!r} is not a family moescope knows: accounted as dense")
    return cfg, spec, tensors, where, notes


def _contradiction(tensors: Inventory, spec: MoESpec, where: str) -> ConfigError:
    """The error for the first routed-expert tensor (in inventory order) in a layer the config
    makes dense."""
    moe = set(spec.moe_layers)
    for t in tensors:
        c = classify(t.name, spec, len(t.shape))
        if c.component == "routed_experts" and c.is_param and (c.layer is None or c.layer not in moe):
            break
    return ConfigError(
        f"{where}: tensor {t.name} holds routed experts but the config makes layer {c.layer} "
        f"{'dense' if spec.is_moe else 'dense (no MoE fields)'}; the config contradicts the "
        "checkpoint — pass the config.json that came with these weights."
    )


#: names of fused tensors whose first dimension counts the experts
_FUSED_FIRST = ("gate_up_proj", "gate_up_proj_blocks", "w1", ".w1.weight")


def _accumulate(
    tensors: Inventory, spec: MoESpec, where: str, groups: list[ClassGroup] | None = None
) -> _Acc:
    """Sum parameters per component, layer and expert over the classified tensors."""
    acc = _Acc()
    names, shapes, nbytes, dtypes = tensors.names, tensors.shapes, tensors.nbytes, tensors.dtypes
    acc.weight_bytes = sum(nbytes)
    # a handful of (dtype, size) pairs, counted at C speed
    for (dt, size), count in Counter(zip(dtypes, nbytes, strict=True)).items():
        if dt:
            acc.dtypes[dt] += size * count
    if groups is None:
        groups = classify_groups(tensors, spec)
    for g in groups:
        c = g.cls
        if c.component == "lm_head" and c.is_param:
            acc.head_present |= any(names[i].endswith("weight") for i in g.positions)
        if c.component == "embedding" and c.is_param:
            acc.embed_shapes.extend(shapes[i] for i in g.positions)
    acc.tied_skip = spec.tie_word_embeddings and acc.head_present and bool(acc.embed_shapes)
    moe_layers = set(spec.moe_layers)
    fused: list[tuple[int, int, int]] = []  # (position, layer, experts): the last one counts
    for g in groups:
        c = g.cls
        if not c.is_param or (c.component == "lm_head" and acc.tied_skip):
            continue
        n = sum(map(prod, map(shapes.__getitem__, g.positions))) * c.param_factor
        comp = c.component
        if comp == "routed_experts" and (c.layer is None or c.layer not in moe_layers):
            if spec.is_moe or spec.known:
                raise _contradiction(tensors, spec, where)
            acc.expert_like_unknown = True
            comp = "dense_mlp"
        if comp == "mtp":
            acc.mtp += n
            continue
        acc.total += n
        acc.by_comp[comp] += n
        if comp == "vision":
            acc.vision += n
            continue
        if c.layer is not None:
            acc.layer_params[c.layer] += n
        if comp == "routed_experts":
            layer = c.layer if c.layer is not None else -1
            acc.routed_by_layer[layer] += n
            if g.experts is not None:
                acc.experts_seen[layer].update(g.experts)
            else:
                fused.extend(
                    (i, layer, shapes[i][0])
                    for i in g.positions
                    if len(shapes[i]) >= 2 and names[i].endswith(_FUSED_FIRST)
                )
            if c.is_matmul:
                acc.matmul_routed_by_layer[layer] += n
        elif c.is_matmul:
            acc.matmul_dense += n
            if comp == "lm_head":
                acc.head_matmul += n
    for _pos, layer, e in sorted(fused):
        if spec.family == "dbrx" and spec.expert_intermediate_size:
            e //= spec.expert_intermediate_size  # DBRX packs experts as [E*I, H]
        acc.fused_experts[layer] = e
    return acc


def _check_experts(acc: _Acc, spec: MoESpec, ck: Checkpoint, cfg: dict[str, Any] | None, where: str) -> None:
    """The config's expert count and MoE layers must match the stored tensors."""
    if not spec.is_moe or cfg is None:
        return
    for layer in sorted(set(acc.experts_seen) | set(acc.fused_experts)):
        if layer in acc.fused_experts:
            found = acc.fused_experts[layer]
        else:
            found = max(acc.experts_seen[layer]) + 1
        if found != spec.num_experts:
            raise ConfigError(
                f"{where}: config says {spec.num_experts} experts ({spec.num_experts_field}) but layer {layer} "
                f"stores {found}; the config contradicts the checkpoint — pass the config.json that came "
                "with these weights."
            )
    missing = [i for i in spec.moe_layers if i not in acc.routed_by_layer]
    if missing and ck.tensors:
        raise ConfigError(
            f"{where}: config makes layer {missing[0]} an MoE layer but the checkpoint stores no experts there; "
            "pass the config.json that came with these weights."
        )


def _tie_head(acc: _Acc, spec: MoESpec) -> None:
    """With tied embeddings the head reuses the embedding matrix: its matmul still costs FLOPs."""
    shapes = acc.embed_shapes
    if acc.tied_skip:
        acc.head_matmul = shapes[0][0] * shapes[0][1] if len(shapes[0]) == 2 else 0
    elif spec.tie_word_embeddings and not acc.head_present and shapes and len(shapes[0]) == 2:
        acc.head_matmul = shapes[0][0] * shapes[0][1]
    if acc.tied_skip or (spec.tie_word_embeddings and not acc.head_present):
        acc.matmul_dense += acc.head_matmul


def _active(acc: _Acc, spec: MoESpec, notes: list[str]) -> tuple[int | None, int, float]:
    """(active params or None when top-k is unknown, routed params left out, k/N)."""
    k_known = spec.is_moe and spec.top_k > 0
    frac = spec.top_k / spec.num_experts if k_known else 1.0
    inactive = sum(int(round(v * (1 - frac))) for v in acc.routed_by_layer.values()) if k_known else 0
    if spec.is_moe and not k_known:
        notes.append("top-k unknown (no config): active parameters and FLOPs cannot be computed")
        return None, inactive, frac
    return acc.total - inactive - acc.vision, inactive, frac


def _embedding_only(acc: _Acc, spec: MoESpec) -> int:
    """Parameters used only as the input embedding (left out of ``active_params_no_embedding``)."""
    embed_params = acc.by_comp.get("embedding", 0)
    shapes = acc.embed_shapes
    if spec.tie_word_embeddings and shapes and len(shapes[0]) == 2:
        # the shared matrix serves as the head: only position embeddings are "embedding only"
        return embed_params - shapes[0][0] * shapes[0][1]
    return embed_params


def _per_layer(acc: _Acc, moe_layers: set[int], active: int | None, frac: float) -> list[LayerRow]:
    rows: list[LayerRow] = []
    for layer in sorted(acc.layer_params):
        total_l = acc.layer_params[layer]
        routed = acc.routed_by_layer.get(layer, 0)
        act_l = None if active is None else total_l - int(round(routed * (1 - frac)))
        kind = "moe" if layer in moe_layers else "dense"
        rows.append(LayerRow(layer, kind, total_l, act_l))
    for comp in ("embedding", "lm_head", "vision"):
        if acc.by_comp.get(comp):
            n = acc.by_comp[comp]
            rows.append(LayerRow(None, comp, n, 0 if comp == "vision" else n))
    rest = acc.total - sum(r.params for r in rows)
    if rest:
        rows.append(LayerRow(None, "final_norm_and_other", rest, rest))
    if acc.mtp:
        rows.append(LayerRow(None, "mtp", acc.mtp, 0))
    return rows


def _flops_and_kv(
    acc: _Acc, attn_rows: list[dict[str, Any]], active: int | None, frac: float, context: int
) -> tuple[int | None, int | None, int | None]:
    """(FLOPs per token, KV-cache bytes per token, KV-cache bytes at ``context``)."""
    flops: int | None = None
    if active is not None:
        mm_active = acc.matmul_dense + sum(int(round(v * frac)) for v in acc.matmul_routed_by_layer.values())
        attn = sum(
            2 * r["heads"] * (r["dqk"] + r["dv"]) * min(context, r["window"] or context) for r in attn_rows
        )
        flops = 2 * mm_active + attn
    if not attn_rows:
        return flops, None, None
    kv_per_token = sum(r["kv_elems"] for r in attn_rows) * 2
    kv_ctx = sum(r["kv_elems"] * 2 * min(context, r["window"] or context) for r in attn_rows)
    return flops, kv_per_token, kv_ctx


def account(
    ck: Checkpoint, context: int = DEFAULT_CONTEXT, *, classes: ShardClassifier | None = None
) -> ParamsReport:
    """Account a checkpoint's parameters, FLOPs and memory.

    Args:
        ck: an opened checkpoint (see :func:`moescope.checkpoint.ref.open_checkpoint`).
        context: keys each token attends to, for attention FLOPs and KV-cache size.
        classes: the classifier ``ck`` was opened with as ``per_shard``, whose per-shard
            classes are used when they fit (else the tensors are classified here).

    Returns:
        A :class:`ParamsReport`.

    Raises:
        ConfigError: a config field is malformed or impossible (checked by
            :func:`moescope.arch.validate.validate_config` before any arithmetic), or the config's
            MoE fields contradict the stored tensors.
    """
    if context < 1:
        raise ConfigError(f"--context must be at least 1, got {context}.")
    cfg, spec, tensors, where, notes = _resolve(ck)
    with gc_paused():
        groups = (
            None if classes is None or tensors is not ck.tensors else classes.groups(ck.shard_extras, spec)
        )
        acc = _accumulate(tensors, spec, where, groups)
    if acc.expert_like_unknown:
        warnings.warn(
            f"model_type {spec.model_type!r} is unknown to moescope but has expert-like tensors; they are "
            "counted as dense MLP (active = total). Open an issue with the config to add the family.",
            stacklevel=2,
        )
        notes.append("unknown family with expert-like tensors: counted as dense")
    _check_experts(acc, spec, ck, cfg, where)
    _tie_head(acc, spec)
    active, inactive, frac = _active(acc, spec, notes)
    active_no_emb = None if active is None else active - _embedding_only(acc, spec)

    attn_rows, layout = _attention_layers(cfg, spec) if cfg is not None else ([], "unknown")
    flops, kv_per_token, kv_ctx = _flops_and_kv(acc, attn_rows, active, frac, context)
    if spec.family in ENCODER_DECODER:
        notes.append("encoder-decoder: attention FLOPs count self-attention of every block only")
    components = {c: int(acc.by_comp.get(c, 0)) for c in COMPONENTS if c != "mtp"}
    components["mtp"] = acc.mtp
    active_components = None
    if active is not None:
        active_components = {**components, "routed_experts": components["routed_experts"] - inactive}
        active_components.update(vision=0, mtp=0)

    stored_format: str | None = None
    if ck.tensors:
        stored: int | None = acc.weight_bytes
        stored_source: str | None = "headers"
    else:
        est = estimate_stored_bytes(cfg or {}, spec, tensors)
        stored, stored_format = est.bytes, est.format
        stored_source = "config" if stored is not None else None
        notes.extend(est.notes)
        if stored is not None:
            notes.append(f"weight_bytes estimated from the config ({stored_format})")
    memory: dict[str, int | None] = {
        "stored": stored,
        "bf16": acc.total * 2,
        "fp8": acc.total,
        "int4": acc.total // 2,
    }
    moe_layers = set(spec.moe_layers)
    return ParamsReport(
        model=ck.ref,
        model_type=spec.model_type,
        is_moe=spec.is_moe,
        total_params=acc.total,
        active_params=active,
        active_params_no_embedding=active_no_emb,
        flops_per_token=flops,
        context=context,
        num_experts=spec.num_experts if spec.is_moe else 0,
        top_k=spec.top_k if spec.is_moe else 0,
        num_shared_experts=spec.num_shared_experts if spec.is_moe else 0,
        moe_layers=sorted(moe_layers),
        num_layers=spec.num_layers,
        activation_ratio=(active / acc.total) if active is not None and acc.total else None,
        topk_ratio=spec.topk_ratio,
        components=components,
        active_components=active_components,
        weight_bytes=stored,
        weight_bytes_source=stored_source,
        weight_bytes_format=stored_format,
        weight_dtypes=dict(acc.dtypes),
        memory_bytes=memory,
        kv_cache_bytes_per_token=kv_per_token,
        kv_cache_bytes_at_context=kv_ctx,
        kv_cache_layout=layout if attn_rows else None,
        mtp_params=acc.mtp,
        vision_params=acc.vision,
        source=ck.source,
        source_kind=ck.kind,
        notes=notes,
        per_layer=_per_layer(acc, moe_layers, active, frac),
    )


def count_params(ref: str, *, revision: str | None = None, context: int = DEFAULT_CONTEXT) -> ParamsReport:
    """Open a model reference and account it: the one-call API behind ``moescope params``.

    Args:
        ref: ``demo``, a checkpoint directory, a ``.safetensors`` or ``.json`` file, or a hub id.
        revision: hub revision (branch, tag or commit).
        context: keys each token attends to, for attention FLOPs and the KV cache.

    Example:
        >>> r = count_params("demo")
        >>> r.total_params > r.active_params
        True
    """
    with gc_paused():  # ~1M short-lived acyclic objects for a 139k-tensor checkpoint
        classes = ShardClassifier()  # a large checkpoint's shards are classified as they are read
        return account(open_checkpoint(ref, revision, per_shard=classes), context, classes=classes)
