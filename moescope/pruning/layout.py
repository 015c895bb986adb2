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

import functools
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moescope import families
from moescope.arch.moe import MoESpec, layer_index, moe_spec
from moescope.errors import CheckpointError, NotMoEError, PruneError
from moescope.families import LAYER_RE, PER_EXPERT_RE, Family
from moescope.pruning.rewrite import OutTensor, row_ranges
from moescope.pruning.source import Checkpoint


def generic_record(config: dict[str, Any], where: str | Path = "config.json") -> Family | None:
    """A pruning record for a family without one, read from transformers' modules.

    :func:`moescope.arch.discover.discover` gives the MoE blocks, routers, shared experts and
    the config field holding the expert count; the record names them relative to a layer, and
    slices every other block tensor whose first dimension is E (``rows_by_shape``). None when
    transformers does not know the family or it has no routed experts.

    Group-limited routing (``n_group`` > 1) is kept consistent by the planner, which keeps the
    same number of experts in every group (:func:`moescope.arch.moe.routing_groups`).

    Raises:
        PruneError: what pruning cannot keep consistent: experts in several places of one
            layer, or no config field holding the expert count.
    """
    from moescope.arch.discover import EXPERT_KEYS, discover

    found = discover(config, str(where))
    if found is None or not found.is_moe:
        return None
    name = str(config.get("model_type") or "")
    scope = config.get(found.text_scope) if found.text_scope else config
    scope = scope if isinstance(scope, dict) else config
    if found.num_experts_field is None:
        raise PruneError(
            f"{where}: no config field holds {name}'s {found.num_experts} experts, so the pruned config "
            "could not say how many remain."
        )

    def rel(path: str) -> str:
        m = LAYER_RE.search(path)
        return path[m.end() + 1 :] if m else path

    blocks = sorted({rel(s.block) for s in found.sites})
    by_block = {rel(s.block): s for s in found.sites}
    if len(found.sites) != len({(s.stack, s.layer) for s in found.sites}):
        raise PruneError(
            f"{where}: {name} has two experts modules in one layer; pruning it is not supported."
        )
    routers: set[str] = set()
    experts: set[str] = set()
    shared: set[str] = set()
    for b, site in by_block.items():
        experts.add(site.experts[len(site.block) + 1 :] + ".")
        if site.router:
            r = site.router[len(site.block) + 1 :]
            routers.update(f"{r}.{leaf}" for leaf in ("weight", "bias", "e_score_correction_bias"))
            routers.update(f"{r}.{t}" for t in site.router_tensors)
        shared.update(f"{b}.{p[len(site.block) + 1 :]}" for p in site.shared)
    # the router's tensors under the names the checkpoint stores them (transformers renames
    # some on saving): inside the block they are router tensors of it; one outside the block
    # (kolibri1's moe.router.expert_bias beside mlp.) makes the whole layer the block. When
    # none is inside, the checkpoint renames the block itself (block_sparse_moe for mlp):
    # detect_layout finds it by the routers' in-memory names, as before
    outside: set[str] = set()
    found_inside: set[str] = set()
    for stored in found.stored_routing:
        if ".#." not in stored:  # layer numbers are blanked to "#"
            continue
        lr = stored.partition(".#.")[2]
        inside = [lr if not b else lr[len(b) + 1 :] for b in blocks if not b or lr.startswith(b + ".")]
        if inside:
            found_inside.update(inside)
        else:
            outside.add(lr)
    routers |= found_inside
    if outside and found_inside:
        routers = {f"{b}.{r}" if b else r for b in blocks for r in routers} | outside
        experts = {f"{b}.{e}" if b else e for b in blocks for e in experts}
        blocks = [""]
    field = found.num_experts_field.rpartition(".")[2]
    from moescope.families._base import Attention, Fields, Placement, Routing, Tensors

    return Family(
        name=name,
        summary="read from transformers' modules (moescope.arch.discover)",
        config_class=None,
        fields=Fields(
            experts=(field, *(k for k in EXPERT_KEYS if k != field)),
            top_k=found.top_k_field if found.top_k_field != "router.top_k" else None,
            width="intermediate_size",
            fixed_top_k=found.top_k if found.top_k_field == "router.top_k" else None,
            text_config=bool(found.text_scope),
        ),
        placement=Placement("all"),
        routing=Routing("softmax_topk", renormalise=None),
        tensors=Tensors(
            blocks=tuple(blocks),
            routers=tuple(sorted(routers)),
            experts=tuple(sorted(experts)),
            shared=tuple(sorted(shared)),
            stored="per_expert",
            rows_by_shape=True,
        ),
        hooks=None,
        attention=Attention(),
    )


def prunable_family(config: dict[str, Any], where: str | Path = "config.json") -> Family:
    """The record of a config's family, if ``moescope prune`` supports it.

    The registry's record when there is one, else one read from transformers' modules
    (:func:`generic_record`).

    Raises:
        NotMoEError: a dense family, or one neither the registry nor transformers knows.
        PruneError: a known family pruning does not support (the record says why).
    """
    if families.lookup(families.family_of(config)) is None:
        generic = generic_record(config, where)
        if generic is not None:
            return generic
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
        class_rows: router tensors (layer-relative, as stored) with rows past the E experts'
            that the config sizes apart from E, and how many (:func:`class_rows`).
    """

    num_experts: int
    top_k: int
    layers: dict[int, str]
    family: str = ""
    expert_width: int = 0
    class_rows: dict[str, int] = field(default_factory=dict)


def _layer_relative(name: str) -> str:
    m = LAYER_RE.search(name)
    return name[m.end() + 1 :] if m else name


@functools.lru_cache(maxsize=16)
def _class_rows_json(text: str) -> tuple[tuple[str, int], ...]:
    from moescope.arch.discover import build_meta_model, discover, stored_keys

    config = json.loads(text)
    found = discover(config)
    if found is None or not found.is_moe or found.num_experts_field is None:
        return ()
    e = found.num_experts
    names = [f"{s.router}.{t}" for s in found.sites if s.router for t in s.router_tensors]
    bigger = json.loads(text)
    holder = bigger
    *parents, leaf = found.num_experts_field.split(".")
    for part in parents:
        holder = holder[part]
    holder[leaf] = 2 * e  # 2E keeps group-limited routing's divisibility
    try:
        models = build_meta_model(config), build_meta_model(bigger)
    except Exception:  # the config validator refuses 2E: no extra rows known, none sliced
        return ()
    small, big = (dict(m.state_dict(keep_vars=True)) for m in models)
    out: dict[str, int] = {}
    for name in names:
        a, b = small.get(name), big.get(name)
        if a is None or b is None or not a.dim() or a.shape[0] <= e:
            continue
        extra = int(a.shape[0]) - e
        if int(b.shape[0]) == 2 * e + extra:  # E rows, and rows the config sizes apart from E
            for stored in stored_keys(models[0], [name]):
                out[stored.partition(".#.")[2]] = extra  # layer numbers are blanked to "#"
    return tuple(sorted(out.items()))


def class_rows(config: dict[str, Any]) -> dict[str, int]:
    """Router tensors with rows past the E experts', the config sizing them apart from E.

    inkling scores its shared experts, longcat_flash its zero experts, zaya a skip class in
    the router beside the routed experts: ``[E + x, ...]`` with x fixed by another config
    field. Found by building the model (meta device) with 2E experts: a tensor with
    ``2E + x`` rows there. The x rows come after the E (all three families take the routed
    experts' scores as the first E), so pruning keeps them whole after the kept rows.
    Families with a registry record have none.
    """
    if families.lookup(families.family_of(config)) is not None:
        return {}
    return dict(_class_rows_json(json.dumps(config, sort_keys=True, default=str)))


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
    extra = class_rows(ckpt.config) if record.tensors.rows_by_shape else {}
    layers: dict[int, str] = {}
    for info in ckpt.tensors.values():
        m = LAYER_RE.search(info.name)
        if not m or not info.shape:
            continue
        if info.shape[0] != num_experts + extra.get(info.name[m.end() + 1 :], 0):
            continue
        prefix, rest = info.name[: m.end() + 1], info.name[m.end() + 1 :]
        index = layer_index(info.name, spec)  # switch: decoder blocks numbered after the encoder's
        assert index is not None  # LAYER_RE matched
        for block in record.tensors.blocks:
            if rest.startswith(f"{block}.") and rest[len(block) + 1 :] in record.tensors.routers:
                layers[index] = f"{prefix}{block}."
        if index not in layers:
            # the block under another name than the record's: a record read from the modules
            # names it as held in memory (the checkpoint may store mlp as block_sparse_moe), and
            # T5-style stacks put it deeper (block.1.layer.1.mlp): find it by its router tensor
            for router in record.tensors.routers:
                if (rest == router or rest.endswith(f".{router}")) and "shared" not in rest:
                    block = rest[: -len(router)].rstrip(".")  # "" when the layer is the block (gemma4)
                    layers[index] = f"{prefix}{block}." if block else prefix
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
        num_experts, top_k, dict(sorted(layers.items())), record.name, spec.expert_intermediate_size, extra
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
    record = prunable_family(ckpt.config, ckpt.path / "config.json")
    if record.name != layout.family:
        raise PruneError(
            f"layout of family {layout.family!r}, checkpoint of {record.name!r}; build it with detect_layout()."
        )
    spec = moe_spec(ckpt.config, str(ckpt.path / "config.json"))
    out: dict[str, list[OutTensor]] = {s: [] for s in ckpt.shards}
    for info in ckpt.tensors.values():
        layer = layer_index(info.name, spec)
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
        rows = num + layout.class_rows.get(_layer_relative(info.name), 0)
        if rows > num and info.shape and info.shape[0] == rows:
            # the E experts' rows, then the rows of the classes the config sizes apart from E
            return OutTensor.rows(info, rows, [*ids, *range(num, rows)])
        if t.rows_by_shape and len(info.shape) >= 2 and info.shape[-1] == num and info.numel == num:
            return _row_vector(info, num, ids)  # a [1, E] correction bias (ernie4_5_moe)
        if t.rows_by_shape and (not info.shape or info.shape[0] != num):
            return OutTensor.whole(info)  # a router's own scale or norm, not one row per expert
        if info.shape[0] != num:
            raise CheckpointError(f"{info.name} has {info.shape[0]} rows, not the {num} experts.")
        return OutTensor.rows(info, num, ids)
    if not any(rel.startswith(p) for p in t.experts):
        per_expert_row = t.rows_by_shape and info.shape and info.shape[0] == num and "shared" not in rel
        if per_expert_row and (
            any(rel.startswith(r.split(".")[0] + ".") for r in t.routers) or "" not in t.blocks
        ):
            # a router row or per-expert bias of the block (where the layer is the block, only
            # the router's own tensors: attention and norms of the layer are not the experts')
            return OutTensor.rows(info, num, ids)
        if t.rows_by_shape and "shared" in rel:
            return OutTensor.whole(info)  # shared experts stored as [1, ...] stacks (inkling)
        if len(info.shape) >= 3:
            raise CheckpointError(
                f"{info.name} has shape {list(info.shape)} but is not a {record.name} expert or router "
                "tensor; this checkpoint layout is not supported for pruning."
            )
        return OutTensor.whole(info)  # shared experts, shared gates, norms of the block
    at = len(block) - 1
    prefix = next(p for p in t.experts if rel.startswith(p))
    if t.rows_by_shape and prefix.endswith(".experts."):  # the layer is the block: mlp.experts.
        at += len(prefix) - len("experts.")
    per = PER_EXPERT_RE.match(info.name, at)
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
    if t.rows_by_shape and len(info.shape) == 1 and info.shape[0] != num:
        return OutTensor.whole(info)  # a norm the experts module shares (muse_spark's post_expert_norm)
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


def _row_vector(info: Any, num: int, ids: list[int]) -> OutTensor:
    """The kept entries of a ``[1, ..., 1, E]`` tensor: its E elements are contiguous, one per expert."""
    flat = types.SimpleNamespace(name=info.name, offset=info.offset, nbytes=info.nbytes, shape=(num,))
    shape = (*info.shape[:-1], len(ids))
    return OutTensor(info.name, info.dtype, shape, row_ranges(flat, num, ids))


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
