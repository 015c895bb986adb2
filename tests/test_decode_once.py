"""Decode once: each command resolves the model reference once and reads a trace directory once.

Calls are counted on the functions' code objects (a profile hook), so every binding counts:
a module that imported ``resolve_ref`` by name is seen as well as one that looks it up late.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moescope.checkpoint import ref
from moescope.tracedir import files
from tests.safety import invoke

_COUNTED = {ref.resolve_ref.__code__: "resolve", files.read_trace_dir.__code__: "read"}


def _run(args: list[str]) -> Counter[str]:
    seen: Counter[str] = Counter()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            name = _COUNTED.get(frame.f_code)
            if name is not None:
                seen[name] += 1

    sys.setprofile(profile)
    try:
        result = invoke(args)
    finally:
        sys.setprofile(None)
    assert result.exit_code == 0, result.output
    return seen


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Counter[str]]]:
    out = tmp_path_factory.mktemp("once") / "t"
    yield out, _run(["trace", "demo", "demo", "--max-tokens", "2000", "--out", str(out)])


def test_trace_resolves_once(traced: tuple[Path, Counter[str]]) -> None:
    assert traced[1] == {"resolve": 1}


def test_prune_resolves_once_and_reads_the_trace_once(traced: tuple[Path, Counter[str]]) -> None:
    seen = _run(["prune", "demo", "--trace", str(traced[0]), "--drop", "2", "--dry-run"])
    assert seen == {"resolve": 1, "read": 1}


def test_report_html_reads_the_trace_once(traced: tuple[Path, Counter[str]], tmp_path: Path) -> None:
    seen = _run(["report", str(traced[0]), "--html", str(tmp_path / "r.html")])
    assert seen == {"read": 1}


def test_similarity_and_eval_resolve_once(traced: tuple[Path, Counter[str]], tmp_path: Path) -> None:
    seen = _run(["similarity", "demo", "--trace", str(traced[0]), "--out", str(tmp_path / "s")])
    assert seen == {"resolve": 1, "read": 1}
    assert _run(["eval", "demo", "demo:code", "--max-tokens", "1000"]) == {"resolve": 1}


def test_the_counter_sees_every_call() -> None:
    """The hook counts calls through any binding (the check above could fail)."""
    seen: Counter[str] = Counter()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in _COUNTED:
            seen[_COUNTED[frame.f_code]] += 1

    bound = ref.resolve_ref
    sys.setprofile(profile)
    try:
        bound("demo")
        ref.resolve_ref("demo")
    finally:
        sys.setprofile(None)
    assert seen == {"resolve": 2}
