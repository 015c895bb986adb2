"""`moescope prune`: drop the least useful experts per layer and write a smaller checkpoint.

Validates flags, calls :func:`moescope.prune.prune`, prints the plan (table, ``--json``
or ``--csv``). The checkpoint is streamed shard by shard and reloaded with transformers
to prove it runs, in the checkpoint's own dtype unless ``--dtype`` says otherwise, on
``--device`` (``--no-verify`` skips the reload for models too large for memory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from moescope.cli._errors import friendly
from moescope.cli._options import (
    CriterionOpt,
    DeviceOpt,
    DtypeOpt,
    QuietOpt,
    RevisionOpt,
    TrustRemoteCodeOpt,
)
from moescope.cli._output import (
    check_format,
    note,
    print_csv,
    print_json,
    print_table,
    progress_bar,
    progress_enabled,
)

EXAMPLES = """
Examples:

  moescope trace demo demo --out trace/
  moescope prune demo --trace trace/ --ratio 0.25 --dry-run
  moescope prune demo --trace trace/ --drop 2 --criterion reap --out demo-6e/
  moescope prune demo --trace trace/ --keep 4 --criterion frequency --balance-domains --out demo-4e/
  moescope prune demo --trace trace/ --ratio 0.5 --device cpu --dtype float32 --out demo-4e-fp32/
  moescope eval demo-6e/ demo
"""


def prune_cmd(
    model: Annotated[str, typer.Argument(help="Model: 'demo', a save_pretrained directory or a hub id.")],
    trace: Annotated[
        Path, typer.Option("--trace", help="Trace directory of the same model (moescope trace).")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Directory for the pruned checkpoint.")
    ] = None,
    drop: Annotated[int | None, typer.Option("--drop", help="Experts to drop in every MoE layer.")] = None,
    keep: Annotated[int | None, typer.Option("--keep", help="Experts to keep in every MoE layer.")] = None,
    ratio: Annotated[
        float | None,
        typer.Option("--ratio", help="Fraction of experts to drop per layer (0.25 drops a quarter)."),
    ] = None,
    criterion: CriterionOpt = "reap",
    seed: Annotated[int, typer.Option("--seed", help="Seed of --criterion random.")] = 0,
    balance_domains: Annotated[
        bool,
        typer.Option(
            "--balance-domains",
            help="Score by usage averaged over the trace's domains (each normalised) instead of pooled.",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print candidates and scores; write nothing.")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Reload the result with transformers (on --device, in --dtype) and run a forward.",
        ),
    ] = True,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out directory.")
    ] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustRemoteCodeOpt = False,
    revision: RevisionOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="Print CSV (per-expert rows).")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Drop experts per MoE layer by a routing criterion and write a checkpoint that loads and runs."""
    from moescope.prune import CRITERIA, prune

    fmt = check_format(json_out, csv_out)
    if sum(v is not None for v in (drop, keep, ratio)) != 1:
        raise typer.BadParameter("pass exactly one of --drop N, --keep N or --ratio R.")
    if criterion not in CRITERIA:
        raise typer.BadParameter(f"unknown --criterion {criterion!r}; use one of {', '.join(CRITERIA)}.")
    if out is None and not dry_run:
        raise typer.BadParameter("--out DIR is required unless --dry-run.")
    with progress_bar(progress_enabled(fmt, quiet)) as bar:
        task = bar.add_task("writing shards", total=None, info="") if bar else None

        def on_shard(shard: str, done: int, total: int) -> None:
            if bar is not None and task is not None:
                bar.update(task, completed=done, total=total, info=shard)

        plan, result = prune(
            model,
            trace,
            out or Path("."),
            drop=drop,
            keep=keep,
            ratio=ratio,
            criterion=criterion,
            seed=seed,
            balance_domains=balance_domains,
            dry_run=dry_run,
            verify=verify,
            overwrite=overwrite,
            revision=revision,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            progress=on_shard,
        )
    if dry_run:
        _print_plan(plan, fmt, criterion)
    else:
        assert result is not None
        _print_result(plan, result, fmt, criterion)


def _print_plan(plan: Any, fmt: str, criterion: str) -> None:
    """The dry run's candidates: per-expert records (--json/--csv) or one row per layer."""
    records = plan.records()
    if fmt == "json":
        print_json(records)
        return
    if fmt == "csv":
        print_csv(records)
        return
    rows = []
    for layer in plan.kept:
        recs = sorted((r for r in records if r["layer"] == layer), key=lambda r: r["rank"])
        drops = [f"{r['expert']} ({r['score']:.4g})" for r in recs if r["action"] == "drop"]
        rows.append([layer, " ".join(str(e) for e in plan.kept[layer]), ", ".join(drops)])
    print_table(
        rows,
        ["layer", "keep", "drop (score)"],
        title=f"Pruning plan: {criterion}, {plan.num_experts} -> {plan.keep} experts per layer (dry run)",
        justify_right=[True, False, False],
    )


def _print_result(plan: Any, result: Any, fmt: str, criterion: str) -> None:
    """What was written: a summary object (--json), per-expert records (--csv) or a table."""
    summary: dict[str, Any] = {
        "out": str(result.out),
        "criterion": criterion,
        "num_experts_before": plan.num_experts,
        "num_experts_after": plan.keep,
        "bytes_in": result.bytes_in,
        "bytes_out": result.bytes_out,
        "config_fields": result.config_fields,
        "verified": result.verified,
        "layers": {str(layer): {"kept": kept} for layer, kept in plan.kept.items()},
    }
    if fmt == "json":
        print_json(summary)
        return
    if fmt == "csv":
        print_csv(plan.records())
        return
    from moescope.cli._output import human

    rows = [[layer, " ".join(map(str, kept))] for layer, kept in plan.kept.items()]
    print_table(
        rows,
        ["layer", "kept experts (old ids; new ids count from 0)"],
        title=f"{criterion}: {plan.num_experts} -> {plan.keep} experts per layer",
        justify_right=[True, False],
    )
    verified = "reloaded and ran a forward pass" if result.verified else "not verified"
    note(
        f"wrote {result.out} ({human(result.bytes_out, 'B')} of weights, was "
        f"{human(result.bytes_in, 'B')}); {verified}"
    )


def register(app: typer.Typer) -> None:
    """Add `prune` to the app."""
    app.command("prune", epilog=EXAMPLES)(friendly(prune_cmd))
