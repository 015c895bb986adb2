"""`moescope trace`: record which experts a MoE model routes each token of a corpus to.

Validates flags, calls :func:`moescope.tracing.run_trace`, shows a progress bar with
tokens/s on stderr (only on a terminal), and prints a per-layer table (or the summary as
``--json``, or its per-layer records as ``--csv``) through :class:`moescope.cli._output.Output`. torch and transformers are imported inside the command so ``--help`` is fast.
"""

from __future__ import annotations

import os
import time
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
from moescope.cli._output import CsvOpt, JsonOpt, Output, QuietOpt, human

EXAMPLES = """
Examples:

  moescope trace demo demo --out traces/demo
  moescope trace demo demo:code demo:prose --max-tokens 20000 --save-routes --out traces/demo
  moescope trace demo demo:code --max-tokens 4000 --plot-format svg --out traces/code   # vector plots
  moescope trace org/name notes.jsonl --seq-len 1024 --batch-size 4 --dtype bfloat16 --out traces/run
  moescope trace org/name corpus/ --shard 0/4 --out traces/s0   # then: moescope merge traces/s* --out traces/all
  moescope trace org/name corpus/ --max-memory 20GiB --out traces/run   # streams layer by layer if it does not fit
  torchrun --nproc-per-node 4 -m moescope trace org/name corpus/ --device cuda --out traces/run   # one trace, 4 GPUs

Execution: the model is loaded whole when its weights fit --max-memory (default about 85% of available memory) and streamed one decoder layer at a time otherwise (--stream/--no-stream force either); stderr says which and why. --device-map auto hands placement across GPUs, CPU and disk to accelerate. Under torchrun the ranks split the batches, the sums are all-reduced and rank 0 writes one trace, equal to a single-process run.

Packing (shared with eval and similarity): each document is tokenised with the tokenizer's own special tokens, followed by EOS and concatenated into one stream that is cut into --seq-len windows (a window may span documents; each token keeps its document and domain).

Shards: --shard i/n runs batches b with b mod n == i of that same stream; --shard env takes i/n from $RANK/$WORLD_SIZE (torchrun) and '{rank}' in --out becomes i.

--dtype auto (the default) runs the model in the checkpoint's own dtype (torch_dtype in its config.json).

Output: a per-layer table (imbalance, dead experts); --json prints the summary.json written (an object: model, tokens, moe_layers, num_experts, top_k, layers, timings, ...); --csv its per-layer records (layer, imbalance_max_mean, cv, entropy_norm, dead_experts, near_dead_experts, router_dropped; lists JSON-encoded).
"""

#: ``--csv`` columns of ``trace`` and ``merge``: the per-layer records of ``summary.json``
LAYER_COLUMNS = (
    "layer",
    "imbalance_max_mean",
    "cv",
    "entropy_norm",
    "dead_experts",
    "near_dead_experts",
    "router_dropped",
)


def trace_cmd(
    model: Annotated[str, typer.Argument(help="Model: 'demo', a save_pretrained directory or a hub id.")],
    corpus: Annotated[
        list[str],
        typer.Argument(help="Corpus: .txt, .jsonl, .parquet, a directory, '-' or built-in 'demo[:domain]'."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Trace directory to write (an old trace is replaced).")
    ],
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Stop after this many tokens (default: whole corpus).")
    ] = None,
    seq_len: Annotated[
        int | None,
        typer.Option(
            "--seq-len",
            help="Tokens per window (default: 512, or the model's context when shorter).",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 8,
    capacity_group: Annotated[
        int,
        typer.Option(
            "--capacity-group",
            help="Tokens per group of the capacity-factor what-if (GShard's group; consecutive tokens "
            "of the corpus, so the drops do not depend on --batch-size).",
        ),
    ] = 4096,
    split: SplitOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    max_memory: MaxMemoryOpt = None,
    stream: StreamOpt = None,
    device_map: DeviceMapOpt = None,
    save_routes: Annotated[
        bool, typer.Option("--save-routes", help="Also write per-token routes as Parquet under routes/.")
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option("--shard", help="i/n: trace batches b with b mod n == i; merge with `moescope merge`."),
    ] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip plots/*.png.")] = False,
    plot_format: PlotFormatOpt = "png",
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = False,
    csv_out: CsvOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Trace MODEL's routing over CORPUS into a trace directory (load, co-activation, plots)."""
    from moescope.tracing import run_trace

    output = Output.from_flags(json_out, csv_out, quiet)
    if (seq_len is not None and seq_len < 1) or batch_size < 1:
        raise typer.BadParameter("--seq-len and --batch-size must be at least 1.")
    if max_tokens is not None and max_tokens < 1:
        raise typer.BadParameter("--max-tokens must be at least 1.")
    if capacity_group < 1:
        raise typer.BadParameter("--capacity-group must be at least 1 token.")
    shard_t, out, device = _placement(shard, out, device)
    with output.progress("tracing", total=max_tokens) as update:
        start = time.perf_counter()

        def on_progress(done: int, total: int | None) -> None:
            rate = done / max(time.perf_counter() - start, 1e-9)
            update(done, info=f"{human(rate)} tok/s")

        result = run_trace(
            model,
            corpus,
            out,
            split=split,
            revision=revision,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
            seq_len=seq_len,
            batch_size=batch_size,
            capacity_group=capacity_group,
            max_tokens=max_tokens,
            shard=shard_t,
            save_routes=save_routes,
            plots=not no_plots,
            plot_format=plot_format,
            progress=on_progress,
            max_memory=max_memory,
            stream=stream,
            device_map=device_map,
            on_plan=output.info,
        )
    _print_summary(output, result, out)


def _placement(shard: str | None, out: Path, device: str) -> tuple[Any, Path, str]:
    """``--shard`` parsed, ``{rank}`` in ``--out`` filled in, one GPU per torchrun process."""
    from moescope.tracing import parse_shard

    try:
        shard_t = parse_shard(shard)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if "{rank}" in str(out):
        out = Path(str(out).replace("{rank}", str(shard_t[0])))
    if shard == "env" and device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    return shard_t, out, device


def _print_summary(output: Output, result: Any, out: Path) -> None:
    """Warnings about the corpus, then the summary: per-layer table, ``--json`` or ``--csv``."""
    summary: dict[str, Any] = result.summary
    if not summary:  # a torchrun rank other than 0: rank 0 writes and reports
        return
    cstats = summary.get("corpus_stats") or {}
    if cstats.get("empty_documents"):
        output.warn(f"{cstats['empty_documents']} empty document(s) skipped.")
    if cstats.get("non_utf8_documents"):
        output.warn(
            f"{cstats['non_utf8_documents']} document(s) had non-UTF-8 bytes (decoded with replacement)."
        )
    title = f"{summary['model']}: {summary['tokens']:,} tokens, top-{summary['top_k']} of {summary['num_experts']}"
    if not print_layers(output, summary, title):
        return
    output.note(f"wrote {out} ({result.tokens_per_second:,.0f} tok/s); next: moescope report {out}")


def print_layers(output: Output, summary: dict[str, Any], title: str) -> bool:
    """A trace's ``summary.json``: whole (``--json``), its layer rows (``--csv``) or the per-layer table.

    Returns True when the table was printed (the caller then adds its closing note).
    """
    if output.fmt == "json":
        output.json(summary)
        return False
    if output.fmt == "csv":
        output.csv(summary["layers"], LAYER_COLUMNS)
        return False
    rows = [
        [
            r["layer"],
            f"{r['imbalance_max_mean']:.2f}",
            f"{r['cv']:.3f}",
            f"{r['entropy_norm']:.3f}",
            len(r["dead_experts"]),
            len(r["near_dead_experts"]),
        ]
        for r in summary["layers"]
    ]
    output.table(rows, ["layer", "max/mean", "cv", "entropy", "dead", "near-dead"], title=title)
    return True


def register(app: typer.Typer) -> None:
    """Add ``trace`` to the app."""
    app.command("trace", epilog=EXAMPLES)(friendly(trace_cmd))
