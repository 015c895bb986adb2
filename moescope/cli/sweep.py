"""`moescope sweep`: perplexity, experts per token and FLOPs as top-k / top-p routing changes.

Validates flags (a setting that does not fit the model is a usage error, exit 2, before
the model is loaded), calls :func:`moescope.evaluation.sweep.sweep`, prints a table, ``--json`` (an
array of records: ``setting``, ``top_k``, ``top_p``, ``experts_per_token``,
``active_params``, ``flops_per_token``, ``perplexity``, ``domains``, ...) or ``--csv``
through :class:`moescope.cli._output.Output`, and with ``--plot FILE`` writes perplexity
versus FLOPs per token (:func:`moescope.evaluation.sweep_plot.write_plot`).
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
    RevisionOpt,
    SplitOpt,
    StreamOpt,
    TrustRemoteCodeOpt,
    window_step,
)
from moescope.cli._output import CsvOpt, JsonOpt, Output, QuietOpt, human

EXAMPLES = """
Examples:

  moescope sweep demo demo --top-k 1,2,4 --max-tokens 3000
  moescope sweep demo demo --top-p 0.5,0.7,0.9 --max-tokens 3000 --json
  moescope sweep demo demo:code --top-k '0-1:1,2-:2' --top-k '0-1:2,2-:1' --max-tokens 2000 --csv
  moescope sweep demo demo --top-k 1,2,4 --top-p 0.9 --max-tokens 3000 --plot sweep.png
  moescope sweep org/name notes.jsonl --top-k 4,8 --max-memory 20GiB --max-tokens 4000

Settings: --top-k 1,2,4 is three settings, each applied to every MoE layer; a per-layer
setting names inclusive layer ranges (checkpoint numbering, 'A-' runs to the last layer):
--top-k 0-11:1,12-:2; MoE layers it does not name keep the model's own k. Repeat --top-k
(or separate with ';') for several per-layer settings. --top-p P: each token takes experts
in its router's order until their gate probability reaches P (at least 1; P = 1 takes every
expert it may choose). The model's own routing ('native') is always measured, first, with
no override: its numbers equal 'moescope eval' with the same options. Without --top-k and
--top-p: k = 1, native/2, native, 2 x native.

How k and p apply per family: softmax families (mixtral, qwen2/3_moe, olmoe, jamba, dbrx)
take the k most probable experts, renormalised as the model does; top-k-then-softmax families
(gpt_oss, granite) rank by logit, p uses the softmax of all logits; deepseek_v3/glm4_moe rank
by sigmoid + correction bias inside the kept groups (k at most topk_group x E/n_group), p
uses the sigmoid scores normalised over those; llama4 ranks by logit, p uses normalised
sigmoids. phimoe (k fixed at 2), switch and nllb-moe are refused.

Output: a table, one row per setting; --json an array of records (setting, top_k, top_p,
experts_per_token, active_params, flops_per_token, perplexity, domains, native, loss,
tokens, experts_per_token_by_layer, active_params_no_embedding, seconds); --csv the same
columns. experts_per_token is measured (mean over tokens and MoE layers); active_params and
flops_per_token follow 'moescope params' with each layer's k replaced by that mean.
"""


def sweep_cmd(
    model: Annotated[str, typer.Argument(help="Model: 'demo', a save_pretrained directory or a hub id.")],
    corpus: Annotated[
        list[str],
        typer.Argument(help="Corpus: .txt, .jsonl, .parquet, a directory, '-' or built-in 'demo[:domain]'."),
    ],
    top_k: Annotated[
        list[str] | None,
        typer.Option(
            "--top-k",
            help="Experts per token: 1,2,4 (one setting each) or per layer 0-11:1,12-:2 (repeatable).",
        ),
    ] = None,
    top_p: Annotated[
        list[str] | None,
        typer.Option(
            "--top-p",
            help="Dynamic routing: experts until their gate probability reaches p, e.g. 0.5,0.9 (repeatable).",
        ),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write perplexity vs FLOPs per token to this .png file.")
    ] = None,
    split: SplitOpt = None,
    seq_len: Annotated[
        int | None,
        typer.Option(
            "--seq-len",
            help="Tokens per window (default: 512, or the model's context when shorter).",
            show_default=False,
        ),
    ] = None,
    stride: Annotated[
        int | None, typer.Option("--stride", help="Window step (default: half of --seq-len).")
    ] = None,
    max_tokens: Annotated[
        int,
        typer.Option(
            "--max-tokens", help="Scored tokens at most per setting, split across domains (0: all)."
        ),
    ] = 50_000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 4,
    context: Annotated[
        int, typer.Option("--context", help="Keys each token attends to, for the attention FLOPs.")
    ] = 4096,
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
    """Perplexity, experts per token and FLOPs of MODEL on CORPUS as top-k / top-p routing changes."""
    from moescope.evaluation.override import RoutingSettingError
    from moescope.evaluation.sweep import parse_settings, sweep
    from moescope.evaluation.sweep_plot import write_plot

    out = Output.from_flags(json_out, csv_out, quiet)
    # without --seq-len the library picks a window inside the model's context (its config)
    step = window_step(seq_len, stride) if seq_len is not None else stride
    if step is not None and step < 1:
        raise typer.BadParameter(f"--stride {step} must be at least 1.")
    if batch_size < 1 or max_tokens < 0 or context < 1:
        raise typer.BadParameter("--batch-size and --context must be at least 1, --max-tokens at least 0.")
    if plot is not None:
        from moescope.evaluation.sweep_plot import check_plot_path

        if plot.suffix.lower() != ".png":
            raise typer.BadParameter(f"--plot {plot}: write a .png file (e.g. sweep.png).")
        check_plot_path(plot)  # before the work: a file moescope did not write is refused
    try:
        parse_settings(top_k, top_p)
    except RoutingSettingError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        with out.progress("sweeping settings") as update:
            result = sweep(
                model,
                corpus,
                top_k=top_k,
                top_p=top_p,
                split=split,
                seq_len=seq_len,
                stride=step,
                max_tokens=max_tokens or None,
                batch_size=batch_size,
                context=context,
                dtype=dtype,
                device=device,
                revision=revision,
                trust_remote_code=trust_remote_code,
                max_memory=max_memory,
                stream=stream,
                device_map=device_map,
                progress=update,
                on_plan=out.info,
                on_warning=out.warn,
            )
    except RoutingSettingError as exc:
        # checked against the model's config before it is loaded: a usage error
        raise typer.BadParameter(str(exc)) from None
    records = [r.__dict__ for r in result.records]
    if out.fmt == "json":
        out.json(records)
    elif out.fmt == "csv":
        out.csv(records)
    else:
        _print_table(out, result)
    if plot is not None:
        write_plot(result, plot)
        out.note(f"wrote {plot}")


def _print_table(out: Output, result: Any) -> None:
    """One row per setting: experts per token, active params, FLOPs (and vs native), perplexity per domain."""
    domains = list(result.records[0].domains) if result.records else []
    base = result.native.flops_per_token
    rows = [
        [
            r.setting,
            f"{r.experts_per_token:.2f}",
            human(r.active_params),
            human(r.flops_per_token),
            f"{r.flops_per_token / base:.3f}",
            f"{r.perplexity:.3f}",
            *[f"{r.domains[d]:.3f}" for d in domains],
        ]
        for r in result.records
    ]
    out.table(
        rows,
        ["setting", "experts/tok", "active", "FLOPs/tok", "x native", "ppl", *domains],
        title=f"{result.model}: {result.records[0].tokens:,} tokens per setting; native = top-"
        f"{result.native_top_k} of {result.num_experts} experts",
    )


def register(app: typer.Typer) -> None:
    """Add `sweep` to the app."""
    app.command("sweep", epilog=EXAMPLES)(friendly(sweep_cmd))
