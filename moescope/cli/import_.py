"""`moescope import`: write a trace directory from routing recorded elsewhere (SGLang, any logger).

Validates flags, calls :func:`moescope.importers.import_routes`, shows progress (tokens
imported) on stderr, and prints the per-layer table of the trace written (or the summary as
``--json``, or its per-layer records as ``--csv``), like ``moescope trace``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from moescope.cli._errors import friendly
from moescope.cli._options import RevisionOpt
from moescope.cli._output import CsvOpt, JsonOpt, Output, QuietOpt

#: the formats (equal to ``moescope.importers.FORMATS``, tested; spelled out so --help is fast)
FORMATS = ("sglang-dump", "sglang-response", "ids", "vllm")

EXAMPLES = """
Examples:

  moescope import sglang-dump expert_distribution_recorder_*.pt --model demo --out traces/served
  moescope import sglang-response responses.jsonl --model demo --out traces/served
  moescope import ids routes.parquet --model demo --out traces/imported --json
  moescope import ids routes.npy --model demo --out traces/imported   (no documents: token order unknown)
  moescope import vllm routes.npy --model demo --out traces/vllm --save-routes   (one request; then: moescope offload traces/vllm)

Formats:
  sglang-dump      files SGLang's expert-distribution recorder writes (launch with
                   --expert-distribution-recorder-mode per_token or stat, then POST
                   /start_expert_distribution_record, /stop_expert_distribution_record and
                   /dump_expert_distribution_record); one file per rank, combined. Loaded with
                   torch.load(weights_only=True): a file that needs arbitrary Python objects is refused.
  sglang-response  JSON lines of /generate responses (launch with --enable-return-routed-experts,
                   request with "return_routed_experts": true); each response is one document.
  ids              Parquet, one row per token, layer and slot: layer, token, expert [, weight, doc,
                   domain]; or a .npy integer array [tokens, layers, k] (-1: empty slot).
  vllm             vLLM's per-request routed_experts [tokens, layers, k] (serve with
                   --enable-return-routed-experts): .npy (one request), .npz (one request per
                   array), or JSON lines of responses (choices[].routed_experts, or a saved
                   output's routed_experts; nested lists or base64 int32). Each request is one
                   document. SGLang's OpenAI-compatible responses (choices[].sgl_ext.routed_experts)
                   are read by sglang-response.

--save-routes also writes routes/ (per-token routing in token order, for moescope offload and fit
--trace) when the source has token order (responses, vllm, ids with doc).

--model (hub id, directory or config file) gives the MoE layers, experts and top-k from its config;
no weights are read. Layers may be every decoder layer (SGLang's convention; dense ones are skipped)
or only the MoE layers. summary.json records source (the format) and lacks: what the source does not
carry (gate_weights, out_norms, domains, token_order; stat dumps also per_token, coactivation,
capacity, expert_parallel). prune --criterion frequency works on any imported trace; criteria that
need missing data refuse.

Output: a per-layer table (imbalance, dead experts); --json prints the summary.json written; --csv
its per-layer records (layer, imbalance_max_mean, cv, entropy_norm, dead_experts, near_dead_experts,
router_dropped; lists JSON-encoded).
"""


def check_format(value: str) -> str:
    """One of :data:`FORMATS` (usage error otherwise)."""
    fmt = value.strip().lower()
    if fmt not in FORMATS:
        raise typer.BadParameter(f"unknown format {value!r}; use one of {', '.join(FORMATS)}.")
    return fmt


def import_cmd(
    fmt: Annotated[
        str,
        typer.Argument(
            metavar="FORMAT", callback=check_format, help="sglang-dump, sglang-response, ids or vllm."
        ),
    ],
    paths: Annotated[
        list[Path], typer.Argument(metavar="PATH", help="Recorded files (several ranks combine).")
    ],
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="Model the routing was recorded on: hub id, directory or config."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Trace directory to write (an old trace is replaced).")
    ],
    seq_len: Annotated[
        int | None,
        typer.Option(
            "--seq-len",
            help="Streamed formats: tokens per window of the what-if batches (default: trace's, 512 or the "
            "model's context when shorter).",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Streamed formats: windows per what-if batch (capacity, EP).")
    ] = 8,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip plots/*.png.")] = False,
    save_routes: Annotated[
        bool, typer.Option("--save-routes", help="Also write routes/ (token order) for `moescope offload`.")
    ] = False,
    revision: RevisionOpt = None,
    json_out: JsonOpt = False,
    csv_out: CsvOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a trace directory from routing recorded elsewhere (SGLang dumps or responses, Parquet/npy ids)."""
    from moescope.cli.trace import print_layers
    from moescope.importers import import_routes

    output = Output.from_flags(json_out, csv_out, quiet)
    if (seq_len is not None and seq_len < 1) or batch_size < 1:
        raise typer.BadParameter("--seq-len and --batch-size must be at least 1.")
    with output.progress("importing") as update:
        result = import_routes(
            fmt,
            paths,
            model=model,
            out=out,
            revision=revision,
            seq_len=seq_len,
            batch_size=batch_size,
            plots=not no_plots,
            progress=lambda done: update(done, info="tokens"),
            save_routes=save_routes,
        )
    for line in result.notes:
        output.info(line)
    summary: dict[str, Any] = result.summary
    title = f"{model} ({fmt}, {result.mode}): {result.tokens:,} tokens, top-{result.top_k} of {result.num_experts}"
    if not print_layers(output, summary, title):
        return
    lacks = ", ".join(result.lacks) or "nothing"
    output.note(f"wrote {out} (lacks: {lacks}); next: moescope report {out}")


def register(app: typer.Typer) -> None:
    """Add ``import`` to the app."""
    app.command("import", epilog=EXAMPLES)(friendly(import_cmd))
