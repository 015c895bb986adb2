"""The params command end to end, and its errors for bad input (one line, exit 1, no traceback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moescope.cli.app import app
from tests.tiny import tiny_model

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("mixtral")
    tiny_model("mixtral").save_pretrained(d)
    return d


def _error(args: list[str], code: int = 1) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    if code == 1:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
        return lines[0]
    return result.stderr


def test_json_records(ckpt: Path) -> None:
    cfg = ROOT / "sample_configs" / "Mistral-7B-v0.1.json"
    result = runner.invoke(app, ["params", str(ckpt), str(cfg), "--json"], catch_exceptions=False)
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert [d["is_moe"] for d in data] == [True, False]
    for key in (
        "model",
        "model_type",
        "total_params",
        "active_params",
        "active_params_no_embedding",
        "flops_per_token",
        "num_experts",
        "top_k",
        "num_shared_experts",
        "moe_layers",
        "activation_ratio",
        "components",
        "weight_bytes",
        "source",
    ):
        assert key in data[0]
    assert data[0]["source"] == "safetensors" and data[1]["source"] == "config"
    assert data[1]["total_params"] == 7241732096


def test_csv_and_table(ckpt: Path) -> None:
    result = runner.invoke(app, ["params", str(ckpt), "--csv"], catch_exceptions=False)
    assert result.exit_code == 0
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 1 and int(rows[0]["total_params"]) > int(rows[0]["active_params"])
    table = runner.invoke(app, ["params", str(ckpt)], catch_exceptions=False)
    assert table.exit_code == 0 and "total params" in table.stdout and "k/N" in table.stdout


def test_per_layer_sums_to_total(ckpt: Path) -> None:
    result = runner.invoke(app, ["params", str(ckpt), "--per-layer", "--json"], catch_exceptions=False)
    rows = json.loads(result.stdout)
    total = json.loads(runner.invoke(app, ["params", str(ckpt), "--json"]).stdout)[0]
    assert sum(r["params"] for r in rows) == total["total_params"]
    assert sum(r["active_params"] for r in rows) == total["active_params"]
    assert {r["kind"] for r in rows if r["layer"] is not None} == {"moe"}


def test_nonexistent_path() -> None:
    line = _error(["params", "./no/such/dir"])
    assert "no such file or directory" in line


def test_dir_without_config_or_weights(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    line = _error(["params", str(tmp_path)])
    assert "no config.json" in line and "hub id" in line


def test_truncated_safetensors(ckpt: Path, tmp_path: Path) -> None:
    shutil.copy(ckpt / "config.json", tmp_path / "config.json")
    data = (ckpt / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = _error(["params", str(tmp_path)])
    assert "truncated" in line


def test_header_length_larger_than_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    line = _error(["params", str(tmp_path / "model.safetensors")])
    assert "larger than the file" in line


def test_tiny_file(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"abc")
    assert "too short" in _error(["params", str(tmp_path / "x.safetensors")])


def test_malformed_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "mixtral",')
    line = _error(["params", str(tmp_path / "config.json")])
    assert "malformed JSON" in line and "config.json" in line


def test_config_contradicts_tensors(ckpt: Path, tmp_path: Path) -> None:
    shutil.copy(ckpt / "model.safetensors", tmp_path / "model.safetensors")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_local_experts"] = 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    line = _error(["params", str(tmp_path)])
    assert "8 experts" in line and "stores 4" in line


def test_top_k_above_experts(tmp_path: Path) -> None:
    cfg = json.loads((ROOT / "sample_configs" / "Mixtral-8x7B-v0.1.json").read_text())
    cfg["num_experts_per_tok"] = 9
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert "only 8" in _error(["params", str(tmp_path / "c.json")])


def test_json_and_csv_conflict(ckpt: Path) -> None:
    err = _error(["params", str(ckpt), "--json", "--csv"], code=2)
    assert "--json" in err


def test_console_script_exit_codes(tmp_path: Path) -> None:
    """The real process: exit 1, one stderr line, no traceback."""
    r = subprocess.run(
        [sys.executable, "-m", "moescope", "params", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert r.stderr.strip().startswith("Error:") and "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "moescope", "params", "--bogus"], capture_output=True, text=True
    )
    assert r.returncode == 2


def test_accounting_does_not_import_torch(ckpt: Path) -> None:
    code = (
        "import sys; from moescope.accounting.params import count_params; "
        f"r = count_params({str(ckpt)!r}); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; print(r.total_params)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_params_cli_imports_nothing_heavy(ckpt: Path) -> None:
    """A local ``moescope params`` reads headers with the standard library: no torch,
    transformers, pandas, numpy, matplotlib or huggingface_hub (they cost seconds to import)."""
    heavy = ("torch", "transformers", "pandas", "numpy", "matplotlib", "pyarrow", "huggingface_hub")
    code = (
        "import sys; from moescope.cli.app import main; sys.argv = ['moescope', 'params', sys.argv[1], '--json']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"loaded = [m for m in {heavy!r} if m in sys.modules]\n"
        "assert not loaded, loaded"
    )
    r = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["total_params"] > 0
