"""The Python API: ``import moescope`` gives one function per command.

Checked here: ``import moescope`` imports nothing heavy; every API name is a plain function
and reaches its target whatever was imported first (no submodule shares an API name, so
nothing the import system binds can shadow one); each result's ``to_dict()`` is what the matching
command prints with ``--json`` (so the CLI and the API run the same function); the loaded
trace's DataFrames equal the CSV files; a dry-run prune keeps the experts an independent
ranking of ``expert_load.csv`` keeps; and the README's "Python API" example runs.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import moescope
from moescope.errors import PruneError
from tests.safety import invoke

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "pandas", "matplotlib")


def _python(code: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a fresh interpreter (repository on the path); its stdout."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=full_env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _roundtrip(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _cli_json(args: list[Any]) -> Any:
    result = invoke([*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- import and names


def test_import_is_cheap() -> None:
    out = _python(
        "import sys, moescope\n"
        "dir(moescope); moescope.API\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    assert out.strip() == "[]"


# Every API name is replaced by a recorder at its target, then called through ``moescope``:
# the call must arrive there, and a name that is also a submodule must be that submodule.
_CHECK = r"""
import importlib, importlib.util, json, sys
import moescope

def check():
    seen = {}
    for name, (mod, attr) in moescope.API.items():
        try:
            target = importlib.import_module(mod)
            original = getattr(target, attr)
        except (ImportError, AttributeError):
            seen[name] = "missing"
            continue
        if importlib.util.find_spec(f"moescope.{name}") is not None:
            assert getattr(moescope, name) is sys.modules[f"moescope.{name}"], name
        setattr(target, attr, lambda *a, **k: (name, a, k))
        try:
            got = getattr(moescope, name)(1, x=2)
        finally:
            setattr(target, attr, original)
        assert got == (name, (1,), {"x": 2}), (name, got)
        seen[name] = type(getattr(moescope, name)).__name__
    return seen

first = check()
for name in moescope.API:  # now import every submodule, and check again
    if importlib.util.find_spec(f"moescope.{name}") is not None:
        importlib.import_module(f"moescope.{name}")
assert check() == first
print(json.dumps(first))
"""

_ORDERS = {
    "nothing first": "",
    "submodules first": "import moescope.accounting.params, moescope.tracing, moescope.redundancy.run, moescope.pruning, moescope.evaluation.perplexity",
    "from-imports of submodule contents": (
        "from moescope.pruning import api\nfrom moescope.tracing import run_trace\n"
        "import moescope.tracing.routes\nfrom moescope.redundancy.run import similarity"
    ),
    "from moescope import names": (
        "from moescope import params, trace, similarity, prune, evaluate, load_trace, report\n"
        "assert all(map(callable, (params, trace, similarity, prune, evaluate, load_trace, report)))"
    ),
    "the CLI ran": (
        "from typer.testing import CliRunner\nfrom moescope.cli.app import app\n"
        "r = CliRunner().invoke(app, ['params', 'demo', '--json'])\nassert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(app, ['report', '/nonexistent/trace'])\nassert r.exit_code == 1, r.output"
    ),
    "moescope.api first": "import moescope.api",
    "reloaded": (
        "import importlib, moescope, moescope.redundancy.run\nimportlib.reload(moescope)\n"
        "import moescope.accounting.params\nimportlib.reload(moescope.accounting.params)"
    ),
}


@pytest.mark.parametrize("prelude", list(_ORDERS.values()), ids=list(_ORDERS))
def test_names_callable_in_any_import_order(prelude: str) -> None:
    seen = json.loads(_python(prelude + "\n" + _CHECK).strip().splitlines()[-1])
    assert set(seen) == set(moescope.API)
    assert all(kind == "function" for kind in seen.values()), seen


def test_every_api_name_is_a_function() -> None:
    for name in moescope.API:
        assert inspect.isfunction(getattr(moescope, name)), name
        assert importlib.util.find_spec(f"moescope.{name}") is None, f"a submodule shadows moescope.{name}"
    assert moescope.params is moescope.api_function("params")
    assert "save_routes" in inspect.signature(moescope.trace).parameters  # notebook help / completion
    assert set(moescope.API) <= set(dir(moescope))
    with pytest.raises(AttributeError, match="no attribute"):
        moescope.not_an_api_name  # noqa: B018


@pytest.mark.parametrize("name", ["import_routes", "sweep"])
def test_functions_of_other_commands(name: str) -> None:
    try:
        fn = moescope.api_function(name)
    except AttributeError:
        pytest.skip(f"{moescope.API[name][0]} does not exist yet")
    assert callable(fn) and callable(getattr(moescope, name))


def test_corpus_may_be_one_string(monkeypatch: pytest.MonkeyPatch) -> None:
    """``evaluate`` and ``sweep`` take ``"demo"`` as one spec, not the specs d, e, m, o."""
    import moescope.evaluation.perplexity

    calls: list[Any] = []
    monkeypatch.setattr(
        moescope.evaluation.perplexity, "evaluate", lambda model, corpus, **kw: calls.append(corpus)
    )
    moescope.evaluate("demo", "demo")
    moescope.evaluate("demo", ("demo:code", "demo:prose"))
    assert calls == [["demo"], ["demo:code", "demo:prose"]]
    try:
        import moescope.evaluation.sweep
    except ImportError:
        return
    monkeypatch.setattr(moescope.evaluation.sweep, "sweep", lambda model, corpus, **kw: calls.append(corpus))
    moescope.sweep("demo", "demo", top_k="1,2")
    assert calls[-1] == ["demo"]


# --------------------------------------------------------------------------- results = CLI --json


def test_params_is_what_the_cli_prints() -> None:
    report = moescope.params("demo")
    assert _roundtrip(report.to_dict()) == _cli_json(["params", "demo"])[0]
    assert report.total_params > report.active_params > 0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("api") / "trace"
    return moescope.trace("demo", "demo", out, max_tokens=2000, seq_len=64, plots=False)


def test_trace_result_and_loaded_tables(run: Any) -> None:
    summary = json.loads((run.out_dir / "summary.json").read_text())
    summary.pop("owned_files")  # added by the output layer when the directory is swapped in
    assert _roundtrip(run.to_dict())["summary"] == _roundtrip(summary)
    assert run.tokens == summary["tokens"] == 2000
    t = moescope.load_trace(run.out_dir)
    assert t.to_dict()["tokens"] == run.tokens and t.to_dict()["path"] == str(run.out_dir)
    for frame, name in (
        (t.expert_load, "expert_load.csv"),
        (t.coactivation, "coactivation.csv"),
        (t.domain_load, "domain_load.csv"),
        (t.capacity, "capacity.csv"),
    ):
        pd.testing.assert_frame_equal(frame, pd.read_csv(run.out_dir / name), check_dtype=False)
    # every token picks top_k experts at every layer
    per_layer = t.expert_load.groupby("layer")["count"].sum()
    assert (per_layer == run.tokens * run.top_k).all() and len(per_layer) == len(run.layers)
    assert run.load().summary == t.summary


def test_report_is_what_the_cli_prints(run: Any) -> None:
    rep = moescope.report(run.out_dir)
    assert isinstance(rep.layers, pd.DataFrame) and list(rep.layers["layer"]) == run.layers
    assert _roundtrip(rep.to_dict()) == _cli_json(["report", run.out_dir])
    assert _roundtrip(moescope.load_trace(run.out_dir).report().to_dict()) == _roundtrip(rep.to_dict())


def test_prune_dry_run(run: Any) -> None:
    plan = moescope.prune("demo", run.out_dir, drop=2, criterion="frequency", dry_run=True)
    assert plan.result is None
    assert _roundtrip(plan.to_dict()) == _cli_json(
        ["prune", "demo", "--trace", run.out_dir, "--drop", "2", "--criterion", "frequency", "--dry-run"]
    )
    # independent: the most-routed experts of expert_load.csv (ties: lower id), per layer
    load = pd.read_csv(run.out_dir / "expert_load.csv")
    for layer, rows in load.groupby("layer"):
        ranked = rows.sort_values(["count", "expert"], ascending=[False, True])["expert"].tolist()
        assert plan.kept[layer] == sorted(ranked[: len(ranked) - 2])
    table = plan.table
    assert (table.groupby("layer")["action"].apply(lambda a: (a == "drop").sum()) == 2).all()
    with pytest.raises(PruneError, match="out=DIR"):
        moescope.prune("demo", run.out_dir, drop=2)


def test_similarity_is_what_the_cli_prints(run: Any) -> None:
    sim = moescope.similarity("demo", trace=run.out_dir, outputs=False)
    got = _roundtrip(sim.to_dict())
    e = run.num_experts
    assert len(got["pairs"]) == len(run.layers) * e * (e - 1) // 2
    assert {"weights", "router", "coactivation"} <= set(got["measures"]) and "outputs" not in got["measures"]
    assert got["pairs"] == _cli_json(["similarity", "demo", "--trace", run.out_dir, "--no-outputs"])


def test_evaluate_is_what_the_cli_prints() -> None:
    result = moescope.evaluate("demo", "demo", max_tokens=300, seq_len=64, stride=32)
    assert result.corpus == ["demo"] and result.tokens == 300
    cli = _cli_json(["eval", "demo", "demo", "--max-tokens", "300", "--seq-len", "64", "--stride", "32"])
    assert _roundtrip(result.to_dict()) == cli


# --------------------------------------------------------------------------- the README example


def _readme_example() -> str:
    """The ```python block under the README's "## Python API" heading."""
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Python API\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    block = section and re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert block, "README.md has no ```python block under '## Python API'"
    return block.group(1)


@pytest.mark.slow
def test_readme_example_runs(tmp_path: Path) -> None:
    code = _readme_example()
    assert "moescope.load_trace(" in code and "moescope.report(" in code
    out = _python(code, cwd=tmp_path, env={"TMPDIR": str(tmp_path), "MPLBACKEND": "Agg"})
    assert "4000 tokens traced" in out
