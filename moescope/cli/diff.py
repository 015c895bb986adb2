"""`moescope diff`: compare two traces (before/after fine-tuning or pruning, two corpora).

Calls :func:`moescope.serving.compare.compare_traces` and prints per layer the load shift
(total variation), the JSD and the experts whose load rank changed most, then the JSD per
shared domain; ``--json`` prints one object, ``--csv`` the per-layer records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moescope.cli._errors import friendly
from moescope.cli._output import CsvOpt, JsonOpt, Output, QuietOpt

EXAMPLES = """
Examples:

  moescope diff traces/base traces/finetuned
  moescope diff traces/code traces/prose --json | jq '.layers[] | {layer, jsd}'
  moescope diff traces/a traces/b --csv > shift.csv

Per MoE layer: load_shift = 0.5 * sum_e |p_e - q_e| (the share of assignments that moved), jsd =
Jensen-Shannon divergence in bits of the two load distributions, and the experts whose load rank
(0 = busiest) changed most. Per domain both traces have: the same two figures. The traces must have
the same MoE layers and expert count (a pruned model renumbers its experts).

Output: tables; --json prints {a, b, layers, domains}, each record with layer, domain (null for all
tokens), load_shift, jsd, top_rank_changes (expert, rank_a, rank_b, change); --csv the layers records.
"""


def diff_cmd(
    a: Annotated[Path, typer.Argument(help="First trace directory (the reference).")],
    b: Annotated[Path, typer.Argument(help="Second trace directory.")],
    top: Annotated[int, typer.Option("--top", help="Rank changes shown per layer.")] = 3,
    json_out: JsonOpt = False,
    csv_out: CsvOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compare two traces: per-layer load shift, JSD per layer and domain, biggest rank changes."""
    out = Output.from_flags(json_out, csv_out, quiet)
    if top < 0:
        raise typer.BadParameter("--top must be at least 0.")
    from moescope.serving.compare import compare_traces

    cmp = compare_traces(a, b, top=top)
    if out.fmt == "json":
        out.json(cmp.to_dict())
        return
    if out.fmt == "csv":
        out.csv(
            [r.to_dict() for r in cmp.layers], ["layer", "domain", "load_shift", "jsd", "top_rank_changes"]
        )
        return
    out.table(
        [
            [
                r.layer,
                f"{r.load_shift:.3f}",
                f"{r.jsd:.4f}",
                " ".join(f"{c['expert']}:{c['rank_a']}->{c['rank_b']}" for c in r.top_rank_changes) or "-",
            ]
            for r in cmp.layers
        ],  # fmt: skip
        ["layer", "load shift", "JSD (bits)", "rank changes (expert:a->b)"],
        title=f"{a} vs {b}",
    )
    if cmp.domains:
        names = sorted({r.domain or "" for r in cmp.domains})
        layers = sorted({r.layer for r in cmp.domains})
        jsd = {(r.domain, r.layer): r.jsd for r in cmp.domains}
        out.table(
            [[d, *(f"{jsd[(d, la)]:.4f}" for la in layers)] for d in names],
            ["domain", *(f"layer {la}" for la in layers)],
            title="JSD per domain and layer (bits)",
        )


def register(app: typer.Typer) -> None:
    """Add ``diff`` to the app."""
    app.command("diff", epilog=EXAMPLES)(friendly(diff_cmd))
