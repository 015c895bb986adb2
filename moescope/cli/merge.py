"""`moescope merge`: combine ``--shard i/n`` trace directories into one trace.

The merged directory is what one unsharded run would have written: the raw sums in each
shard's ``state.npz`` are added exactly and every file is derived from them again.
Output (table, ``--json``, ``--csv``) goes through :class:`moescope.cli._output.Output`
and has the shapes of ``moescope trace``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from moescope.cli._errors import friendly
from moescope.cli._output import CsvOpt, JsonOpt, Output, QuietOpt
from moescope.cli.trace import LAYER_COLUMNS

EXAMPLES = """
Examples:

  moescope merge traces/s0 traces/s1 traces/s2 traces/s3 --out traces/all
  moescope merge traces/s* --out traces/all --json

Run the shards anywhere (one process per GPU or machine), e.g. with torchrun:
  torchrun --nproc-per-node 4 -m moescope trace MODEL CORPUS --shard env --out 'traces/s{rank}'
or plainly: for i in 0 1 2 3; do moescope trace MODEL CORPUS --shard $i/4 --out traces/s$i & done

Output: a table of the merged shards; --json prints the merged summary.json (an object, as
`moescope trace --json` does); --csv its per-layer records (layer, imbalance_max_mean, cv,
entropy_norm, dead_experts, near_dead_experts, router_dropped; lists JSON-encoded).
"""


def merge_cmd(
    traces: Annotated[
        list[Path], typer.Argument(help="Shard trace directories (every i of one --shard i/n).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Merged trace directory to write.")],
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip plots/*.png.")] = False,
    json_out: JsonOpt = False,
    csv_out: CsvOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge shard trace directories into what one run would have written."""
    from moescope.tracing import merge_traces

    output = Output.from_flags(json_out, csv_out, quiet)
    summary: dict[str, Any] = merge_traces(traces, out, plots=not no_plots)
    if output.fmt == "json":
        output.json(summary)
        return
    if output.fmt == "csv":
        output.csv(summary["layers"], LAYER_COLUMNS)
        return
    output.table(
        [[str(t)] for t in traces]
        + [[f"→ {out}: {summary['tokens']:,} tokens, {summary['batches']} batches"]],
        ["merged"],
        justify_right=[False],
    )
    output.note(f"next: moescope report {out}")


def register(app: typer.Typer) -> None:
    """Add ``merge`` to the app."""
    app.command("merge", epilog=EXAMPLES)(friendly(merge_cmd))
