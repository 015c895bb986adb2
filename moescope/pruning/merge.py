"""Merge stage (``--method merge``): fold every dropped expert into the kept expert most like it.

For each MoE layer, one layer's experts at a time (peak memory: one layer's routed experts,
not the model):

1. **partner**: each dropped expert goes to the kept expert it is most similar to, by
   ``by="output"`` (the ``outputs`` matrix of a ``moescope similarity`` report: cosine of
   the experts' outputs on the same tokens) or ``by="weight"`` (the aligned weight cosine,
   :mod:`moescope.redundancy.align`, computed here from the checkpoint). With group-limited routing
   (``n_group > 1``) only kept experts of the same group are candidates.
2. **align**: each partner's hidden neurons are permuted to match the kept expert's
   (:func:`moescope.redundancy.align.align`); without it, averaging two experts averages unrelated
   neurons.
3. **average**: the merged expert is the average of the kept expert and its partners, each
   weighted by its routing frequency in the trace (``count`` in ``expert_load.csv``; equal
   weights when none of them was routed to).
4. **router** (:data:`ROUTER_RULES`): ``mean`` (default) gives the merged expert the same
   frequency-weighted average of the members' router rows (and of their biases, gpt-oss's
   ``router.bias``, DeepSeek-V3's ``e_score_correction_bias``), so tokens the partners
   used to win pull the merged expert's logit up; ``kept`` leaves the kept expert's row as
   it was, so routing is exactly that of ``--method drop``. See the README for the trade-off.

The merged tensors of a layer are written to a scratch safetensors file and the rewriter
copies them from there (:attr:`moescope.pruning.rewrite.OutTensor.source`), so the output is
still streamed tensor by tensor. Only floating-point experts in a layout :mod:`moescope.redundancy.align`
knows can be merged; anything else is refused with one line.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moescope import families
from moescope.errors import PruneError
from moescope.families import PER_EXPERT_RE
from moescope.pruning.layout import MoELayout
from moescope.pruning.plan import PrunePlan
from moescope.pruning.rewrite import OutTensor
from moescope.pruning.source import Checkpoint
from moescope.redundancy import align as A

METHODS = ("drop", "merge")
MERGE_BY = ("output", "weight")
ROUTER_RULES = ("mean", "kept")
_FLOAT = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class MergeOptions:
    """What ``--method merge`` was asked for.

    Attributes:
        by: the measure choosing partners (:data:`MERGE_BY`).
        router: the router-row rule (:data:`ROUTER_RULES`).
        align: align hidden neurons before averaging.
        similarity: the ``moescope similarity`` report read for ``by="output"``.
    """

    by: str = "weight"
    router: str = "mean"
    align: bool = True
    similarity: str | Path | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`merge_experts`."""
        return {"by": self.by, "router": self.router, "align": self.align}


@dataclass(frozen=True)
class Member:
    """One expert folded into a merged expert.

    Attributes:
        expert: its id in the source checkpoint.
        weight: its share of the average (routing frequency over the group's total).
        alignment: cosine with the kept expert after neuron alignment (1 for the kept one).
        raw_cosine: cosine with the kept expert as stored.
        similarity: the ``by`` measure with the kept expert that chose it (1 for the kept one).
    """

    expert: int
    weight: float
    alignment: float
    raw_cosine: float
    similarity: float


@dataclass(frozen=True)
class MergeGroup:
    """A kept expert and the dropped experts merged into it (``members[0]`` is the kept one)."""

    kept: int
    new_expert: int
    members: tuple[Member, ...]

    def to_dict(self) -> dict[str, Any]:
        """``{"kept", "new_expert", "members": [{"expert", "weight", ...}]}``."""
        return {
            "kept": self.kept,
            "new_expert": self.new_expert,
            "members": [asdict(m) for m in self.members],
        }


@dataclass(frozen=True)
class MergePlan:
    """How each layer's dropped experts were merged.

    Attributes:
        by: the measure that chose the partners (``output`` or ``weight``).
        router: the router-row rule (:data:`ROUTER_RULES`).
        align: whether hidden neurons were aligned before averaging.
        groups: layer -> one :class:`MergeGroup` per kept expert, in new-id order.
    """

    by: str
    router: str
    align: bool = True
    groups: dict[int, list[MergeGroup]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``merge`` object."""
        return {
            "by": self.by,
            "router": self.router,
            "align": self.align,
            "weights": "routing frequency (trace count)",
            "layers": {str(layer): [g.to_dict() for g in gs] for layer, gs in self.groups.items()},
        }


def resolve_merge_by(by: str | None, similarity: str | Path | None) -> str:
    """``by`` checked, or its default: ``output`` with a similarity report, else ``weight``.

    Raises:
        PruneError: an unknown measure, ``output`` without a report, or ``weight`` with one.
    """
    if by is None:
        return "output" if similarity is not None else "weight"
    if by not in MERGE_BY:
        raise PruneError(f"unknown --merge-by {by!r}; use one of {', '.join(MERGE_BY)}.")
    if by == "output" and similarity is None:
        raise PruneError(
            "--merge-by output needs --similarity DIR (a report of `moescope similarity MODEL --out DIR`); "
            "pass one, or use --merge-by weight."
        )
    if by == "weight" and similarity is not None:
        raise PruneError(
            "--merge-by weight does not read --similarity (it would be ignored); drop --similarity, "
            "or use --merge-by output."
        )
    return by


def read_similarity(path: str | Path, layout: MoELayout, measure: str = "outputs") -> dict[int, np.ndarray]:
    """The ``measure`` matrices of a ``moescope similarity`` report, checked against ``layout``.

    Raises:
        PruneError: not a complete similarity report, no such measure, or other layers/experts.
    """
    given = Path(path).expanduser()
    file = given if given.is_file() else given / "similarity.json"
    if not file.is_file():
        raise PruneError(
            f"{path}: no similarity.json; pass a directory written by `moescope similarity MODEL --out DIR`."
        )
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise PruneError(f"{file} cannot be read ({exc}); pass a `moescope similarity` output.") from exc
    if not isinstance(meta, dict) or meta.get("kind") != "similarity" or not meta.get("complete"):
        raise PruneError(
            f"{file} is not a complete moescope similarity report; re-run `moescope similarity`."
        )
    fix = "re-run `moescope similarity MODEL --out DIR` on the model you prune"
    out: dict[int, np.ndarray] = {}
    for layer in layout.layers:
        mats = (meta.get("matrices") or {}).get(str(layer)) or {}
        if measure not in mats:
            raise PruneError(f"{file} has no {measure!r} matrix for layer {layer}; {fix} (with outputs).")
        mat = np.asarray(mats[measure], dtype=float)
        if mat.shape != (layout.num_experts, layout.num_experts):
            raise PruneError(
                f"{file}: layer {layer} is {mat.shape}, not {layout.num_experts} experts; {fix}."
            )
        out[layer] = mat
    return out


def merge_experts(
    ckpt: Checkpoint,
    layout: MoELayout,
    plan: PrunePlan,
    counts: pd.DataFrame | None,
    *,
    by: str = "weight",
    router: str = "mean",
    align: bool = True,
    similarity: dict[int, np.ndarray] | None = None,
    scratch: Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[MergePlan, dict[str, OutTensor]]:
    """Choose partners, align and average, layer by layer; write merged tensors to ``scratch``.

    Args:
        ckpt: the source checkpoint.
        layout: its MoE layout.
        plan: the experts each layer keeps.
        counts: the trace's ``expert_load`` (``layer, expert, count``): merge weights.
        by: ``weight`` or ``output`` (then ``similarity`` holds the matrices).
        router: :data:`ROUTER_RULES`.
        align: align hidden neurons before averaging (off only to show why it matters).
        similarity: layer -> ``[E, E]`` matrix for ``by="output"``.
        scratch: directory for the merged tensors (None: plan only, nothing written).
        progress: called as ``progress("layer N", done, total)`` after each layer.

    Returns:
        The :class:`MergePlan` and, per output tensor name, the :class:`OutTensor` to copy
        from the scratch file instead of the source.

    Raises:
        PruneError: an unknown rule, quantised or unknown expert tensors, a missing matrix.
    """
    if router not in ROUTER_RULES:
        raise PruneError(f"unknown --merge-router {router!r}; use one of {', '.join(ROUTER_RULES)}.")
    if by == "output" and similarity is None:
        raise PruneError("merging by output similarity needs a similarity report (--similarity DIR).")
    record = families.lookup(layout.family)
    if record is None:
        raise PruneError(
            f"{layout.family} has no moescope record (its layout was read from transformers' modules): "
            "merging needs the record's weight layout; use --method drop."
        )
    mplan = MergePlan(by, router, align)
    replaced: dict[str, OutTensor] = {}
    for i, (layer, block) in enumerate(layout.layers.items()):
        tensors = _LayerTensors.find(ckpt, block, record, layout.num_experts)
        experts = tensors.load(ckpt, layout)
        axes = A.expert_axes(experts[0], layout.family, layout.expert_width)
        freq = _frequencies(counts, layer, layout.num_experts)
        sim = similarity[layer] if similarity is not None else None
        groups, merged = _merge_layer(experts, axes, plan.kept[layer], freq, sim, plan.n_group, align)
        mplan.groups[layer] = groups
        if scratch is not None and any(len(g.members) > 1 for g in groups):
            outs = tensors.outputs(ckpt, experts, merged, groups, router)
            replaced.update(_write_scratch(scratch / f"layer{layer:05d}.safetensors", outs))
        del experts, merged
        if progress:
            progress(f"layer {layer}", i + 1, len(layout.layers))
    return mplan, replaced


def _frequencies(counts: pd.DataFrame | None, layer: int, num: int) -> np.ndarray:
    freq = np.zeros(num)
    if counts is not None and "count" in counts:
        rows = counts[counts["layer"] == layer]
        freq[rows["expert"].to_numpy(dtype=int)] = rows["count"].to_numpy(dtype=float)
    return np.nan_to_num(freq)


def _merge_layer(
    experts: list[dict[str, Any]],
    axes: dict[str, A.NeuronAxis | None],
    kept: list[int],
    freq: np.ndarray,
    sim: np.ndarray | None,
    n_group: int,
    align: bool,
) -> tuple[list[MergeGroup], dict[int, dict[str, Any]]]:
    """The groups of one layer and the merged tensors of every kept expert that has partners."""
    num = len(experts)
    size = num // max(n_group, 1)
    partners: dict[int, list[tuple[int, A.Alignment, float]]] = {k: [] for k in kept}
    dropped = [e for e in range(num) if e not in kept]
    if sim is not None:
        # partners by the output cosine: one alignment per dropped expert, and the float64
        # features of two experts in memory at a time (all kept experts' features of a
        # 64-expert DeepSeek-V2-Lite layer are 2.2 GB)
        chosen: dict[int, list[tuple[int, float]]] = {k: [] for k in kept}
        for r in dropped:
            cands = [k for k in kept if k // size == r // size] or kept
            best = max(cands, key=lambda k: (float(sim[r, k]), -k))
            chosen[best].append((r, float(sim[r, best])))
        for k, picked in chosen.items():
            if picked:
                fk = A.features(experts[k], axes)
                partners[k] = [
                    (r, A.align_features(fk, A.features(experts[r], axes)), sc) for r, sc in picked
                ]
                del fk
    feats = {k: A.features(experts[k], axes) for k in kept} if sim is None else {}
    for r in dropped if sim is None else []:
        fr = A.features(experts[r], axes)
        cands = [k for k in kept if k // size == r // size] or kept
        aligned = {k: A.align_features(feats[k], fr) for k in cands}
        score = {k: aligned[k].cosine for k in cands}
        best = max(cands, key=lambda k: (score[k], -k))
        partners[best].append((r, aligned[best], float(score[best])))
    groups: list[MergeGroup] = []
    merged: dict[int, dict[str, Any]] = {}
    for new, k in enumerate(kept):
        ids = [k, *(p for p, _, _ in partners[k])]
        total = float(freq[ids].sum())
        w = freq[ids] / total if total > 0 else np.full(len(ids), 1.0 / len(ids))
        members = [Member(k, float(w[0]), 1.0, 1.0, 1.0)]
        members += [
            Member(p, float(wj), al.cosine, al.raw_cosine, s)
            for (p, al, s), wj in zip(partners[k], w[1:], strict=True)
        ]
        groups.append(MergeGroup(k, new, tuple(members)))
        if len(ids) > 1:
            acc = {n: float(w[0]) * t.float() for n, t in experts[k].items()}
            for (p, al, _), wj in zip(partners[k], w[1:], strict=True):
                perm = al.perm if align else np.arange(len(al.perm))
                for n, t in A.permute_expert(experts[p], axes, perm).items():
                    acc[n] += float(wj) * t.float()
            merged[k] = acc
    return groups, merged


@dataclass
class _LayerTensors:
    """The expert and router tensors of one MoE block, as stored.

    ``per_expert``: source name -> (expert, key); ``fused``: source name -> key (``[E, ...]``
    or packed ``[E*I, ...]``); ``routers``: router tensors (one row per expert).
    """

    block: str
    num: int
    per_expert: dict[str, tuple[int, str]]
    fused: dict[str, str]
    routers: list[str]

    @classmethod
    def find(cls, ckpt: Checkpoint, block: str, record: families.Family, num: int) -> _LayerTensors:
        per: dict[str, tuple[int, str]] = {}
        fused: dict[str, str] = {}
        routers: list[str] = []
        for info in ckpt.tensors.values():
            if not info.name.startswith(block):
                continue
            rel = info.name[len(block) :]
            if rel in record.tensors.routers:
                routers.append(info.name)
            elif any(rel.startswith(p) for p in record.tensors.experts):
                if info.dtype not in _FLOAT:
                    raise PruneError(
                        f"{info.name} is stored as {info.dtype} (quantised); merging needs floating-point "
                        "expert weights: use --method drop, or merge a bf16/fp16/fp32 copy."
                    )
                m = PER_EXPERT_RE.match(info.name, len(block) - 1)
                if m is not None:
                    per[info.name] = (int(m.group(2)), info.name[m.end() :])
                else:
                    fused[info.name] = rel
        if not per and not fused:
            raise PruneError(f"no routed-expert tensors under {block}; this layout cannot be merged.")
        return cls(block, num, per, fused, routers)

    def load(self, ckpt: Checkpoint, layout: MoELayout) -> list[dict[str, Any]]:
        """Every expert of the layer: key -> tensor (source dtype)."""
        experts: list[dict[str, Any]] = [{} for _ in range(self.num)]
        for name, (j, key) in self.per_expert.items():
            experts[j][key] = _read(ckpt, name)
        for name, key in self.fused.items():
            t = _read(ckpt, name)
            slabs = t.reshape(self.num, t.shape[0] // self.num, *t.shape[1:])
            if t.shape[0] == self.num:
                slabs = slabs.squeeze(1)
            for j in range(self.num):
                experts[j][key] = slabs[j]
        keys = set(experts[0])
        if any(set(e) != keys for e in experts):
            raise PruneError(f"experts under {self.block} do not all hold the same tensors; cannot merge.")
        return experts

    def outputs(
        self,
        ckpt: Checkpoint,
        experts: list[dict[str, Any]],
        merged: dict[int, dict[str, Any]],
        groups: list[MergeGroup],
        router: str,
    ) -> dict[str, Any]:
        """Output name -> tensor for everything the merge changes in this layer."""
        import torch

        out: dict[str, Any] = {}
        kept = [g.kept for g in groups]
        for name, (j, key) in self.per_expert.items():
            if j in merged:
                m = PER_EXPERT_RE.match(name, len(self.block) - 1)
                assert m is not None
                new = f"{name[: m.start(2)]}{kept.index(j)}{name[m.end(2) :]}"
                out[new] = merged[j][key].to(experts[j][key].dtype)
        for name, key in self.fused.items():
            dtype = experts[0][key].dtype
            slabs = [(merged[k][key] if k in merged else experts[k][key]).to(dtype) for k in kept]
            stacked = torch.stack(slabs)
            packed = ckpt.tensors[name].shape[0] != self.num  # dbrx: [E*I, H] rows
            out[name] = stacked.reshape(-1, *stacked.shape[2:]) if packed else stacked
        if router == "mean":
            for name in self.routers:
                t = _read(ckpt, name)
                rows = []
                for g in groups:
                    row = sum(m.weight * t[m.expert].double() for m in g.members)
                    rows.append(torch.as_tensor(row).to(t.dtype))
                out[name] = torch.stack(rows)
        return out


def _read(ckpt: Checkpoint, name: str) -> Any:
    from safetensors import safe_open

    info = ckpt.tensors[name]
    with safe_open(str(ckpt.path / str(info.file)), framework="pt") as fh:
        return fh.get_tensor(name)


def _write_scratch(path: Path, tensors: dict[str, Any]) -> dict[str, OutTensor]:
    """Save ``tensors`` to ``path`` and return an :class:`OutTensor` reading each from it."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path))
    with open(path, "rb") as fh:
        (hlen,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(hlen))
    base = 8 + hlen
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        start, end = h["data_offsets"]
        out[name] = OutTensor(name, h["dtype"], tuple(h["shape"]), ((base + start, end - start),), path)
    return out
