"""`moescope merge`: combine ``--shard i/n`` trace directories into one trace.

The merged directory is what one unsharded run would have written: the raw sums in each
shard's ``state.npz`` are added exactly and every file is derived from them again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moescope.cli._errors import friendly
from moescope.cli._output import check_format, note, print_json, print_table

EXAMPLES = """
Examples:

  moescope merge traces/s0 traces/s1 traces/s2 traces/s3 --out traces/all
  moescope merge traces/s* --out traces/all --json

Run the shards anywhere (one process per GPU or machine), e.g. with torchrun:
  torchrun --nproc-per-node 4 -m moescope trace MODEL CORPUS --shard env --out 'traces/s{rank}'
or plainly: for i in 0 1 2 3; do moescope trace MODEL CORPUS --shard $i/4 --out traces/s$i & done
"""


def merge_cmd(
    traces: Annotated[
        list[Path], typer.Argument(help="Shard trace directories (every i of one --shard i/n).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Merged trace directory to write.")],
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip plots/*.png.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the merged summary.json.")] = False,
) -> None:
    """Merge shard trace directories into what one run would have written."""
    from moescope.trace import merge_traces

    fmt = check_format(json_out, False)
    summary = merge_traces(traces, out, plots=not no_plots)
    if fmt == "json":
        print_json(summary)
        return
    print_table(
        [[str(t)] for t in traces]
        + [[f"→ {out}: {summary['tokens']:,} tokens, {summary['batches']} batches"]],
        ["merged"],
        justify_right=[False],
    )
    note(f"next: moescope report {out}")


def register(app: typer.Typer) -> None:
    """Add ``merge`` to the app."""
    app.command("merge", epilog=EXAMPLES)(friendly(merge_cmd))
