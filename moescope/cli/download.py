"""``moescope download``: fetch config, tokenizer and safetensors into the HF cache."""

from __future__ import annotations

from typing import Annotated

import typer

from moescope.cli._errors import friendly
from moescope.cli._output import warn

EXAMPLES = """
Examples:

  moescope download mistralai/Mixtral-8x7B-v0.1

  moescope download Qwen/Qwen3-30B-A3B@main --include "*.py"

  HF_HUB_OFFLINE=1 moescope params Qwen/Qwen3-30B-A3B     # later, from the cache
"""


def download_cmd(
    model: Annotated[str, typer.Argument(help="Hub id: org/name or org/name@revision.", show_default=False)],
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit.")] = None,
    include: Annotated[
        list[str] | None,
        typer.Option(
            "--include", help="Extra glob patterns to fetch (repeatable); pickle formats are never fetched."
        ),
    ] = None,
    no_weights: Annotated[bool, typer.Option("--no-weights", help="Configs and tokenizer only.")] = False,
) -> None:
    """Download a model's config, tokenizer and safetensors weights into the standard HF cache.

    Honours HF_TOKEN, HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE; pickled files (*.bin, *.pt, *.pth,
    *.pkl, *.pickle, *.ckpt) are never fetched, whatever --include says.
    Prints the local snapshot path on stdout.
    """
    from moescope.download import PICKLE_PATTERNS, download, pickle_patterns

    named = pickle_patterns(include)
    if named:
        warn(
            f"--include {' '.join(named)}: pickled files ({', '.join(PICKLE_PATTERNS)}) are never downloaded "
            "(unpickling can run arbitrary code); fetching the safetensors files instead."
        )
    path = download(model, revision=revision, include=include, headers_only=no_weights)
    print(path)


def register(app: typer.Typer) -> None:
    """Add ``download`` to the app."""
    app.command("download", epilog=EXAMPLES)(friendly(download_cmd))
