"""Maps every exception a command body raises to one ``Error: ...`` line and an exit code.

Exit codes: 0 success, 1 bad data or failed work (:class:`MoescopeError`, malformed
files, I/O errors, hub errors, anything unexpected), 2 bad usage (click's usage errors,
``typer.BadParameter``; raised by option callbacks before any work), 130 interrupted
(Ctrl-C, the shell convention). The traceback is shown only when ``MOESCOPE_DEBUG=1``,
which re-raises the exception instead.

How: :data:`RULES` is one table, first match wins. A rule names exception classes (by
class name, anywhere in the exception's MRO, so torch, safetensors and huggingface_hub are
never imported just to classify an error), optionally a pattern the message must match,
and the line to print. An exception that no rule claims prints
``Error: <Type>: <message> (set MOESCOPE_DEBUG=1 for the traceback)``.

An exception that passed through :func:`moescope.outdir.atomic_output` carries
``moescope_outcome`` (what the output directory holds now); it is appended to the line.

Every command body is wrapped by :func:`friendly`, so the mapping holds both for the
console script and for ``typer.testing.CliRunner``.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import typer
from typer.exceptions import TyperException

from moescope.errors import MoescopeError

F = TypeVar("F", bound=Callable[..., Any])

#: exit code of a command interrupted by Ctrl-C (128 + SIGINT, as shells report it)
EXIT_INTERRUPTED = 130

DEBUG_HINT = "(set MOESCOPE_DEBUG=1 for the traceback)"

#: the hint for every "this torch cannot use CUDA" error (option callback and error table)
NO_CUDA = "this torch has no CUDA; pass --device cpu or install a CUDA build of torch"

_TRUE = ("1", "true", "yes", "on")


def debug_enabled() -> bool:
    """``MOESCOPE_DEBUG=1``: let exceptions propagate with their traceback."""
    return os.environ.get("MOESCOPE_DEBUG", "").strip().lower() in _TRUE


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (library messages run long)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _oserror(exc: BaseException) -> str:
    if not isinstance(exc, OSError):
        return _generic(exc)
    where = f"{exc.filename}: " if exc.filename else ""
    code = exc.errno
    # the hint names both places moescope writes: output directories and the HF cache
    free = "free some space or write elsewhere (--out; HF_HUB_CACHE for downloads)"
    if code == errno.ENOSPC:
        return f"{where}no space left on device; {free}."
    if code == errno.EDQUOT:
        return f"{where}disk quota exceeded; {free}."
    if code in (errno.EACCES, errno.EPERM):
        return f"{where}permission denied; check the file's permissions or pick another path."
    if code == errno.EROFS:
        return f"{where}read-only file system; write to a writable directory (--out)."
    if code == errno.ENOENT:
        return f"{where}no such file or directory; check the path."
    if code == errno.EISDIR:
        return f"{where}is a directory; pass a file."
    if code == errno.ENOTDIR:
        return f"{where}not a directory; check the path."
    if code == errno.EMFILE:
        return "too many open files; raise the limit (ulimit -n) and retry."
    if exc.filename:
        return f"{where}{exc.strerror or _first_line(exc)}"
    return f"{type(exc).__name__}: {_first_line(exc)} {DEBUG_HINT}"


def _json(exc: BaseException) -> str:
    msg = getattr(exc, "msg", _first_line(exc))
    line = getattr(exc, "lineno", "?")
    return f"malformed JSON ({msg} at line {line}); fix the file or pass another one."


def _value_error(exc: BaseException) -> str:
    # A ValueError moescope raised itself is a message for the user; elsewhere it is a bug.
    tb = exc.__traceback__
    module = ""
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        tb = tb.tb_next
    if module.startswith("moescope"):
        return _first_line(exc)
    return _generic(exc)


def _generic(exc: BaseException) -> str:
    text = _first_line(exc)
    return f"{type(exc).__name__}: {text} {DEBUG_HINT}" if text else f"{type(exc).__name__} {DEBUG_HINT}"


def _unreachable(exc: BaseException) -> str:
    return (
        f"cannot reach the server ({_first_line(exc) or type(exc).__name__}); check the network, or "
        "set HF_HUB_OFFLINE=1 to work from a populated HF cache."
    )


def _not_cached() -> str:
    from moescope.checkpoint.hub import hub_env

    env = hub_env()
    if env["offline"]:
        return (
            f"the files are not in the HF cache at {env['cache_dir']} and {env['offline_why']} forbids "
            "downloads; run `moescope download` on a machine with network (same HF_HUB_CACHE) first."
        )
    return (
        f"the files are not in the HF cache at {env['cache_dir']} and the hub could not be reached; check "
        "the network, or run `moescope download` on a machine with network and set HF_HUB_OFFLINE=1."
    )


@dataclass(frozen=True)
class Rule:
    """One row of the error table.

    Attributes:
        names: exception class names; the rule applies when one is in the exception's MRO.
        message: builds the line (without ``Error:``) from the exception.
        pattern: a regex the exception's text must match too (case-insensitive), or None.
    """

    names: tuple[str, ...]
    message: Callable[[BaseException], str]
    pattern: str | None = None

    def matches(self, exc: BaseException) -> bool:
        mro = {cls.__name__ for cls in type(exc).__mro__}
        if not mro.intersection(self.names):
            return False
        return self.pattern is None or re.search(self.pattern, str(exc), re.IGNORECASE) is not None


#: The one table: first match wins; order subclasses before their bases.
RULES: list[Rule] = [
    Rule((MoescopeError.__name__,), lambda e: str(e)),
    Rule(("KeyboardInterrupt",), lambda e: "interrupted."),
    # torch without CUDA (an AssertionError in old releases, RuntimeError or others in new ones)
    Rule(
        ("AssertionError", "RuntimeError", "AcceleratorError"),
        lambda e: f"{NO_CUDA}.",
        r"not compiled with CUDA|no NVIDIA driver|NVIDIA driver on your system|no CUDA GPUs are available"
        r"|CUDA driver initialization failed",
    ),
    Rule(
        ("OutOfMemoryError",),
        lambda e: (
            "out of GPU memory; lower --batch-size or --seq-len, use --dtype bfloat16, or --device cpu."
        ),
    ),
    Rule(
        ("RuntimeError",),
        lambda e: "MPS is not available in this torch or on this machine; pass --device cpu.",
        r"MPS backend|mps.*not available",
    ),
    Rule(
        ("MemoryError",),
        lambda e: "out of memory; lower --batch-size or --seq-len, use --dtype bfloat16, or a smaller model.",
    ),
    # huggingface_hub (subclasses first: GatedRepoError is a RepositoryNotFoundError)
    Rule(
        ("GatedRepoError",),
        lambda e: (
            "the repo is gated; accept its licence on the hub and set HF_TOKEN (or run `hf auth login`)."
        ),
    ),
    Rule(
        ("DisabledRepoError",),
        lambda e: "the repo has been disabled on the hub; pick another model.",
    ),
    Rule(
        ("RepositoryNotFoundError",),
        lambda e: "no such model on the hub (or it is private: set HF_TOKEN); check the id.",
    ),
    Rule(
        ("RevisionNotFoundError",),
        lambda e: "revision not found on the hub; check the branch, tag or commit (--revision).",
    ),
    Rule(
        ("OfflineModeIsEnabled",),
        lambda e: (
            "HF_HUB_OFFLINE=1 forbids network access and the files are not in the HF cache; unset it, "
            "or run `moescope download` on a machine with network first."
        ),
    ),
    Rule(("LocalEntryNotFoundError",), lambda e: _not_cached()),
    Rule(
        ("EntryNotFoundError", "RemoteEntryNotFoundError"),
        lambda e: f"a file is missing from the repo ({_first_line(e)}); check the id and revision.",
    ),
    Rule(
        ("HfHubHTTPError",),
        lambda e: (
            f"the hub answered with an error ({_first_line(e)}); check HF_TOKEN, the id and the network."
        ),
    ),
    # network errors of httpx / requests / urllib3 that escape huggingface_hub
    Rule(
        ("ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "ProxyError", "SSLError"),
        _unreachable,
    ),
    Rule(
        ("SafetensorError",), lambda e: f"unreadable safetensors file ({_first_line(e)}); download it again."
    ),
    Rule(("JSONDecodeError",), _json),
    Rule(
        ("UnicodeDecodeError",),
        lambda e: f"not UTF-8 text ({_first_line(e)}); pass a UTF-8 file or convert it first.",
    ),
    Rule(("OSError",), _oserror),
    Rule(("ValueError",), _value_error),
]


def format_error(exc: BaseException) -> str:
    """One line naming the problem and, where known, the fix (without the ``Error:`` prefix)."""
    text = next((rule.message(exc) for rule in RULES if rule.matches(exc)), None) or _generic(exc)
    outcome = getattr(exc, "moescope_outcome", None)
    if isinstance(outcome, str) and outcome.strip():
        text = f"{text.rstrip().rstrip('.')}; {outcome.strip().rstrip('.')}."
    return " ".join(text.split())


def error_line(message: str) -> None:
    """Print ``Error: message`` on stderr as a single line."""
    print(f"Error: {' '.join(str(message).split())}", file=sys.stderr)


def exit_code(exc: BaseException) -> int:
    """1 for failed work, :data:`EXIT_INTERRUPTED` for Ctrl-C."""
    return EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else 1


def friendly(fn: F) -> F:
    """Wrap a command body: any exception becomes one stderr line and exit code 1 (130 for Ctrl-C).

    Typer's own control flow (``typer.Exit``, ``typer.Abort``, usage errors such as
    ``typer.BadParameter``) passes through untouched, so usage errors keep exit code 2.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except (Exception, KeyboardInterrupt) as exc:
            if isinstance(exc, TyperException) or debug_enabled():
                raise
            error_line(format_error(exc))
            raise typer.Exit(exit_code(exc)) from None

    return wrapper  # type: ignore[return-value]


__all__ = ["RULES", "Rule", "error_line", "exit_code", "format_error", "friendly"]
