"""Shared assertions for the safety suites: one clean error, no traceback, nothing changed.

Every safety case runs a real CLI command through ``CliRunner`` and checks, besides the
exit code and the single ``Error:`` line, that every file it was pointed at (inputs and
whatever already stood beside the output) is byte-identical afterwards (sha256).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from moescope.cli.app import app

runner = CliRunner()


def snapshot(*roots: str | Path) -> dict[str, str]:
    """sha256 of every regular file under ``roots`` (files or directories), by path.

    Symlinks are recorded by their target text, not followed, so a case that plants a link
    to a secret can check the secret and the link separately.
    """
    digests: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        paths: Iterable[Path]
        if root.is_symlink() or root.is_file():
            paths = [root]
        elif root.is_dir():
            paths = sorted(p for p in root.rglob("*"))
        else:
            continue
        for p in paths:
            if p.is_symlink():
                digests[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                digests[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                digests[str(p)] = "dir"
    return digests


def invoke(args: list[str], **kwargs: Any) -> Any:
    """Run ``moescope ARGS`` in-process (stdout and stderr kept apart)."""
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def assert_clean_error(result: Any, code: int = 1, contains: str | None = None) -> str:
    """Exit ``code``, no traceback anywhere, and (for exit 1) exactly one ``Error:`` line on stderr.

    Returns the error line (exit 1) or the whole stderr (exit 2, click's usage message).
    """
    text = (result.stdout or "") + (result.stderr or "")
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert "Traceback" not in text, text
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}")
    if code == 1:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("Error: ")]
        assert len(errors) == 1, result.stderr
        line = errors[0]
    else:
        line = result.stderr
    if contains is not None:
        assert contains.lower() in line.lower(), line
    return line
