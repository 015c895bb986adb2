"""One output layer for every command: :class:`Output`, built from ``--json/--csv/--quiet``.

Modes (``Output.fmt``):

- ``table`` (default): rich tables on stdout, for people.
- ``json`` (``--json``): one JSON document on stdout, an array of records or the object
  the command documents in its ``--help`` (NaN and infinity become ``null``).
- ``csv`` (``--csv``): CSV with a header row on stdout; list and dict values are
  JSON-encoded, ``None`` is an empty cell.

``--json`` and ``--csv`` together are a usage error (exit 2), raised before any work by
:meth:`Output.from_flags`.

stdout carries data only. Everything else goes to stderr, by kind:

- :meth:`Output.warn`: always, even with ``--quiet`` (something about the data or the
  inputs the user must know);
- :meth:`Output.info`: status the user relies on (e.g. whether the model is loaded whole
  or streamed); off only with ``--quiet``;
- :meth:`Output.note`: hints for people (``wrote DIR; next: ...``); off with ``--json``,
  ``--csv`` and ``--quiet``;
- :meth:`Output.progress`: a transient bar; only in table mode, without ``--quiet``, and
  when stderr is a terminal.

The shared flags are :data:`JsonOpt`, :data:`CsvOpt` and :data:`QuietOpt`. The
module-level functions (:func:`print_json`, :func:`print_table`, :func:`warn`, ...) are
thin wrappers kept for callers that have no :class:`Output` at hand.
"""

from __future__ import annotations

import csv
import json as _json
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = [
    "FORMATS",
    "CsvOpt",
    "JsonOpt",
    "Output",
    "QuietOpt",
    "check_format",
    "err_console",
    "human",
    "note",
    "print_csv",
    "print_json",
    "print_table",
    "progress_bar",
    "progress_enabled",
    "warn",
]

#: the output formats, in the order of ``Output.fmt``'s values
FORMATS = ("table", "json", "csv")

#: stderr; rich resolves ``sys.stderr`` on every write, so test runners that swap it see the output
err_console = Console(stderr=True)

JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print JSON to stdout instead of the table (shape: see Output below); not with --csv.",
    ),
]
CsvOpt = Annotated[
    bool,
    typer.Option(
        "--csv",
        help="Print CSV with a header row to stdout instead of the table (see Output below); not with --json.",
    ),
]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="No progress bars, status or hints on stderr (warnings and errors still show)."
    ),
]

#: ``update(completed, total=None, info=None)`` of :meth:`Output.progress`
ProgressUpdate = Callable[..., None]


def check_format(json_out: bool, csv_out: bool) -> str:
    """``table``, ``json`` or ``csv``; both flags are a usage error (exit 2) before any work."""
    if json_out and csv_out:
        raise typer.BadParameter("Cannot use --json and --csv together; pick one.")
    return "json" if json_out else "csv" if csv_out else "table"


def _jsonable(value: Any) -> Any:
    """``default=`` of :func:`json.dumps`: numpy scalars and arrays, paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _finite(value: Any) -> Any:
    """NaN and infinity become None (JSON has no spelling for them), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and not hasattr(value, "__len__"):  # numpy scalar
        return _finite(value.item())
    return value


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, (list, tuple, dict)):
        return _json.dumps(_finite(value), default=_jsonable)
    return value


@dataclass(frozen=True)
class Output:
    """Where and how a command prints: one per command run (see the module docstring).

    Attributes:
        fmt: ``table``, ``json`` or ``csv``.
        quiet: ``--quiet``: no progress, status or hints on stderr.
    """

    fmt: str = "table"
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown output format {self.fmt!r}; use one of {', '.join(FORMATS)}.")

    @classmethod
    def from_flags(cls, json_out: bool = False, csv_out: bool = False, quiet: bool = False) -> Output:
        """The output of ``--json/--csv/--quiet``; both formats at once raise ``typer.BadParameter``."""
        return cls(check_format(json_out, csv_out), quiet)

    @property
    def machine(self) -> bool:
        """``--json`` or ``--csv``: stdout is for a program."""
        return self.fmt != "table"

    @property
    def progress_enabled(self) -> bool:
        """Bars only for people: table output, not quiet, stderr a terminal."""
        return self.fmt == "table" and not self.quiet and sys.stderr.isatty()

    # ---------------------------------------------------------------- stdout: data

    def json(self, data: Any) -> None:
        """Print one JSON document (an object or an array, ``[]`` when empty)."""
        sys.stdout.write(_json.dumps(_finite(data), indent=2, default=_jsonable) + "\n")

    def csv(self, records: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
        """Print records as CSV with a header row (columns: ``columns`` or the first record's keys)."""
        cols = list(columns if columns is not None else (records[0].keys() if records else []))
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(cols)
        for rec in records:
            writer.writerow([_cell(rec.get(c)) for c in cols])

    def table(
        self,
        rows: Sequence[Sequence[Any]],
        headers: Sequence[str],
        title: str | None = None,
        justify_right: Sequence[bool] | None = None,
    ) -> None:
        """Print a rich table (first column left-aligned, the others right, unless told)."""
        table = Table(title=title, header_style="bold")
        for i, h in enumerate(headers):
            right = justify_right[i] if justify_right else i > 0
            table.add_column(h, justify="right" if right else "left")
        for row in rows:
            table.add_row(*[str(c) for c in row])
        Console().print(table)

    def records(
        self,
        records: Sequence[Mapping[str, Any]],
        columns: Sequence[str] | None = None,
        title: str | None = None,
    ) -> None:
        """Records in the current format: a JSON array, CSV, or a plain table.

        ``columns`` chooses and orders the CSV and table columns (default: the first record's
        keys); JSON keeps every key of every record.
        """
        if self.fmt == "json":
            self.json([dict(r) for r in records])
        elif self.fmt == "csv":
            self.csv(records, columns)
        else:
            cols = list(columns if columns is not None else (records[0].keys() if records else []))
            rows = [["-" if _cell(r.get(c)) == "" else _cell(r.get(c)) for c in cols] for r in records]
            self.table(rows, cols, title=title)

    # ---------------------------------------------------------------- stderr: everything else

    def warn(self, message: str) -> None:
        """A warning on stderr, shown in every mode (``--quiet`` included)."""
        err_console.print(f"[yellow]Warning:[/yellow] {message}", highlight=False, soft_wrap=True)

    def info(self, message: str) -> None:
        """Status on stderr (e.g. whole or streamed execution); off only with ``--quiet``."""
        if not self.quiet:
            err_console.print(message, highlight=False, soft_wrap=True, style="dim")

    def note(self, message: str) -> None:
        """A hint for people on stderr; off with ``--json``, ``--csv`` and ``--quiet``."""
        if not self.quiet and not self.machine:
            err_console.print(message, highlight=False, soft_wrap=True, style="dim")

    @contextmanager
    def progress(self, description: str, total: int | None = None) -> Iterator[ProgressUpdate]:
        """A transient progress bar on stderr; yields ``update(completed, total=None, info=None)``.

        When progress is off (:attr:`progress_enabled`) ``update`` does nothing, so commands
        call it unconditionally.
        """
        if not self.progress_enabled:
            yield _no_progress
            return
        with _bar() as prog:
            task = prog.add_task(description, total=total, info="")

            def update(completed: int, total: int | None = None, info: str | None = None) -> None:
                fields: dict[str, Any] = {"completed": completed}
                if total is not None:
                    fields["total"] = total
                if info is not None:
                    fields["info"] = info
                prog.update(task, **fields)

            yield update


def _no_progress(completed: int, total: int | None = None, info: str | None = None) -> None:
    """``update`` of a disabled progress bar."""


def _bar() -> Progress:
    # imported when a bar is shown: 7 ms that a --json run or a pipe never needs
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=err_console,
        transient=True,
    )


# --------------------------------------------------------------------------- thin wrappers

_TABLE = Output()


def print_json(data: Any) -> None:
    """Print JSON to stdout (:meth:`Output.json`)."""
    _TABLE.json(data)


def print_csv(records: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Print records as CSV with a header row (:meth:`Output.csv`)."""
    _TABLE.csv(records, columns)


def print_table(
    rows: Sequence[Sequence[Any]],
    headers: Sequence[str],
    title: str | None = None,
    justify_right: Sequence[bool] | None = None,
) -> None:
    """Print a rich table to stdout (:meth:`Output.table`)."""
    _TABLE.table(rows, headers, title=title, justify_right=justify_right)


def warn(message: str) -> None:
    """A warning line on stderr (:meth:`Output.warn`)."""
    _TABLE.warn(message)


def note(message: str) -> None:
    """An informational line on stderr, whatever the format (:meth:`Output.info`)."""
    _TABLE.info(message)


def progress_enabled(fmt: str = "table", quiet: bool = False) -> bool:
    """Progress bars only for humans: table output, not quiet, stderr a terminal."""
    return Output(fmt, quiet).progress_enabled


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress | None]:
    """A transient rich progress bar on stderr, or ``None`` when disabled."""
    if not enabled:
        yield None
        return
    with _bar() as prog:
        yield prog


def human(n: float | int | None, unit: str = "") -> str:
    """1234567 -> '1.23M'; bytes with unit='B' use GiB-style binary prefixes."""
    if n is None:
        return "-"
    if unit == "B":
        for suffix, scale in _BINARY:
            if abs(n) >= scale:
                return f"{n / scale:.2f} {suffix}"
        return f"{int(n)} B"
    if unit == "FLOP":
        for suffix, scale in _FLOP:
            if abs(n) >= scale:
                return f"{n / scale:.2f} {suffix}FLOP"
        return f"{n:g} FLOP"
    for suffix, scale in _DECIMAL:
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


_BINARY: tuple[tuple[str, float], ...] = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
_FLOP: tuple[tuple[str, float], ...] = (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3))
_DECIMAL: tuple[tuple[str, float], ...] = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3))
