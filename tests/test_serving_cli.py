"""``moescope offload``, ``fit`` and ``diff`` through the real app: outputs and error lines."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from moescope.cli import fit as fit_cli
from moescope.cli import offload as offload_cli
from moescope.cli.app import app
from moescope.serving import POLICIES
from moescope.serving.fit import PRESETS
from tests.serving_fixtures import demo_trace  # noqa: F401  (fixture)

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _one_error(result) -> None:  # type: ignore[no-untyped-def]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("Error:") and "Traceback" not in result.stderr


def test_offload_json_keys(demo_trace: Path) -> None:  # noqa: F811
    r = runner.invoke(app, ["offload", str(demo_trace), "--cache", "2,4", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    recs = json.loads(r.stdout)
    assert len(recs) == 4 * 4 * 2  # layers x policies x sizes
    assert {"layer", "policy", "cache_experts", "hit_rate", "bytes_per_token"} <= set(recs[0])
    assert all(rec["bytes_per_token"] is not None for rec in recs)
    r = runner.invoke(
        app, ["offload", str(demo_trace), "--all", "--json", "--cache", "2"], catch_exceptions=False
    )
    obj = json.loads(r.stdout)
    assert set(obj) >= {"cache", "coverage", "predictability"}


def test_offload_budget_csv_and_plot(demo_trace: Path, tmp_path: Path) -> None:  # noqa: F811
    # one demo expert is 192 KiB in float32: 4 layers x 2 experts = 1.5 MiB
    plot = tmp_path / "o.png"
    r = runner.invoke(
        app,
        ["offload", str(demo_trace), "--budget", "1.6MiB", "--csv", "--plot", str(plot)],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("layer,policy,cache_experts,hit_rate,bytes_per_token")
    assert {line.split(",")[2] for line in lines[1:]} == {"2"}
    assert plot.read_bytes()[:4] == b"\x89PNG"
    r = runner.invoke(app, ["offload", str(demo_trace), "--cache", "2", "--plot", str(plot)])
    assert r.exit_code == 0  # its own plot is replaced
    r = runner.invoke(app, ["offload", str(demo_trace)], catch_exceptions=False)
    assert r.exit_code == 0 and "belady" in r.stdout and "independent" in r.stdout


def test_offload_errors(demo_trace: Path, tmp_path: Path) -> None:  # noqa: F811
    r = runner.invoke(app, ["offload", str(demo_trace), "--cache", "2", "--budget", "1GiB"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["offload", str(demo_trace), "--policy", "fifo"])
    assert r.exit_code == 2
    (tmp_path / "x.png").write_bytes(b"not ours")
    r = runner.invoke(app, ["offload", str(demo_trace), "--plot", str(tmp_path / "x.png")])
    assert r.exit_code == 1
    _one_error(r)
    r = runner.invoke(app, ["offload", str(tmp_path / "missing")])
    assert r.exit_code == 1
    _one_error(r)


def test_fit_cli(demo_trace: Path) -> None:  # noqa: F811
    mixtral = str(ROOT / "sample_configs/Mixtral-8x7B-v0.1.json")
    mistral = str(ROOT / "sample_configs/Mistral-7B-v0.1.json")
    args = [
        "fit",
        mixtral,
        "--preset",
        "rtx4090",
        "--ram",
        "64GiB",
        "--dtype",
        "fp8",
        "--dense",
        mistral,
        "--json",
    ]
    r = runner.invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert [o["model"] for o in out] == [mixtral, mistral]
    assert out[0]["rows"][0]["fits"] and out[0]["rows"][0]["bound"] == "pcie"
    assert out[0]["hardware"]["ram"] == 64 * 2**30
    r = runner.invoke(
        app,
        ["fit", "demo", "--trace", str(demo_trace), "--gpu-memory", "1MiB", "--ram", "1GiB", "--hbm-bw", "1000GB",
         "--pcie-bw", "32GB", "--flops", "1e14", "--batch", "1,8", "--json"],
        catch_exceptions=False,
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)[0]["rows"]
    assert [row["coverage"] for row in rows] == ["concurrent", "concurrent"]
    r = runner.invoke(app, ["fit", "demo", "--gpu-memory", "1GiB"])
    assert r.exit_code == 2 and "--hbm-bw" in r.stderr
    r = runner.invoke(app, ["fit", "demo", "--preset", "tpu"])
    assert r.exit_code == 2


def test_diff_cli(demo_trace: Path) -> None:  # noqa: F811
    r = runner.invoke(app, ["diff", str(demo_trace), str(demo_trace), "--json"], catch_exceptions=False)
    assert r.exit_code == 0
    assert all(rec["load_shift"] == 0 for rec in json.loads(r.stdout)["layers"])


def test_spelled_out_names_match_the_library() -> None:
    assert offload_cli.POLICIES == POLICIES
    assert fit_cli.PRESETS == tuple(PRESETS)


def test_html_report_has_the_serving_section(demo_trace: Path, tmp_path: Path) -> None:  # noqa: F811
    page = tmp_path / "r.html"
    r = runner.invoke(app, ["report", str(demo_trace), "--html", str(page)], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    html = page.read_text()
    assert 'id="serving"' in html and "belady" in html and "concurrent documents" in html
    assert html.count("<svg") >= 7  # the trace's six figures and the hit-rate curve
