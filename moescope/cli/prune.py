"""`moescope prune`: drop the least useful experts per layer and write a smaller checkpoint.

Validates flags, calls :func:`moescope.pruning.prune`, prints the plan and what was written
(table, ``--json`` or ``--csv``, through :class:`moescope.cli._output.Output`; the JSON
object has one shape with or without ``--dry-run``). The checkpoint is streamed shard by shard and reloaded with transformers
to prove it runs, in the checkpoint's own dtype unless ``--dtype`` says otherwise, on
``--device``: whole when it fits ``--max-memory``, streamed layer by layer otherwise
(``--stream/--no-stream``, ``--device-map auto``; :mod:`moescope.execution.plan`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from moescope.cli._errors import friendly
from moescope.cli._options import (
    CriterionOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    MaxMemoryOpt,
    RevisionOpt,
    StreamOpt,
    TrustRemoteCodeOpt,
)
from moescope.cli._output import CsvOpt, JsonOpt, Output, QuietOpt, human

EXAMPLES = """
Examples:

  moescope trace demo demo --out trace/
  moescope prune demo --trace trace/ --ratio 0.25 --dry-run
  moescope prune demo --trace trace/ --drop 2 --criterion reap --out demo-6e/
  moescope prune demo --trace trace/ --keep 4 --criterion frequency --balance-domains --out demo-4e/
  moescope prune demo --trace trace/ --ratio 0.5 --device cpu --dtype float32 --out demo-4e-fp32/
  moescope prune demo --trace trace/ --ratio 0.25 --method merge --out demo-6e-merged/
  moescope similarity demo --samples 128 --out sim/
  moescope prune demo --trace trace/ --ratio 0.25 --method merge --similarity sim/ --dry-run
  moescope eval demo-6e/ demo

--method merge folds each dropped expert into the kept expert most similar to it instead of
deleting it: by the output cosine of a `moescope similarity` report (--similarity DIR; the
default when given), else by the weight cosine after aligning hidden neurons (--merge-by
weight). The partner's hidden neurons are permuted to match the kept expert's (a linear
assignment), then the weights are averaged with the experts' routing frequencies in the
trace as weights. Router rows (--merge-router): `mean` (default) gives the merged expert the
same weighted average of the members' rows and biases; `kept` keeps the kept expert's row,
so tokens are routed exactly as with --method drop.

The verification reload uses --dtype auto (the default: the checkpoint's own dtype) on
--device. It is planned like every command that runs a model: loaded whole when the pruned
checkpoint fits --max-memory (default about 85% of available memory), else streamed one
decoder layer at a time (--stream/--no-stream force it; --device-map auto hands placement to
accelerate); stderr says which. --no-verify skips it.

  moescope prune demo --trace trace/ --ratio 0.5 --max-memory 4GiB --out pruned-big/

Output: a table of kept and dropped experts per layer. --json prints one object, the same
shape with or without --dry-run:
  {"dry_run": bool, "criterion": str, "num_experts_before": int, "num_experts_after": int,
   "layers": {"<layer>": {"kept": [0, 3, ...]}},   (old ids of the kept experts)
   "plan": [{"layer", "expert", "score", "rank", "action": "keep"|"drop", "new_expert"}, ...],
   "out": str, "bytes_in": int, "bytes_out": int, "config_fields": {...}, "verified": bool,
   "method": "drop"|"merge", "merge": null | {"by", "router", "align", "layers": {"<layer>":
     [{"kept", "new_expert", "members": [{"expert", "weight", "alignment", "raw_cosine",
     "similarity"}, ...]}]}}}
where out, bytes_in, bytes_out, config_fields and verified are null on --dry-run (nothing
is written). --csv prints the plan records (one row per layer and expert) in both cases;
with --method merge they have a merged_into column (the kept expert's old id).
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
    max_memory: MaxMemoryOpt = None,
    stream: StreamOpt = None,
    device_map: DeviceMapOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    revision: RevisionOpt = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="drop: remove the dropped experts; merge: fold each into the most similar kept expert.",
        ),
    ] = "drop",
    merge_by: Annotated[
        str | None,
        typer.Option(
            "--merge-by",
            help="Merge partners by output (needs --similarity) or weight (aligned cosine). "
            "Default: output with --similarity, else weight.",
        ),
    ] = None,
    similarity: Annotated[
        Path | None,
        typer.Option(
            "--similarity", help="A `moescope similarity` output directory (for --merge-by output)."
        ),
    ] = None,
    merge_router: Annotated[
        str,
        typer.Option(
            "--merge-router", help="Router rows of a merged expert: mean (of the members') or kept."
        ),
    ] = "mean",
    json_out: JsonOpt = False,
    csv_out: CsvOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Drop experts per MoE layer by a routing criterion and write a checkpoint that loads and runs."""
    from moescope.pruning import CRITERIA, MERGE_BY, METHODS, ROUTER_RULES, prune

    output = Output.from_flags(json_out, csv_out, quiet)
    if sum(v is not None for v in (drop, keep, ratio)) != 1:
        raise typer.BadParameter("pass exactly one of --drop N, --keep N or --ratio R.")
    if criterion not in CRITERIA:
        raise typer.BadParameter(f"unknown --criterion {criterion!r}; use one of {', '.join(CRITERIA)}.")
    if out is None and not dry_run:
        raise typer.BadParameter("--out DIR is required unless --dry-run.")
    if method not in METHODS:
        raise typer.BadParameter(f"unknown --method {method!r}; use one of {', '.join(METHODS)}.")
    if merge_router not in ROUTER_RULES:
        raise typer.BadParameter(
            f"unknown --merge-router {merge_router!r}; use one of {', '.join(ROUTER_RULES)}."
        )
    if merge_by is not None and merge_by not in MERGE_BY:
        raise typer.BadParameter(f"unknown --merge-by {merge_by!r}; use one of {', '.join(MERGE_BY)}.")
    _check_merge_flags(method, merge_by, similarity)
    with output.progress("writing shards") as update:

        def on_shard(shard: str, done: int, total: int) -> None:
            update(done, total, info=shard)

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
            method=method,
            merge_by=merge_by,
            similarity=similarity,
            merge_router=merge_router,
            max_memory=max_memory,
            stream=stream,
            device_map=device_map,
            on_plan=output.info,
        )
    _emit(output, plan, result, criterion)


def _emit(output: Output, plan: Any, result: Any | None, criterion: str) -> None:
    """``--json``: the plan's summary; ``--csv``: the plan records; else a table (plan or result)."""
    if output.fmt == "json":
        output.json(plan.summary(result))
    elif output.fmt == "csv":
        output.csv(plan.records(), PLAN_COLUMNS + (("merged_into",) if plan.merge is not None else ()))
    elif result is None:
        _print_plan(output, plan, criterion)
    else:
        _print_result(output, plan, result, criterion)


#: keys of one plan record (``--csv`` columns, ``plan`` items of ``--json``)
PLAN_COLUMNS = ("layer", "expert", "score", "rank", "action", "new_expert")


def _print_plan(output: Output, plan: Any, criterion: str) -> None:
    """The dry run's candidates: one row per layer, kept experts and dropped ones with scores."""
    records = plan.records()
    rows = []
    for layer in plan.kept:
        recs = sorted((r for r in records if r["layer"] == layer), key=lambda r: r["rank"])
        drops = [f"{r['expert']} ({r['score']:.4g})" for r in recs if r["action"] == "drop"]
        rows.append(
            [layer, " ".join(str(e) for e in plan.kept[layer]), ", ".join(drops), *_merge_cells(plan, layer)]
        )
    output.table(
        rows,
        ["layer", "keep", "drop (score)", *_MERGE_HEADER[: plan.merge is not None]],
        title=f"Pruning plan: {criterion}, {plan.num_experts} -> {plan.keep} experts per layer (dry run)",
        justify_right=[True, False, False, False][: 3 + (plan.merge is not None)],
    )


_MERGE_HEADER = ["merged: dropped -> kept (aligned cosine)"]


def _merge_cells(plan: Any, layer: int) -> list[str]:
    """With --method merge, one cell naming each dropped expert's kept partner; else none."""
    if plan.merge is None:
        return []
    parts = [
        f"{m.expert}->{g.kept} ({m.alignment:.2f})" for g in plan.merge.groups[layer] for m in g.members[1:]
    ]
    return [", ".join(parts)]


def _print_result(output: Output, plan: Any, result: Any, criterion: str) -> None:
    """What was written: the kept experts per layer, and the sizes on stderr."""
    rows = [
        [layer, " ".join(map(str, kept)), *_merge_cells(plan, layer)] for layer, kept in plan.kept.items()
    ]
    output.table(
        rows,
        ["layer", "kept experts (old ids; new ids count from 0)", *_MERGE_HEADER[: plan.merge is not None]],
        title=f"{criterion}{', merge' if plan.merge is not None else ''}: {plan.num_experts} -> {plan.keep} experts per layer",
        justify_right=[True, False, False][: 2 + (plan.merge is not None)],
    )
    verified = "reloaded and ran a forward pass" if result.verified else "not verified"
    output.note(
        f"wrote {result.out} ({human(result.bytes_out, 'B')} of weights, was "
        f"{human(result.bytes_in, 'B')}); {verified}"
    )


def register(app: typer.Typer) -> None:
    """Add `prune` to the app."""
    app.command("prune", epilog=EXAMPLES)(friendly(prune_cmd))


def _check_merge_flags(method: str, merge_by: str | None, similarity: Any) -> None:
    """Flag combinations that cannot work are usage errors (exit 2), before any file is read."""
    if method != "merge" and (merge_by is not None or similarity is not None):
        raise typer.BadParameter("--merge-by and --similarity apply to --method merge; add --method merge.")
    if merge_by == "output" and similarity is None:
        raise typer.BadParameter(
            "--merge-by output needs --similarity DIR (a report of `moescope similarity MODEL --out DIR`); "
            "pass one, or use --merge-by weight."
        )
    if merge_by == "weight" and similarity is not None:
        raise typer.BadParameter(
            "--merge-by weight does not read --similarity (it would be ignored); drop --similarity, "
            "or use --merge-by output."
        )
