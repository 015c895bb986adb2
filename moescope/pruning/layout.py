"""Where a checkpoint's routed experts live, and what removing some of them does to each tensor.

Everything family-specific comes from the registry (:mod:`moescope.families`): the MoE
block names, the router tensors (one row per expert), the routed-expert tensor prefixes,
whether experts are packed as rows (DBRX), the config fields that hold the expert count.

- :func:`detect_layout` finds each MoE layer's block prefix from its router tensors and
  checks it against the config's layer placement.
- :func:`plan_tensors` maps every tensor to its output: copied whole, renamed (per-expert
  tensors of kept experts, renumbered from 0), dropped, or sliced along dimension 0
  (fused ``[E, ...]`` tensors, packed rows, router rows and biases). The result is a list
  of byte ranges per output tensor that :mod:`moescope.pruning.rewrite` streams.
- :func:`updated_config` rewrites the expert-count field(s).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moescope import families
from moescope.arch.moe import MoESpec, moe_spec
from moescope.errors import CheckpointError, NotMoEError, PruneError
from moescope.families import LAYER_RE, PER_EXPERT_RE, Family
from moescope.pruning.rewrite import OutTensor
from moescope.pruning.source import Checkpoint


def prunable_family(config: dict[str, Any], where: str | Path = "config.json") -> Family:
    """The registry record of a config's family, if ``moescope prune`` supports it.

    Raises:
        NotMoEError: a dense family, or one the registry does not know.
        PruneError: a known family pruning does not support (the record says why).
    """
    record = families.require(config, "pruning", str(where))
    if record.prune is not None:
        raise PruneError(f"{where}: {record.name} checkpoints cannot be pruned: {record.prune}.")
    return record


def _spec(config: dict[str, Any], where: str | Path = "config.json") -> tuple[Family, MoESpec]:
    record = prunable_family(config, where)
    spec = moe_spec(config, str(where))
    if spec.num_experts < 2:
        raise NotMoEError(
            f"{where}: {spec.num_experts_field} is {spec.num_experts}; pruning needs a Mixture-of-Experts "
            "model with at least 2 routed experts."
        )
    return record, spec


def config_num_experts(config: dict[str, Any]) -> int:
    """The routed-expert count of a config, read from the field its family's record names.

    Raises:
        NotMoEError: a dense or unknown family, or fewer than 2 experts.
    """
    return _spec(config)[1].num_experts


def config_top_k(config: dict[str, Any]) -> int:
    """Experts per token of a config (the family's field, or the k its routing rule fixes).

    Raises:
        PruneError: the config does not say (pruning will not guess a default).
    """
    record, spec = _spec(config)
    if spec.top_k < 1:
        raise PruneError(
            f"config.json has no {record.fields.top_k}: the number of experts each token uses is unknown, "
            f"and pruning needs it to know how many experts must stay; add {record.fields.top_k} to the config."
        )
    return spec.top_k


@dataclass(frozen=True)
class MoELayout:
    """Where the routed experts of one checkpoint live.

    Attributes:
        num_experts: routed experts per MoE layer.
        top_k: experts per token.
        layers: MoE layer index -> MoE block prefix (e.g. ``model.layers.3.mlp.``).
        family: the registry family (its tensor naming drives :func:`plan_tensors`).
        expert_width: one expert's width (packed layouts: rows per expert).
    """

    num_experts: int
    top_k: int
    layers: dict[int, str]
    family: str = ""
    expert_width: int = 0


def detect_layout(ckpt: Checkpoint) -> MoELayout:
    """Find the MoE blocks from the tensor names: a router tensor with E rows marks a block.

    Raises:
        NotMoEError: a dense or unknown family, or no router tensors.
        PruneError: an unsupported family, no top-k in the config, or MTP layers with experts.
        CheckpointError: routers in other layers than the config's MoE layers.
    """
    where = ckpt.path / "config.json"
    record, spec = _spec(ckpt.config, where)
    top_k = config_top_k(ckpt.config)
    num_experts = spec.num_experts
    layers: dict[int, str] = {}
    for info in ckpt.tensors.values():
        m = LAYER_RE.search(info.name)
        if not m or not info.shape or info.shape[0] != num_experts:
            continue
        prefix, rest = info.name[: m.end() + 1], info.name[m.end() + 1 :]
        for block in record.tensors.blocks:
            if rest.startswith(f"{block}.") and rest[len(block) + 1 :] in record.tensors.routers:
                layers[int(m.group(1))] = f"{prefix}{block}."
    if not layers:
        raise NotMoEError(
            f"{ckpt.path}: no router tensors ({', '.join(record.tensors.routers)}) with {num_experts} rows "
            f"found; this checkpoint's layout does not match the {record.name} family's."
        )
    mtp = sorted(i for i in layers if spec.num_layers and i >= spec.num_layers)
    if mtp:
        # deepseek_v3-style MTP layers sit after the decoder; transformers does not build them
        # and a trace never sees them, so their experts cannot be scored.
        raise PruneError(
            f"{ckpt.path} has multi-token-prediction layers {mtp} with routed experts, which a trace "
            "cannot score; pruning checkpoints with MTP layers is not supported yet."
        )
    if spec.num_layers and sorted(layers) != spec.moe_layers:
        raise CheckpointError(
            f"{ckpt.path}: routers in layers {sorted(layers)}, but config.json makes layers "
            f"{spec.moe_layers} MoE; the config does not belong to these weights."
        )
    return MoELayout(
        num_experts, top_k, dict(sorted(layers.items())), record.name, spec.expert_intermediate_size
    )


def _check_kept(layout: MoELayout, kept: dict[int, list[int]]) -> None:
    num = layout.num_experts
    for layer in layout.layers:
        if layer not in kept:
            raise PruneError(f"no kept experts given for MoE layer {layer}.")
    for layer, ids in kept.items():
        if layer not in layout.layers:
            raise PruneError(f"layer {layer} is not a MoE layer (MoE layers: {list(layout.layers)}).")
        bad = [j for j in ids if not 0 <= j < num]
        if bad or len(set(ids)) != len(ids):
            raise PruneError(
                f"layer {layer}: unknown or repeated expert ids {bad or ids}; ids run 0..{num - 1}."
            )
    counts = {len(v) for v in kept.values()}
    if len(counts) != 1:
        raise PruneError(f"every layer must keep the same number of experts, got {sorted(counts)}.")


def plan_tensors(
    ckpt: Checkpoint, layout: MoELayout, kept: dict[int, list[int]]
) -> dict[str, list[OutTensor]]:
    """Map every input tensor to its output (renamed, sliced or dropped), per shard.

    Raises:
        PruneError: a kept expert id is unknown or the plan misses a MoE layer.
        CheckpointError: an experts tensor whose first dimension does not match E, or a
            tensor in a MoE block that the family's naming does not explain.
    """
    _check_kept(layout, kept)
    record = families.lookup(layout.family)
    if record is None:
        raise PruneError(f"layout of unknown family {layout.family!r}; build it with detect_layout().")
    out: dict[str, list[OutTensor]] = {s: [] for s in ckpt.shards}
    for info in ckpt.tensors.values():
        layer = families.layer_of(info.name)
        block = layout.layers.get(layer) if layer is not None else None
        if layer is None or block is None or not info.name.startswith(block):
            out[str(info.file)].append(OutTensor.whole(info))
            continue
        sliced = _block_tensor(info, block, sorted(kept[layer]), layout, record)
        if sliced is not None:
            out[str(info.file)].append(sliced)
    return out


def _block_tensor(
    info: Any, block: str, ids: list[int], layout: MoELayout, record: Family
) -> OutTensor | None:
    """The output of one tensor inside a MoE block (None: dropped with its expert)."""
    num = layout.num_experts
    rel = info.name[len(block) :]
    t = record.tensors
    if rel in t.routers:
        if info.shape[0] != num:
            raise CheckpointError(f"{info.name} has {info.shape[0]} rows, not the {num} experts.")
        return OutTensor.rows(info, num, ids)
    if not any(rel.startswith(p) for p in t.experts):
        if len(info.shape) >= 3:
            raise CheckpointError(
                f"{info.name} has shape {list(info.shape)} but is not a {record.name} expert or router "
                "tensor; this checkpoint layout is not supported for pruning."
            )
        return OutTensor.whole(info)  # shared experts, shared gates, norms of the block
    per = PER_EXPERT_RE.match(info.name, len(block) - 1)
    if per is not None:
        j = int(per.group(2))
        if j >= num:
            raise CheckpointError(f"{info.name}: expert {j} but the config has {num} experts.")
        if j not in ids:
            return None
        # renumber from 0: a gap in expert numbering loads silently compacted (docs/TRANSFORMERS_MOE.md)
        name = f"{info.name[: per.start(2)]}{ids.index(j)}{info.name[per.end(2) :]}"
        return OutTensor.whole(info, name)
    if not info.shape:
        raise CheckpointError(f"{info.name}: scalar inside the experts; this layout is not supported.")
    rows = info.shape[0]
    width = layout.expert_width
    if t.packed and rows % num == 0 and (not width or rows == num * width):
        return OutTensor.rows(info, num, ids)  # expert j owns rows j*I .. (j+1)*I
    if not t.packed and rows == num:
        return OutTensor.rows(info, num, ids)
    raise CheckpointError(
        f"{info.name} has shape {list(info.shape)}, first dimension not the {num} experts"
        + (f" x {width} rows" if t.packed and width else "")
        + "; this checkpoint layout is not supported for pruning."
    )


def updated_config(config: dict[str, Any], keep: int, num_experts: int) -> tuple[dict[str, Any], list[str]]:
    """Copy of ``config`` with the family's expert-count field(s) set to ``keep``.

    Every alias the record lists that holds ``num_experts`` is updated (a saved config may
    hold both ``num_experts`` and ``num_local_experts``).

    Returns:
        The new config and the dotted names of the fields changed.

    Raises:
        PruneError: no expert-count field held ``num_experts``.
    """
    record = prunable_family(config)
    new = json.loads(json.dumps(config))
    scopes = [("", new)]
    if record.fields.text_config and isinstance(new.get("text_config"), dict):
        scopes.insert(0, ("text_config.", new["text_config"]))
    changed: list[str] = []
    for label, scope in scopes:
        for key in record.fields.experts:
            *parents, leaf = key.split(".")
            holder: Any = scope
            for part in parents:
                holder = holder.get(part) if isinstance(holder, dict) else None
            if isinstance(holder, dict) and holder.get(leaf) == num_experts:
                holder[leaf] = keep
                changed.append(f"{label}{key}")
    if not changed:
        raise PruneError(
            f"no expert-count field ({', '.join(record.fields.experts)}) equal to {num_experts} in config.json."
        )
    return new, changed
