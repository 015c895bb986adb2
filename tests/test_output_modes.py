"""The one CLI output layer (``moescope.cli._output.Output``) and its flags on every command.

Unit tests of the modes (table / json / csv / quiet, stdout vs stderr), then every command:
``-q`` everywhere, ``--json`` and ``--csv`` on every command that prints a table and exit 2
when both are given, and real runs whose stdout must parse whole (data only).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from moescope.cli._output import Output, check_format, human
from moescope.cli.app import app
from moescope.tracedir.state import TraceState
from moescope.tracing.write import write_trace_dir

runner = CliRunner()

COMMANDS = sorted(c.name or "" for c in app.registered_commands)
#: commands that print a table, so take --json and --csv (download prints one path)
TABULAR = [c for c in COMMANDS if c != "download"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


# ----------------------------------------------------------------------------- the modes


def _records() -> list[dict[str, Any]]:
    return [
        {"layer": 0, "name": "a", "value": 1.5, "ids": [1, 2], "missing": None},
        {"layer": 1, "name": "b", "value": float("nan"), "ids": [], "missing": None},
    ]


def test_json_mode(capsys: pytest.CaptureFixture[str]) -> None:
    out = Output("json")
    out.records(_records(), ["layer"])  # JSON keeps every key, whatever the columns
    out.json({"n": np.int64(3), "arr": np.arange(2), "x": float("inf"), "nested": {"y": float("nan")}})
    out.records([])
    first, second, empty = _json_documents(capsys.readouterr().out)
    assert first[0] == {"layer": 0, "name": "a", "value": 1.5, "ids": [1, 2], "missing": None}
    assert first[1]["value"] is None  # NaN is not JSON: null
    assert second == {"n": 3, "arr": [0, 1], "x": None, "nested": {"y": None}}
    assert empty == []


def _json_documents(text: str) -> list[Any]:
    decoder, docs, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        doc, end = decoder.raw_decode(text, pos)
        docs.append(doc)
        pos = end + 1
    return docs


def test_csv_mode(capsys: pytest.CaptureFixture[str]) -> None:
    out = Output("csv")
    out.records(_records(), ["layer", "ids", "value", "missing"])
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows == [["layer", "ids", "value", "missing"], ["0", "[1, 2]", "1.5", ""], ["1", "[]", "", ""]]
    out.csv([], ["a", "b"])
    assert capsys.readouterr().out == "a,b\n"  # a header even without rows


def test_table_mode(capsys: pytest.CaptureFixture[str]) -> None:
    out = Output()
    out.table([[0, "x"]], ["layer", "name"], title="Title")
    out.records(_records(), ["layer", "missing"])
    text = capsys.readouterr().out
    assert "Title" in text and "layer" in text and "name" in text
    assert "-" in text  # None shown as '-'


@pytest.mark.parametrize(
    ("fmt", "quiet", "note", "info"),
    [
        ("table", False, True, True),
        ("json", False, False, True),
        ("csv", False, False, True),
        ("table", True, False, False),
        ("json", True, False, False),
    ],
)
def test_stderr_kinds(
    fmt: str, quiet: bool, note: bool, info: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    out = Output(fmt, quiet)
    out.note("a hint")
    out.info("the status")
    out.warn("a warning")
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout is data only
    assert ("a hint" in captured.err) is note
    assert ("the status" in captured.err) is info
    assert "Warning: a warning" in captured.err  # warnings show in every mode, --quiet included


@pytest.mark.parametrize(("fmt", "quiet", "tty", "enabled"), [
    ("table", False, True, True),
    ("table", False, False, False),  # stderr not a terminal
    ("table", True, True, False),
    ("json", False, True, False),
    ("csv", False, True, False),
])  # fmt: skip
def test_progress_only_for_people(
    fmt: str, quiet: bool, tty: bool, enabled: bool, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    out = Output(fmt, quiet)
    assert out.progress_enabled is enabled
    with out.progress("working", total=4) as update:
        for i in range(5):
            update(i, total=4, info=f"{i}")
    assert capsys.readouterr().out == ""  # a bar never writes to stdout


def test_flags() -> None:
    assert Output.from_flags(json_out=True).fmt == "json"
    assert Output.from_flags(csv_out=True, quiet=True) == Output("csv", True)
    assert not Output().machine and Output("csv").machine
    with pytest.raises(typer.BadParameter, match="--json and --csv"):
        Output.from_flags(json_out=True, csv_out=True)
    with pytest.raises(typer.BadParameter):
        check_format(True, True)
    with pytest.raises(ValueError, match="unknown output format"):
        Output("yaml")
    assert human(1_234_567) == "1.23M" and human(3 * 2**30, "B") == "3.00 GiB" and human(None) == "-"
    assert human(2e12, "FLOP") == "2.00 TFLOP" and math.isfinite(1.0)


# ----------------------------------------------------------------------------- every command

#: minimal arguments that parse; the format check runs before any file is read
_ARGS: dict[str, list[str]] = {
    "params": ["demo"],
    "download": ["org/name"],
    "trace": ["demo", "demo", "--out", "{w}/t"],
    "report": ["{w}/t"],
    "merge": ["{w}/a", "{w}/b", "--out", "{w}/m"],
    "similarity": ["demo", "--out", "{w}/s"],
    "prune": ["demo", "--trace", "{w}/t", "--drop", "1"],
    "eval": ["demo", "demo"],
    "sweep": ["demo", "demo"],
    "import": ["ids", "{w}/routes.npy", "--model", "demo", "--out", "{w}/i"],
    "offload": ["{w}/t"],
    "fit": ["demo", "--preset", "rtx4090"],
    "diff": ["{w}/a", "{w}/b"],
}


def _args(command: str, work: Path) -> list[str]:
    return [command, *(a.replace("{w}", str(work)) for a in _ARGS[command])]


def test_every_command_is_covered() -> None:
    assert set(_ARGS) == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_quiet(command: str) -> None:
    res = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert res.exit_code == 0
    assert "--quiet" in res.stdout and "-q" in res.stdout


@pytest.mark.parametrize("command", TABULAR)
def test_tabular_commands_take_json_and_csv(command: str) -> None:
    res = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert "--json" in res.stdout and "--csv" in res.stdout
    assert "Output:" in res.stdout  # the shapes are documented in the help


@pytest.mark.parametrize("command", TABULAR)
def test_json_and_csv_conflict_is_a_usage_error(command: str, tmp_path: Path) -> None:
    res = runner.invoke(app, [*_args(command, tmp_path), "--json", "--csv", "-q"])
    assert res.exit_code == 2, (res.stdout, res.stderr)
    assert "--json and --csv" in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing was written: checked before any work


# ----------------------------------------------------------------------------- real runs: stdout parses whole


def _state(shard: int | None = None, layers: tuple[int, ...] = (0, 1), experts: int = 4) -> TraceState:
    meta: dict[str, Any] = {"model": "demo"}
    if shard is not None:
        meta["shard"] = {"index": shard, "count": 2}
        meta["run_id"] = f"run-{shard}"
    s = TraceState(list(layers), experts, 2, meta=meta)
    s.tokens = 40
    s.counts[:] = np.arange(1, experts + 1) * 4
    s.set_floats("weight", s.counts * 0.5)
    s.set_floats("out_norm", s.counts * 2.0)
    s.set_floats("wout_norm", s.counts * 1.0)
    return s


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trace shaped like the demo model (4 MoE layers of 8 experts) and two shards."""
    from moescope.accounting.params import count_params

    demo = count_params("demo")
    root = tmp_path_factory.mktemp("traces")
    paths = {"demo": root / "demo", "s0": root / "s0", "s1": root / "s1"}
    write_trace_dir(paths["demo"], _state(layers=tuple(demo.moe_layers), experts=demo.num_experts), timings={},
                    plots=False)  # fmt: skip
    for i in (0, 1):
        write_trace_dir(paths[f"s{i}"], _state(shard=i), timings={}, plots=False)
    return paths


def _run(args: list[Any]) -> Any:
    res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    return res


def _cases(traces: dict[str, Path], work: Path) -> dict[str, list[Any]]:
    return {
        "params": ["params", "demo", "demo-dense"],
        "report": ["report", str(traces["demo"])],
        "merge": ["merge", str(traces["s0"]), str(traces["s1"]), "--out", str(work / "m"), "--no-plots"],
        "prune": ["prune", "demo", "--trace", str(traces["demo"]), "--drop", "2", "--dry-run"],
    }


@pytest.mark.parametrize("command", ["params", "report", "merge", "prune"])
@pytest.mark.parametrize("fmt", ["--json", "--csv", "table", "-q"])
def test_stdout_is_data_only(command: str, fmt: str, traces: dict[str, Path], tmp_path: Path) -> None:
    args = _cases(traces, tmp_path)[command]
    res = _run([*args, *([] if fmt == "table" else [fmt])])
    if fmt == "--json":
        json.loads(res.stdout)  # the whole of stdout is one JSON document
    elif fmt == "--csv":
        rows = list(csv.reader(io.StringIO(res.stdout)))
        assert len(rows) >= 2 and all(len(r) == len(rows[0]) for r in rows)
    else:
        assert res.stdout.strip()  # a table
    if fmt != "table":
        assert "next:" not in res.stderr and "--json prints" not in res.stderr  # hints off


def test_report_csv_is_the_layers_table(traces: dict[str, Path]) -> None:
    data = json.loads(_run(["report", traces["demo"], "--json"]).stdout)
    rows = list(csv.DictReader(io.StringIO(_run(["report", traces["demo"], "--csv"]).stdout)))
    assert [int(r["layer"]) for r in rows] == [r["layer"] for r in data["layers"]]
    assert list(rows[0]) == list(data["layers"][0])
    assert float(rows[0]["imbalance_max_mean"]) == pytest.approx(data["layers"][0]["imbalance_max_mean"])


def test_merge_csv_is_the_summary_layers(traces: dict[str, Path], tmp_path: Path) -> None:
    merged = json.loads(_run(_cases(traces, tmp_path)["merge"] + ["--json"]).stdout)
    rows = list(csv.DictReader(io.StringIO(_run(_cases(traces, tmp_path / "b")["merge"] + ["--csv"]).stdout)))
    assert [int(r["layer"]) for r in rows] == [r["layer"] for r in merged["layers"]]
    assert json.loads(rows[0]["dead_experts"]) == merged["layers"][0]["dead_experts"]


def test_prune_json_has_one_shape(traces: dict[str, Path], tmp_path: Path) -> None:
    args = ["prune", "demo", "--trace", traces["demo"], "--drop", "2", "--criterion", "frequency"]
    dry = json.loads(_run([*args, "--dry-run", "--json"]).stdout)
    assert dry["dry_run"] is True and dry["verified"] is None and len(dry["plan"]) == 4 * 8
    csv_rows = list(csv.DictReader(io.StringIO(_run([*args, "--dry-run", "--csv"]).stdout)))
    assert [(int(r["layer"]), int(r["expert"])) for r in csv_rows] == [
        (r["layer"], r["expert"]) for r in dry["plan"]
    ]
    wrote = json.loads(_run([*args, "--out", tmp_path / "p", "--no-verify", "--json"]).stdout)
    assert set(wrote) == set(dry) and wrote["dry_run"] is False and wrote["plan"] == dry["plan"]


@pytest.mark.slow
def test_eval_and_trace_machine_output(tmp_path: Path) -> None:
    """The model-running commands: --csv parses whole; the execution status stays on stderr."""
    res = _run(["eval", "demo", "demo:code", "--max-tokens", "64", "--seq-len", "32", "--csv"])
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["domain"] for r in rows] == ["all", "code"] and float(rows[0]["perplexity"]) > 1
    assert "loading the model" in res.stderr  # info: shown with --csv, off with -q
    res = _run(["trace", "demo", "demo:code", "--max-tokens", "64", "--seq-len", "32", "--out", tmp_path / "t",
                "--no-plots", "--csv", "-q"])  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [int(r["layer"]) for r in rows] == [0, 1, 2, 3] and res.stderr == ""


def test_download_quiet_keeps_warnings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import moescope.checkpoint.download as dl

    monkeypatch.setattr(dl, "download", lambda *a, **k: tmp_path)
    res = runner.invoke(app, ["download", "org/name", "--include", "*.bin", "-q"], catch_exceptions=False)
    assert res.exit_code == 0 and res.stdout.strip() == str(tmp_path)
    assert "Warning:" in res.stderr


@pytest.mark.parametrize(
    "args", [["--help"], [], ["--no-such-option"]], ids=["help", "no-args", "bad-option"]
)
def test_a_run_builds_its_command_alone_with_the_same_face(args: list[str]) -> None:
    """``main`` builds an app holding only the command it runs: help, usage errors and exit
    codes are the whole app's, for every command."""
    from moescope.cli.app import COMMANDS, app, build_app

    runner = CliRunner()
    for name in COMMANDS:
        whole = runner.invoke(app, [name, *args], prog_name="moescope")
        alone = runner.invoke(build_app(name), [name, *args], prog_name="moescope")
        assert (alone.exit_code, alone.output) == (whole.exit_code, whole.output), name
        assert whole.output.strip(), name
