"""``moescope download``: fetch config, tokenizer and safetensors into the HF cache.

stdout is the snapshot path (one line, for ``$(moescope download ...)``); huggingface_hub's
progress bars on stderr follow :class:`moescope.cli._output.Output`'s rule (off with
``--quiet`` and when stderr is not a terminal).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from moescope.cli._errors import friendly
from moescope.cli._output import Output, QuietOpt

EXAMPLES = """
Examples:

  moescope download mistralai/Mixtral-8x7B-v0.1

  moescope download Qwen/Qwen3-30B-A3B@main --include "*.py"

  HF_HUB_OFFLINE=1 moescope params Qwen/Qwen3-30B-A3B     # later, from the cache

Output: the local snapshot path, one line on stdout (no table, so no --json or --csv);
progress bars on stderr unless --quiet or stderr is not a terminal.
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
    quiet: QuietOpt = False,
) -> None:
    """Download a model's config, tokenizer and safetensors weights into the standard HF cache.

    Honours HF_TOKEN, HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE; pickled files (*.bin, *.pt, *.pth,
    *.pkl, *.pickle, *.ckpt) are never fetched, whatever --include says.
    Prints the local snapshot path on stdout.
    """
    from moescope.checkpoint.download import download, pickle_patterns
    from moescope.checkpoint.hub import PICKLE_PATTERNS

    output = Output(quiet=quiet)
    named = pickle_patterns(include)
    if named:
        output.warn(
            f"--include {' '.join(named)}: pickled files ({', '.join(PICKLE_PATTERNS)}) are never downloaded "
            "(unpickling can run arbitrary code); fetching the safetensors files instead."
        )
    with _hub_progress(output.progress_enabled):
        path = download(model, revision=revision, include=include, headers_only=no_weights)
    print(path)


@contextmanager
def _hub_progress(enabled: bool) -> Iterator[None]:
    """huggingface_hub's progress bars off for the call unless ``enabled`` (restored after)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def register(app: typer.Typer) -> None:
    """Add ``download`` to the app."""
    app.command("download", epilog=EXAMPLES)(friendly(download_cmd))
