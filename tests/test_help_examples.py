"""Every example shown in a command's ``--help`` runs.

Examples are read from each command module's ``EXAMPLES`` epilog (the lines that start with
``moescope``) and run in order, in one scratch directory, through bash (globs, ``&&`` and
redirections work as a user would type them). The placeholders they use are provided:
``org/name`` is the demo model in a populated HF cache (offline), the published hub ids
are their configs in the cache, ``notes.jsonl``, ``corpus/``, ``./checkpoint``,
``pruned/`` and the shard traces exist. Pipes to tools that may not be installed (``jq``)
are dropped. Each example must exit 0, except the ones that cannot work on this machine,
which must fail cleanly: ``--device cuda`` without CUDA (usage error, exit 2) and
``download`` of what the cache lacks with no network (an ``Error:`` line, exit 1).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moescope.demo import demo_model_dir

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["params", "download", "trace", "report", "merge", "similarity", "prune", "eval", "sweep"]
#: commands whose examples need input files of their own; their test module runs the examples
#: (``import``: tests/test_import_routes.py::test_help_examples_run, with a dump, responses, Parquet, npy)
#: (``offload``, ``fit``, ``diff``: need a routes trace or two; tests/test_serving_cli.py runs them)
RUN_ELSEWHERE = ["import", "offload", "fit", "diff"]
MODULES = {"import": "import_"}


def examples(command: str) -> list[str]:
    """The runnable example lines of ``moescope COMMAND --help``."""
    module = importlib.import_module(f"moescope.cli.{MODULES.get(command, command)}")
    lines = []
    for raw in module.EXAMPLES.splitlines():
        line = raw.strip()
        if not line.startswith(("moescope ", "HF_HUB_OFFLINE=1 moescope ")):
            continue
        line = re.split(r"\s{2,}(?:#|\()", line)[0]  # trailing comment or explanation
        line = re.sub(r"\s*\|\s*jq\b.*$", "", line)
        lines.append(line)
    return lines


def _cache_repo(cache: Path, repo: str, files: dict[str, Path]) -> None:
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copyfile(src, snap / name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    work = tmp_path_factory.mktemp("examples")
    demo = demo_model_dir("demo")
    assert demo is not None
    cache = work / ".hf" / "hub"
    _cache_repo(cache, "org/name", {p.name: p for p in demo.iterdir() if p.is_file()})
    _cache_repo(
        cache,
        "mistralai/Mixtral-8x7B-v0.1",
        {"config.json": ROOT / "sample_configs" / "Mixtral-8x7B-v0.1.json"},
    )
    _cache_repo(cache, "Qwen/Qwen3-30B-A3B", {"config.json": ROOT / "sample_configs" / "Qwen3-30B-A3B.json"})
    shutil.copytree(demo, work / "checkpoint")
    (work / "sample_configs").symlink_to(ROOT / "sample_configs")
    docs = [
        {"text": f"note {i}: the experts route tokens " * 20, "domain": d} for i, d in enumerate("ab" * 10)
    ]
    (work / "notes.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (work / "corpus").mkdir()
    (work / "corpus" / "one.txt").write_text("def f(x):\n    return x * 2\n" * 200)
    bin_dir = work / ".bin"
    bin_dir.mkdir()
    (bin_dir / "moescope").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m moescope "$@"\n')
    (bin_dir / "moescope").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HF_HOME": str(work / ".hf"),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "100",
    }
    run = lambda cmd: subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True)  # noqa: E731
    for i in range(4):  # the shards `moescope merge traces/s0 … traces/s3` names, as trace's example makes s0
        res = run(f"moescope trace org/name corpus/ --shard {i}/4 --out traces/s{i} -q")
        assert res.returncode == 0, res.stderr
    res = run("moescope trace demo demo --max-tokens 4000 --no-plots --out t0 -q && "
              "moescope prune demo --trace t0 --drop 2 --out pruned -q")  # fmt: skip
    assert res.returncode == 0, res.stderr
    return work, env


def _expected_failure(line: str) -> tuple[int, str] | None:
    import torch

    if "--device cuda" in line and not torch.cuda.is_available():
        return 2, "no CUDA"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_help_examples_run(command: str, scratch: tuple[Path, dict[str, str]]) -> None:
    work, env = scratch
    lines = examples(command)
    assert lines, f"moescope {command} --help shows no example"
    for line in lines:
        res = subprocess.run(
            ["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        expected = _expected_failure(line)
        if line.startswith("moescope download ") and res.returncode == 1:
            expected = (1, "Error: ")  # no network: a clean error (a cached repo succeeds)
        if expected is None:
            assert res.returncode == 0, (line, res.stderr[-2000:])
        else:
            code, text = expected
            assert res.returncode == code, (line, res.returncode, res.stderr[-2000:])
            assert text in res.stderr, (line, res.stderr[-2000:])
        assert "Traceback" not in res.stderr, (line, res.stderr[-2000:])


def test_every_command_has_examples() -> None:
    from moescope.cli.app import app

    registered = {c.name for c in app.registered_commands}
    assert registered == set(COMMANDS) | set(RUN_ELSEWHERE), "list a new command in COMMANDS"
    for command in registered:
        assert examples(command), command
