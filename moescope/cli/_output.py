"""One renderer for every tabular output: rich table (default), ``--json`` or ``--csv``.

stdout carries data only; progress, warnings and hints go to stderr through
:data:`err_console`. Progress bars are off for machine formats, ``--quiet`` and when
stderr is not a terminal.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

err_console = Console(stderr=True)


def check_format(json_out: bool, csv_out: bool) -> str:
    """Return ``table``, ``json`` or ``csv``; reject both flags before any work."""
    if json_out and csv_out:
        raise typer.BadParameter("Cannot use --json and --csv together; pick one.")
    return "json" if json_out else "csv" if csv_out else "table"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        return value.item()
    return value


def print_json(data: Any) -> None:
    """Print JSON to stdout (records, an object, or ``[]``)."""
    sys.stdout.write(json.dumps(data, indent=2, default=_jsonable) + "\n")


def print_csv(records: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Print records as CSV with a header row; nested values are JSON-encoded."""
    cols = list(columns or (records[0].keys() if records else []))
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(cols)
    for rec in records:
        row = []
        for c in cols:
            v = rec.get(c)
            row.append(json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v))
        writer.writerow(row)


def print_table(
    rows: Sequence[Sequence[Any]],
    headers: Sequence[str],
    title: str | None = None,
    justify_right: Sequence[bool] | None = None,
) -> None:
    """Print a rich table to stdout."""
    table = Table(title=title, header_style="bold")
    for i, h in enumerate(headers):
        right = justify_right[i] if justify_right else i > 0
        table.add_column(h, justify="right" if right else "left")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console().print(table)


def warn(message: str) -> None:
    """A warning line on stderr."""
    err_console.print(f"[yellow]Warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """An informational line on stderr."""
    err_console.print(message, highlight=False, soft_wrap=True, style="dim")


def progress_enabled(fmt: str = "table", quiet: bool = False) -> bool:
    """Progress bars only for humans: table output, not quiet, stderr a terminal."""
    return fmt == "table" and not quiet and sys.stderr.isatty()


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress | None]:
    """A transient rich progress bar on stderr, or ``None`` when disabled."""
    if not enabled:
        yield None
        return
    prog = Progress(
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
    with prog:
        yield prog


def human(n: float | int | None, unit: str = "") -> str:
    """1234567 -> '1.23M'; bytes with unit='B' use GiB-style binary prefixes."""
    if n is None:
        return "-"
    if unit == "B":
        for suffix, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(n) >= scale:
                return f"{n / scale:.2f} {suffix}"
        return f"{int(n)} B"
    if unit == "FLOP":
        for suffix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(n) >= scale:
                return f"{n / scale:.2f} {suffix}FLOP"
        return f"{n:g} FLOP"
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"
