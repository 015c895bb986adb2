"""`moescope similarity`: expert-to-expert similarity per layer, heatmaps, most redundant pairs.

Validates flags, calls :func:`moescope.redundancy.run.similarity`, writes ``pairs.csv``,
``layers.csv``, ``similarity.json`` and ``plots/`` under ``--out``, and prints the most
redundant pairs (table), every pair (``--json``, most redundant first within each
layer) or CSV, through :class:`moescope.cli._output.Output`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from moescope.cli._errors import friendly
from moescope.cli._options import (
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    MaxMemoryOpt,
    PlotFormatOpt,
    RevisionOpt,
    SplitOpt,
    StreamOpt,
    TrustRemoteCodeOpt,
)
from moescope.cli._output import CsvOpt, JsonOpt, Output, QuietOpt

EXAMPLES = """
Examples:

  moescope similarity demo --out sim/
  moescope trace demo demo --out trace/ && moescope similarity demo --trace trace/ --out sim/
  moescope similarity demo --samples 256 --corpus demo:code --json
  moescope similarity org/name --no-outputs --out sim/   (weights and router only: no forward passes)
  moescope similarity demo --no-outputs --plot-format pdf --out sim-pdf/   (heatmaps as PDF, for a paper)

--dtype auto (the default) runs the model in the checkpoint's own dtype (torch_dtype in its
config.json); --dtype float32 computes the measures in full precision.

weights is the cosine of two experts' weights after aligning their hidden neurons (a
permuted copy of an expert scores 1; unrelated experts about 0.1-0.2); weight_raw is the
cosine as stored. --no-align-weights skips the alignment (E(E-1)/2 assignments per layer,
slow for hundreds of wide experts) and reports weight_raw only.

Output: two tables (the --top most redundant pairs per layer; the per-layer redundancy
score); --json prints every pair as an array of records (layer, expert_a, expert_b, rank,
redundancy and one value per measure: weights, weight_raw, router, outputs, coactivation),
most redundant first within each layer; --csv the same records with a header row. Without
--out, --json or --csv is required.
"""


def similarity_cmd(
    model: Annotated[str, typer.Argument(help="Model: 'demo', a save_pretrained directory or a hub id.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Directory for pairs.csv, layers.csv and plots/.")
    ] = None,
    trace: Annotated[
        Path | None, typer.Option("--trace", help="Trace directory of the same model, adds co-activation.")
    ] = None,
    corpus: Annotated[
        list[str] | None,
        typer.Option("--corpus", help="Corpus for the sampled tokens of the outputs measure (repeatable)."),
    ] = None,
    split: SplitOpt = None,
    samples: Annotated[
        int, typer.Option("--samples", help="Tokens per layer on which every expert is run.")
    ] = 512,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sampled sequence.")] = 128,
    outputs: Annotated[
        bool, typer.Option("--outputs/--no-outputs", help="Measure output similarity (runs the model).")
    ] = True,
    align_weights: Annotated[
        bool,
        typer.Option(
            "--align-weights/--no-align-weights", help="Align hidden neurons for the weights measure."
        ),
    ] = True,
    top: Annotated[int, typer.Option("--top", help="Pairs per layer in the table.")] = 3,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write heatmaps to OUT/plots.")] = True,
    plot_format: PlotFormatOpt = "png",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampled tokens.")] = 0,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    max_memory: MaxMemoryOpt = None,
    stream: StreamOpt = None,
    device_map: DeviceMapOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = False,
    csv_out: CsvOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Expert similarity per MoE layer (weights, router, outputs, co-activation) and redundant pairs."""
    from moescope.redundancy.run import similarity

    output = Output.from_flags(json_out, csv_out, quiet)
    if samples < 1 or seq_len < 2 or top < 1:
        raise typer.BadParameter("--samples and --top must be at least 1, --seq-len at least 2.")
    if out is None and not output.machine:
        raise typer.BadParameter("pass --out DIR (or --json/--csv to print without writing files).")
    with output.progress("comparing experts") as update:
        report = similarity(
            model,
            out,
            trace=trace,
            corpus=corpus or ["demo"],
            split=split,
            samples=samples,
            seq_len=seq_len,
            outputs=outputs,
            plots=plots,
            plot_format=plot_format,
            seed=seed,
            dtype=dtype,
            device=device,
            revision=revision,
            trust_remote_code=trust_remote_code,
            progress=update,
            max_memory=max_memory,
            stream=stream,
            device_map=device_map,
            on_plan=output.info,
            align_weights=align_weights,
        )
    pairs = report.pairs()
    if output.machine:
        output.records(pairs.to_dict(orient="records"), list(pairs.columns))
    else:
        _print_tables(output, report, pairs, top, model)
    if out is not None:
        output.note(f"wrote {out}/pairs.csv, layers.csv, similarity.json" + (" and plots/" if plots else ""))


def _print_tables(output: Output, report: Any, pairs: Any, top: int, model: str) -> None:
    """The ``--top`` most redundant pairs per layer, then each layer's redundancy score."""
    shown = pairs[pairs["rank"] <= top]
    measures = report.measures
    rows = [
        [int(r["layer"]), f"{int(r['expert_a'])}-{int(r['expert_b'])}", f"{r['redundancy']:.3f}"]
        + [f"{r[m]:.3f}" for m in measures]
        for r in shown.to_dict(orient="records")
    ]
    output.table(
        rows,
        ["layer", "pair", "redundancy", *measures],
        title=f"Most redundant expert pairs per layer ({model})",
    )
    scores = report.layer_scores()
    output.table(
        [
            [int(r["layer"]), f"{r['redundancy']:.3f}", r["top_pair"]]
            for r in scores.to_dict(orient="records")
        ],
        ["layer", "redundancy score", "top pair"],
        title="Per-layer redundancy (mean over experts of the nearest other expert)",
    )


def register(app: typer.Typer) -> None:
    """Add `similarity` to the app."""
    app.command("similarity", epilog=EXAMPLES)(friendly(similarity_cmd))
