"""Wires the ``moescope`` commands together; each command lives in its own module.

Each command module exposes ``register(app)``; command bodies are wrapped by
``_errors.friendly``, so every exception becomes one ``Error: ...`` line and exit 1 (130 for
Ctrl-C; the traceback only with ``MOESCOPE_DEBUG=1``). Bad option values are rejected by the
shared option callbacks of ``_options`` as usage errors (exit 2) before any work.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="moescope",
    help="Size, routing and redundancy of Mixture-of-Experts models, read from the checkpoint itself.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module defines ``register(app)``; the order here is the order in --help.
_COMMAND_MODULES = [
    "moescope.cli.params",
    "moescope.cli.download",
    "moescope.cli.trace",
    "moescope.cli.report",
    "moescope.cli.merge",
    "moescope.cli.import_",
    "moescope.cli.similarity",
    "moescope.cli.prune",
    "moescope.cli.eval",
    "moescope.cli.sweep",
]

for _name in _COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as exc:  # a command not written yet
        if exc.name != _name:
            raise
        continue
    _module.register(app)


def main() -> None:
    """Console entry point."""
    app(prog_name="moescope")


if __name__ == "__main__":
    main()
