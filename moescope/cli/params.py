"""``moescope params``: total vs active parameters, FLOPs and memory, several models side by side."""

from __future__ import annotations

import warnings
from typing import Annotated, Any

import typer

from moescope.cli._errors import friendly
from moescope.cli._output import CsvOpt, JsonOpt, Output, QuietOpt, human

EXAMPLES = """
Examples:

  moescope params demo demo-dense                      # MoE next to its dense twin

  moescope params mistralai/Mixtral-8x7B-v0.1 Qwen/Qwen3-30B-A3B@main --json

  moescope params ./checkpoint --per-layer

  moescope params sample_configs/DeepSeek-V3.json --context 32768 --csv

Conventions: total_params counts tied tensors once and quantised tensors as the logical
parameters they encode; active_params = total - routed experts x (1 - k/N), embedding
and head included (Mixtral convention); active_params_no_embedding leaves the input
embedding out (gpt-oss convention); flops_per_token = 2 x active matmul weights + attention
against --context keys (multiply-add = 2 FLOPs; training ~ 3x).

Output: a table with one column per model; --json prints an array, one object per model
(model, model_type, is_moe, total_params, active_params, active_params_no_embedding,
flops_per_token, num_experts, top_k, num_shared_experts, moe_layers, activation_ratio,
components, weight_bytes, weight_bytes_source (headers: read from the safetensors headers;
config: estimated from the config, quantization_config included), source, ...); --csv one
row per model with those keys and a few more (context, kv cache, mtp and vision counts;
lists and objects JSON-encoded). With --per-layer: one record per (model, layer) with
model, layer, kind, params, active_params.
"""

_CSV_COLUMNS = [
    "model",
    "model_type",
    "is_moe",
    "total_params",
    "active_params",
    "active_params_no_embedding",
    "activation_ratio",
    "topk_ratio",
    "flops_per_token",
    "context",
    "num_experts",
    "top_k",
    "num_shared_experts",
    "num_layers",
    "moe_layers",
    "weight_bytes",
    "weight_bytes_source",
    "kv_cache_bytes_per_token",
    "kv_cache_bytes_at_context",
    "mtp_params",
    "vision_params",
    "source",
    "components",
]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def params_cmd(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Hub ids (org/name[@rev]), directories, .safetensors or config .json files, or 'demo'.",
            show_default=False,
        ),
    ],
    context: Annotated[
        int,
        typer.Option(
            "--context", "-c", help="Keys each token attends to (attention FLOPs, KV cache).", min=1
        ),
    ] = 4096,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Hub revision for every hub id (branch, tag or commit).")
    ] = None,
    per_layer: Annotated[
        bool, typer.Option("--per-layer", help="One row per layer: kind, params, active params.")
    ] = False,
    json_out: JsonOpt = False,
    csv_out: CsvOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Total vs active parameters, FLOPs per token and memory of MoE and dense checkpoints.

    Reads only config.json and safetensors headers (never the weights); hub ids use the
    HF cache, HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE like every HF tool.
    """
    from moescope.accounting.params import count_params

    out = Output.from_flags(json_out, csv_out, quiet)
    reports = []
    for ref in models:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reports.append(count_params(ref, revision=revision, context=context))
        for w in caught:
            out.warn(str(w.message))
    if per_layer:
        _emit_per_layer(reports, out)
        return
    if out.machine:
        out.records([r.to_dict() for r in reports], _CSV_COLUMNS)
        return
    for r in reports:
        for n in r.notes:
            out.note(f"{r.model}: {n}")
    rows = _table_rows(reports)
    out.table(
        rows, ["", *[short_label(r.model) for r in reports]], title=f"moescope params (context {context})"
    )


def short_label(ref: str) -> str:
    """Column label: hub ids and demo names as written, paths by their last meaningful part."""
    from pathlib import Path

    p = Path(ref)
    if not p.exists():
        return ref
    if p.is_file():
        return p.parent.name if p.name in ("config.json", "model.safetensors") else p.stem
    return p.resolve().name


def _stored_basis(r: Any) -> str:
    """Where "weights as stored" comes from: the headers, or an estimate from the config."""
    if r.weight_bytes_source == "headers":
        return "read from headers"
    if r.weight_bytes_source == "config":
        return f"estimated from config ({r.weight_bytes_format})"
    return "-"


def _table_rows(reports: list) -> list[list[str]]:
    from moescope.arch.moe import COMPONENTS

    def row(label: str, fn) -> list[str]:  # type: ignore[no-untyped-def]
        return [label, *[fn(r) for r in reports]]

    # mtp, vision and other get their own rows below (or none)
    comps = [c for c in COMPONENTS if c not in ("mtp", "vision", "other")]
    rows = [
        row("model type", lambda r: r.model_type + (" (MoE)" if r.is_moe else " (dense)")),
        row("total params", lambda r: human(r.total_params)),
        row("active params / token", lambda r: human(r.active_params)),
        row("active, no embedding", lambda r: human(r.active_params_no_embedding)),
        row("active share (active/total)", lambda r: _pct(r.activation_ratio)),
        row(
            "experts k/N", lambda r: f"{r.top_k}/{r.num_experts} = {_pct(r.topk_ratio)}" if r.is_moe else "-"
        ),
        row("shared experts", lambda r: str(r.num_shared_experts) if r.is_moe else "-"),
        row("layers (MoE)", lambda r: f"{r.num_layers} ({len(r.moe_layers)})"),
        row("FLOPs / token", lambda r: human(r.flops_per_token, "FLOP")),
        # a heading of its own: indented under "FLOPs / token" the counts read as FLOPs
        row("params by component", lambda r: ""),
    ]
    for c in comps:
        rows.append(
            row(f"  {c}", lambda r, c=c: human(r.components.get(c, 0)) if r.components.get(c) else "-")
        )
    rows += [
        row("  mtp (not in total)", lambda r: human(r.mtp_params) if r.mtp_params else "-"),
        row("  vision (not active)", lambda r: human(r.vision_params) if r.vision_params else "-"),
        row("weights as stored", lambda r: human(r.weight_bytes, "B") if r.weight_bytes else "-"),
        row("  stored size", _stored_basis),
        row(
            "weights in bf16 / fp8 / int4",
            lambda r: " / ".join(human(r.memory_bytes[k], "B") for k in ("bf16", "fp8", "int4")),
        ),
        row(
            "KV cache / token (bf16)",
            lambda r: f"{human(r.kv_cache_bytes_per_token, 'B')} {r.kv_cache_layout or ''}".strip(),
        ),
        row("KV cache at context", lambda r: human(r.kv_cache_bytes_at_context, "B")),
        row("source", lambda r: f"{r.source} ({r.source_kind})"),
    ]
    return rows


def _emit_per_layer(reports: list, out: Output) -> None:
    records = [
        {
            "model": r.model,
            "layer": row.layer,
            "kind": row.kind,
            "params": row.params,
            "active_params": row.active_params,
        }
        for r in reports
        for row in r.per_layer
    ]
    if out.machine:
        out.records(records, ["model", "layer", "kind", "params", "active_params"])
    else:
        for r in reports:
            rows = [
                ["-" if x.layer is None else str(x.layer), x.kind, human(x.params), human(x.active_params)]
                for x in r.per_layer
            ]
            out.table(rows, ["layer", "kind", "params", "active"], title=r.model)


def register(app: typer.Typer) -> None:
    """Add ``params`` to the app."""
    app.command("params", epilog=EXAMPLES)(friendly(params_cmd))
