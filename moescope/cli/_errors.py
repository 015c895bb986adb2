"""Maps library exceptions to one-line CLI errors and exit codes.

Exit codes: 0 success, 1 bad data or failed work (:class:`MoescopeError`, malformed
files, I/O errors), 2 bad usage (click's usage errors, ``typer.BadParameter``). The
traceback is shown only when ``MOESCOPE_DEBUG=1``.

Every command body is wrapped by :func:`friendly`, so the mapping holds both for the
console script and for ``typer.testing.CliRunner``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from moescope.errors import MoescopeError

F = TypeVar("F", bound=Callable[..., Any])


def format_error(exc: BaseException) -> str:
    """One line naming the problem (and, where the library knows it, the fix)."""
    if isinstance(exc, MoescopeError):
        text = str(exc)
    elif isinstance(exc, json.JSONDecodeError):
        text = f"malformed JSON ({exc.msg} at line {exc.lineno}); fix the file or pass another one."
    elif isinstance(exc, KeyboardInterrupt):
        text = "interrupted; nothing was left half-written."
    elif isinstance(exc, OSError) and exc.filename:
        text = f"{exc.filename}: {exc.strerror or exc}"
    else:
        text = f"{type(exc).__name__}: {exc} (set MOESCOPE_DEBUG=1 for the full traceback)"
    return " ".join(text.split())


def error_line(message: str) -> None:
    """Print ``Error: message`` on stderr as a single line."""
    print(f"Error: {' '.join(str(message).split())}", file=sys.stderr)


def friendly(fn: F) -> F:
    """Wrap a command body: library errors become one stderr line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except (MoescopeError, OSError, ValueError, KeyboardInterrupt) as exc:
            if os.environ.get("MOESCOPE_DEBUG") == "1":
                raise
            error_line(format_error(exc))
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
