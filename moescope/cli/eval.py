"""`moescope eval`: perplexity of a model on a corpus, overall and per domain.

Validates flags, calls :func:`moescope.evaluation.perplexity.evaluate`, prints a table, ``--json``
(an object with ``perplexity``, ``tokens`` and ``domains``) or ``--csv`` (one row per
domain plus ``all``) through :class:`moescope.cli._output.Output`.
"""

from __future__ import annotations

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

  moescope eval demo demo
  moescope eval demo demo:code --seq-len 256 --stride 128 --json
  moescope eval pruned/ demo --max-tokens 20000
  moescope eval org/name notes.jsonl --device cuda --dtype bf16

--dtype auto (the default) computes in the checkpoint's own dtype (torch_dtype in its
config.json); pass --dtype float32 for full-precision scores of a bf16 checkpoint.

Output: a table with one row per domain and 'all'; --json prints one object (perplexity,
loss, tokens, domains: domain -> perplexity, domain_tokens, ...); --csv one row per domain
and 'all' with domain, perplexity, loss, tokens.
"""


def eval_cmd(
    model: Annotated[str, typer.Argument(help="Model: 'demo', a save_pretrained directory or a hub id.")],
    corpus: Annotated[
        list[str],
        typer.Argument(help="Corpus: .txt, .jsonl, .parquet, a directory, '-' or built-in 'demo[:domain]'."),
    ],
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
        int, typer.Option("--max-tokens", help="Scored tokens at most, split across domains (0: all).")
    ] = 50_000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 4,
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
    """Perplexity of MODEL on CORPUS (sliding window), overall and per domain."""
    from moescope.evaluation.perplexity import evaluate

    out = Output.from_flags(json_out, csv_out, quiet)
    # without --seq-len the library picks a window inside the model's context (its config)
    step = window_step(seq_len, stride) if seq_len is not None else stride
    if step is not None and step < 1:
        raise typer.BadParameter(f"--stride {step} must be at least 1.")
    if batch_size < 1 or max_tokens < 0:
        raise typer.BadParameter("--batch-size must be at least 1 and --max-tokens at least 0.")
    with out.progress("scoring windows") as update:
        result = evaluate(
            model,
            corpus,
            split=split,
            seq_len=seq_len,
            stride=step,
            max_tokens=max_tokens or None,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            revision=revision,
            trust_remote_code=trust_remote_code,
            progress=update,
            on_warning=out.warn,
            max_memory=max_memory,
            stream=stream,
            device_map=device_map,
            on_plan=out.info,
        )
    rows: list[dict[str, Any]] = [
        {"domain": "all", "perplexity": result.perplexity, "loss": result.loss, "tokens": result.tokens}
    ]
    rows += [
        {
            "domain": d,
            "perplexity": r.perplexity,
            "loss": r.nll / r.tokens if r.tokens else None,
            "tokens": r.tokens,
        }
        for d, r in result.domains.items()
    ]
    if out.fmt == "json":
        out.json(result.to_dict())
    elif out.fmt == "csv":
        out.csv(rows, ["domain", "perplexity", "loss", "tokens"])
    else:
        out.table(
            [[r["domain"], f"{r['perplexity']:.3f}", f"{r['loss']:.4f}", human(r["tokens"])] for r in rows],
            ["domain", "perplexity", "loss (nats)", "tokens"],
            title=f"{model} on {' '.join(corpus)} (seq_len {result.seq_len}, stride {result.stride})",
        )


def register(app: typer.Typer) -> None:
    """Add `eval` to the app."""
    app.command("eval", epilog=EXAMPLES)(friendly(eval_cmd))
