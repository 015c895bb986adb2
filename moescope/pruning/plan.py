"""Plan stage: which experts each MoE layer keeps, and whether the trace belongs to the model.

:func:`plan_prune` keeps the same number of experts in every MoE layer (the config has one
expert count), the highest-scoring ones, and respects group-limited routing (deepseek
``n_group > 1``: the same number kept per group, read from the family registry through
:func:`moescope.arch.moe.routing_groups`) or refuses with a reason. :func:`check_trace_matches`
refuses a trace recorded on another model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from moescope.arch.moe import routing_groups
from moescope.checkpoint.identity import check_trace_model, model_fingerprint, same_model
from moescope.errors import PruneError, TraceError
from moescope.pruning.layout import MoELayout
from moescope.pruning.source import Checkpoint
from moescope.pruning.tracedata import TraceData

__all__ = [
    "PrunePlan",
    "check_trace_matches",
    "plan_prune",
    "resolve_keep",
    "routing_groups",
]


@dataclass(frozen=True)
class PrunePlan:
    """Which experts each MoE layer keeps.

    Attributes:
        criterion: scoring criterion used.
        num_experts: experts per layer before pruning.
        keep: experts per layer after pruning (the same in every layer).
        top_k: experts per token.
        kept: layer -> sorted kept expert ids (old numbering; new id = position).
        scores: layer -> one score per old expert id.
        n_group: routing groups respected (1 when routing is not group-limited).
        seed: seed of the ``random`` criterion.
        balance_domains: whether scores were averaged over domains.
        merge: with ``--method merge``, the :class:`moescope.pruning.merge.MergePlan` (which
            kept expert each dropped one was folded into); None when experts are dropped.
    """

    criterion: str
    num_experts: int
    keep: int
    top_k: int
    kept: dict[int, list[int]]
    scores: dict[int, list[float]]
    n_group: int = 1
    seed: int = 0
    balance_domains: bool = False
    merge: Any = None

    @property
    def method(self) -> str:
        """``merge`` when dropped experts are folded into kept ones, else ``drop``."""
        return "drop" if self.merge is None else "merge"

    def records(self) -> list[dict[str, Any]]:
        """One record per (layer, expert): ``layer, expert, score, rank, action, new_expert``.

        With a merge, every record also has ``merged_into``: the old id of the kept expert a
        dropped one was folded into (its own id when kept).
        """
        out: list[dict[str, Any]] = []
        for layer, scores in self.scores.items():
            order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
            rank = {e: i + 1 for i, e in enumerate(order)}
            kept = self.kept[layer]
            into = self._merged_into(layer)
            for expert in range(len(scores)):
                keep = expert in kept
                rec = {
                    "layer": layer,
                    "expert": expert,
                    "score": float(scores[expert]),
                    "rank": rank[expert],
                    "action": "keep" if keep else "drop",
                    "new_expert": kept.index(expert) if keep else None,
                }
                if self.merge is not None:
                    rec["merged_into"] = into.get(expert)
                out.append(rec)
        return out

    def summary(self, result: Any | None = None) -> dict[str, Any]:
        """What ``moescope prune --json`` prints (and :meth:`moescope.api.PruneRun.to_dict`
        gives): the plan, and what was written — ``result``, a
        :class:`~moescope.pruning.write.PruneResult`; its fields are null on a dry run."""
        return {
            "dry_run": result is None,
            "criterion": self.criterion,
            "num_experts_before": self.num_experts,
            "num_experts_after": self.keep,
            "layers": {str(layer): {"kept": kept} for layer, kept in self.kept.items()},
            "plan": self.records(),
            "out": None if result is None else str(result.out),
            "bytes_in": None if result is None else result.bytes_in,
            "bytes_out": None if result is None else result.bytes_out,
            "config_fields": None if result is None else result.config_fields,
            "verified": None if result is None else result.verified,
            "method": self.method,
            "merge": None if self.merge is None else self.merge.to_dict(),
        }

    def _merged_into(self, layer: int) -> dict[int, int]:
        if self.merge is None:
            return {}
        return {m.expert: g.kept for g in self.merge.groups.get(layer, []) for m in g.members}


def resolve_keep(num_experts: int, *, drop: int | None, keep: int | None, ratio: float | None) -> int:
    """Experts to keep per layer from exactly one of ``drop``, ``keep`` or ``ratio``.

    ``ratio`` is the fraction of experts to drop (0.25 drops a quarter), rounded to the
    nearest whole expert.

    Raises:
        PruneError: none or several given, or a value out of range.
    """
    given = [v is not None for v in (drop, keep, ratio)]
    if sum(given) != 1:
        raise PruneError("pass exactly one of --drop N, --keep N or --ratio R.")
    if drop is not None:
        result = num_experts - drop
    elif keep is not None:
        result = keep
    else:
        assert ratio is not None
        if not 0.0 < ratio < 1.0:
            raise PruneError(f"--ratio {ratio} is out of range; pass the fraction to drop, between 0 and 1.")
        result = num_experts - int(round(ratio * num_experts))
    if result >= num_experts:
        raise PruneError(f"keeping {result} of {num_experts} experts drops nothing; drop at least one.")
    if result < 1:
        raise PruneError(f"cannot keep {result} experts per layer (the model has {num_experts}).")
    return result


def plan_prune(
    scores: pd.DataFrame,
    *,
    num_experts: int,
    top_k: int,
    keep: int,
    criterion: str,
    config: dict[str, Any] | None = None,
    seed: int = 0,
    balance_domains: bool = False,
) -> PrunePlan:
    """Keep the ``keep`` highest-scoring experts in every layer (ties: lower id first).

    With group-limited routing (``n_group > 1``) each group keeps ``keep / n_group``
    experts, so group membership survives renumbering.

    Raises:
        PruneError: ``keep < top_k``, or group-limited routing cannot stay consistent.
    """
    if keep < top_k:
        raise PruneError(
            f"cannot keep {keep} experts per layer: each token uses top_k={top_k}; keep at least {top_k}."
        )
    n_group, topk_group, two_per_group = routing_groups(config or {})
    if n_group > 1:
        if num_experts % n_group:
            raise PruneError(f"{num_experts} experts do not split into n_group={n_group} groups.")
        if keep % n_group:
            raise PruneError(
                f"group-limited routing (n_group={n_group}) needs the kept count divisible by {n_group}; "
                f"keep {keep - keep % n_group} or {keep + n_group - keep % n_group} instead of {keep}."
            )
        per_group = keep // n_group
        if topk_group * per_group < top_k or (two_per_group and per_group < 2):
            raise PruneError(
                f"keeping {keep} experts leaves {per_group} per group; with topk_group={topk_group} a token "
                f"could not reach top_k={top_k}"
                + (" (and a group needs 2 to be scored)" if two_per_group else "")
                + "; keep more experts."
            )
    kept: dict[int, list[int]] = {}
    per_layer: dict[int, list[float]] = {}
    for layer, group in scores.groupby("layer", sort=True):
        values = group.set_index("expert")["score"].reindex(range(num_experts), fill_value=0.0)
        vals = [float(v) for v in values.to_numpy()]
        per_layer[int(layer)] = vals
        size = num_experts // n_group
        chosen: list[int] = []
        for g in range(n_group):
            members = range(g * size, (g + 1) * size)
            ranked = sorted(members, key=lambda e: (-vals[e], e))
            chosen.extend(ranked[: keep // n_group])
        kept[int(layer)] = sorted(chosen)
    return PrunePlan(criterion, num_experts, keep, top_k, kept, per_layer, n_group, seed, balance_domains)


def check_trace_matches(trace: TraceData, ckpt: Checkpoint, layout: MoELayout, model_ref: str) -> None:
    """Refuse a trace recorded on another model: compare experts, top-k, layers, name.

    Raises:
        TraceError: with the field that differs and the fix.
    """
    fix = f"re-run `moescope trace {model_ref} CORPUS --out DIR` and prune with that trace."
    if trace.num_experts != layout.num_experts:
        raise TraceError(
            f"{trace.path} was traced on a model with {trace.num_experts} experts, {model_ref} has "
            f"{layout.num_experts}; {fix}"
        )
    if trace.top_k is not None and trace.top_k != layout.top_k:
        raise TraceError(f"{trace.path} has top_k={trace.top_k}, {model_ref} has {layout.top_k}; {fix}")
    if trace.layers != list(layout.layers):
        raise TraceError(
            f"{trace.path} covers MoE layers {trace.layers}, {model_ref} has {list(layout.layers)}; {fix}"
        )
    bad = trace.expert_load[
        (trace.expert_load["expert"] < 0) | (trace.expert_load["expert"] >= layout.num_experts)
    ]
    if len(bad):
        raise TraceError(
            f"{trace.path}/expert_load.csv names expert {int(bad['expert'].iloc[0])}, outside 0..."
            f"{layout.num_experts - 1}; {fix}"
        )
    traced_type = trace.summary.get("model_type")
    if traced_type and traced_type != ckpt.model_type:
        raise TraceError(f"{trace.path} is a {traced_type} trace, {model_ref} is {ckpt.model_type}; {fix}")
    if check_trace_model(
        trace.summary.get("fingerprint"), model_fingerprint(ckpt.path), str(trace.path), model_ref
    ):
        return
    if trace.model and not same_model(trace.model, model_ref, ckpt.path):
        raise TraceError(f"{trace.path} was traced on {trace.model}, not {model_ref}; {fix}")


# --------------------------------------------------------------------------- writing
