"""The pruned checkpoint's ``prune_manifest.json`` and its model card (``README.md``).

The manifest is the output's marker (``tool``, ``kind``, ``complete``) and records the source,
the trace, the criterion and, per layer, the experts kept and dropped with their scores and
the share of the trace's routing the dropped ones carried.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from moescope.checkpoint.identity import model_fingerprint
from moescope.errors import MoescopeError
from moescope.pruning.layout import MoELayout
from moescope.pruning.plan import PrunePlan
from moescope.pruning.source import Checkpoint


def manifest(
    ckpt: Checkpoint,
    layout: MoELayout,
    plan: PrunePlan,
    fields: list[str],
    model_ref: str | None,
    trace_path: str | Path | None,
    trace_summary: dict[str, Any] | None = None,
    check: dict[str, Any] | None = None,
    copied: Sequence[str] = (),
) -> dict[str, Any]:
    """``prune_manifest.json``: the output's marker (``tool/kind/complete``), source, trace, plan."""
    from moescope import __version__

    summary = trace_summary or {}
    return {
        "tool": "moescope",
        "kind": "prune",
        "complete": True,
        "moescope_version": __version__,
        "model": model_ref or str(ckpt.path),
        "source_path": str(ckpt.path),
        "source_fingerprint": model_fingerprint(ckpt.path),
        "model_type": ckpt.model_type,
        "source_trace": str(trace_path) if trace_path else None,
        "trace_fingerprint": summary.get("fingerprint"),
        "trace_corpus": summary.get("corpus"),
        "trace_tokens": summary.get("tokens"),
        "method": plan.method,
        "merge": plan.merge.to_dict() if plan.merge is not None else None,
        "criterion": plan.criterion,
        "seed": plan.seed if plan.criterion == "random" else None,
        "balance_domains": plan.balance_domains,
        "num_experts_before": plan.num_experts,
        "num_experts_after": plan.keep,
        "top_k": plan.top_k,
        "n_group": plan.n_group,
        "config_fields_updated": fields,
        "copied_files": list(copied),
        "verification": check,
        "layers": {
            str(layer): {
                "kept": plan.kept[layer],
                "dropped": [e for e in range(plan.num_experts) if e not in plan.kept[layer]],
                "scores": plan.scores[layer],
            }
            for layer in layout.layers
        },
    }


def removed_share(load: pd.DataFrame | None, plan: PrunePlan) -> dict[int, dict[str, float | None]]:
    """Per layer, the share of routed tokens and of gate weight that went to the dropped experts."""
    if load is None:
        return {}
    shares: dict[int, dict[str, float | None]] = {}
    for layer, kept in plan.kept.items():
        rows = load[load["layer"] == layer]
        dropped = ~rows["expert"].isin(kept)
        rec: dict[str, float | None] = {}
        for col, key in (("count", "dropped_count_share"), ("weight_sum", "dropped_weight_share")):
            total = float(rows[col].sum()) if col in rows else float("nan")
            rec[key] = float(rows.loc[dropped, col].sum()) / total if total and total == total else None
        shares[layer] = rec
    return shares


def _is_hub_id(ref: str) -> bool:
    from moescope.checkpoint.ref import resolve_ref

    try:
        return not resolve_ref(ref).is_local
    except MoescopeError:
        return False


def model_card(manifest: dict[str, Any]) -> str:
    """The pruned checkpoint's README.md: base model, what was removed, how it was chosen, what was measured."""
    m = manifest
    lines = [
        "---",
        *([f"base_model: {m['model']}"] if _is_hub_id(str(m["model"])) else []),
        "tags:",
        "  - moescope",
        "  - pruned",
        "  - mixture-of-experts",
        "---",
        "",
        f"# {m['model']}, {'merged' if m.get('merge') else 'pruned'} to {m['num_experts_after']} of "
        f"{m['num_experts_before']} experts per layer",
        "",
        f"Written by moescope {m['moescope_version']} (`moescope prune`). The experts each MoE layer kept and",
        "dropped are listed below and in `prune_manifest.json`. This card replaces the base model's: its",
        "figures (benchmarks, training metrics) were measured on the unpruned model and do not hold here.",
        "",
        f"- base model: `{m['model']}` ({m['model_type']}), fingerprint `{m['source_fingerprint']}`",
        f"- criterion: `{m['criterion']}`"
        + (f" (seed {m['seed']})" if m.get("seed") is not None else "")
        + (", domains balanced" if m.get("balance_domains") else ""),
        f"- trace: `{m['source_trace']}` over {m.get('trace_tokens') or '?'} tokens of "
        f"{m.get('trace_corpus') or '?'}, fingerprint `{m.get('trace_fingerprint')}`",
        f"- experts per token (top-k): {m['top_k']}; config fields updated: {', '.join(m['config_fields_updated'])}",
        _method_line(m),
    ]
    check = m.get("verification")
    if check:
        lines.append(
            f"- verified: reloaded with transformers ({check['parameters']:,} parameters) and ran a forward "
            "pass with finite logits"
        )
    else:
        lines.append("- verified: not run (`--no-verify`)")
    lines += [
        "",
        "## Measured on the trace",
        "",
        "Share of the trace's routing that went to the dropped experts (what the pruned model must do without):",
        "",
        "| layer | dropped experts | routed tokens share | gate weight share |",
        "|---|---|---|---|",
    ]
    for layer, rec in m["layers"].items():
        tok = rec.get("dropped_count_share")
        wgt = rec.get("dropped_weight_share")
        lines.append(
            f"| {layer} | {', '.join(map(str, rec['dropped'])) or '-'} | "
            f"{'-' if tok is None else f'{tok:.2%}'} | {'-' if wgt is None else f'{wgt:.2%}'} |"
        )
    lines += _merge_table(m.get("merge"))
    lines += [
        "",
        "Quality on text is not measured by `prune`; compare perplexities with",
        f"`moescope eval {m['model']} CORPUS` and `moescope eval THIS_DIR CORPUS`.",
        "",
    ]
    return "\n".join(lines) + "\n"


_BY = {"weight": "aligned weight cosine", "output": "output cosine of the similarity report"}
_ROUTER = {
    "mean": "the merged expert's router row (and bias) is the same weighted average of the members' rows",
    "kept": "the kept expert's router row is unchanged, the dropped experts' rows are removed",
}


def _method_line(m: dict[str, Any]) -> str:
    merge = m.get("merge")
    if not merge:
        return "- method: `drop` (the dropped experts and their router rows are removed)"
    return (
        f"- method: `merge`: each dropped expert was folded into the kept expert most similar to it "
        f"({_BY.get(merge['by'], merge['by'])}), "
        + (
            "its hidden neurons aligned to the kept expert's, "
            if merge.get("align", True)
            else "without alignment, "
        )
        + f"weights averaged with the routing frequencies as weights; {_ROUTER.get(merge['router'], merge['router'])}"
    )


def _merge_table(merge: dict[str, Any] | None) -> list[str]:
    if not merge:
        return []
    lines = [
        "",
        "## Merged experts",
        "",
        "Each merged expert (new id) with its members: old id, weight in the average, cosine with the kept",
        "expert after neuron alignment.",
        "",
        "| layer | new expert | members: old id (weight, aligned cosine) |",
        "|---|---|---|",
    ]
    for layer, groups in merge["layers"].items():
        for g in groups:
            if len(g["members"]) < 2:
                continue
            parts = "; ".join(
                f"{x['expert']} ({x['weight']:.2f}, {x['alignment']:.2f})" for x in g["members"]
            )
            lines.append(f"| {layer} | {g['new_expert']} | {parts} |")
    return lines
