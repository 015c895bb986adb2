"""Wires the ``moescope`` commands together; each command lives in its own module.

Each command module exposes ``register(app)``; command bodies are wrapped by
``_errors.friendly``, so every exception becomes one ``Error: ...`` line and exit 1 (130 for
Ctrl-C; the traceback only with ``MOESCOPE_DEBUG=1``). Bad option values are rejected by the
shared option callbacks of ``_options`` as usage errors (exit 2) before any work.

``app`` is the whole command line (for ``--help``, tests and the CLI reference). A run of one
command (``moescope params ...``) builds an app holding that command alone: typer works out
every registered command's options before it parses anything, and importing and building all
ten cost ~30 ms of every run. The command's help, errors and behaviour are the same either
way (``tests/test_output_modes.py`` compares them).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer

# Each module defines ``register(app)``; the order here is the order in --help.
COMMANDS = {
    "params": "moescope.cli.params",
    "download": "moescope.cli.download",
    "trace": "moescope.cli.trace",
    "report": "moescope.cli.report",
    "merge": "moescope.cli.merge",
    "import": "moescope.cli.import_",
    "similarity": "moescope.cli.similarity",
    "prune": "moescope.cli.prune",
    "eval": "moescope.cli.eval",
    "sweep": "moescope.cli.sweep",
    "offload": "moescope.cli.offload",
    "fit": "moescope.cli.fit",
    "diff": "moescope.cli.diff",
}


def build_app(only: str | None = None) -> typer.Typer:
    """The command line: every command, or (``only``) that one command alone."""
    new = typer.Typer(
        name="moescope",
        help="Size, routing and redundancy of Mixture-of-Experts models, read from the checkpoint itself.",
        no_args_is_help=True,
        context_settings={"help_option_names": ["-h", "--help"]},
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    if only is not None:
        # a group callback keeps a one-command app a group, so `moescope CMD ...` parses as it
        # does in the whole app (typer would otherwise run the lone command as the root)
        new.callback()(_group)
    for name, module in COMMANDS.items():
        if only is None or name == only:
            importlib.import_module(module).register(new)
    return new


def _group() -> None:
    """Size, routing and redundancy of Mixture-of-Experts models, read from the checkpoint itself."""


def __getattr__(name: str) -> Any:
    if name == "app":  # built on first use: a command run builds only its own
        whole = globals()["app"] = build_app()
        return whole
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Console entry point."""
    first = sys.argv[1] if len(sys.argv) > 1 else None
    build_app(first if first in COMMANDS else None)(prog_name="moescope")


if __name__ == "__main__":
    main()
