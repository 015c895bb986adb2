"""`moescope eval`: perplexity of a model on a corpus, overall and per domain.

Validates flags, calls :func:`moescope.evaluate.evaluate`, prints a table, ``--json``
(an object with ``perplexity``, ``tokens`` and ``domains``) or ``--csv`` (one row per
domain plus ``all``).
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
    QuietOpt,
    RevisionOpt,
    SplitOpt,
    StreamOpt,
    TrustRemoteCodeOpt,
)
from moescope.cli._output import (
    check_format,
    human,
    note,
    print_csv,
    print_json,
    print_table,
    progress_bar,
    progress_enabled,
    warn,
)

EXAMPLES = """
Examples:

  moescope eval demo demo
  moescope eval demo demo:code --seq-len 256 --stride 128 --json
  moescope eval pruned/ demo --max-tokens 20000
  moescope eval org/name notes.jsonl --device cuda --dtype bf16
"""


def eval_cmd(
    model: Annotated[str, typer.Argument(help="Model: 'demo', a save_pretrained directory or a hub id.")],
    corpus: Annotated[
        list[str],
        typer.Argument(help="Corpus: .txt, .jsonl, .parquet, a directory, '-' or built-in 'demo[:domain]'."),
    ],
    split: SplitOpt = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 512,
    stride: Annotated[
        int | None, typer.Option("--stride", help="Window step (default: half of --seq-len).")
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="Scored tokens at most, split across domains (0: all).")
    ] = 50_000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 4,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    max_memory: MaxMemoryOpt = None,
    stream: StreamOpt = None,
    device_map: DeviceMapOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="Print CSV, one row per domain and 'all'.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity of MODEL on CORPUS (sliding window), overall and per domain."""
    from moescope.evaluate import evaluate

    fmt = check_format(json_out, csv_out)
    if seq_len < 2:
        raise typer.BadParameter(f"--seq-len {seq_len} is too short; use at least 2.")
    step = stride if stride is not None else max(1, seq_len // 2)
    if not 1 <= step <= seq_len:
        raise typer.BadParameter(f"--stride {step} must be between 1 and --seq-len ({seq_len}).")
    if batch_size < 1 or max_tokens < 0:
        raise typer.BadParameter("--batch-size must be at least 1 and --max-tokens at least 0.")
    with progress_bar(progress_enabled(fmt, quiet)) as bar:
        task = bar.add_task("scoring windows", total=None, info="") if bar else None

        def on_progress(done: int, total: int) -> None:
            if bar is not None and task is not None:
                bar.update(task, completed=done, total=total)

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
            progress=on_progress,
            on_warning=warn,
            max_memory=max_memory,
            stream=stream,
            device_map=device_map,
            on_plan=None if quiet else note,
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
    if fmt == "json":
        print_json(result.to_dict())
    elif fmt == "csv":
        print_csv(rows)
    else:
        print_table(
            [[r["domain"], f"{r['perplexity']:.3f}", f"{r['loss']:.4f}", human(r["tokens"])] for r in rows],
            ["domain", "perplexity", "loss (nats)", "tokens"],
            title=f"{model} on {' '.join(corpus)} (seq_len {seq_len}, stride {step})",
        )


def register(app: typer.Typer) -> None:
    """Add `eval` to the app."""
    app.command("eval", epilog=EXAMPLES)(friendly(eval_cmd))
