"""Regressions found by a hostile-user review of import, sweep, report --html, prune --method merge, the API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.safety import assert_clean_error, invoke

_DEMO = Path(__file__).resolve().parents[1] / "moescope" / "demo"


def _ids(path: Path, tokens: int = 300) -> np.ndarray:
    """Distinct random top-2 expert ids for the demo's 4 MoE layers of 8 experts, saved as .npy."""
    rng = np.random.default_rng(0)
    ids = np.argsort(rng.random((tokens, 4, 8)), axis=-1)[..., :2]
    np.save(path, ids)
    return ids


def _imported_trace(tmp_path: Path) -> Path:
    """A trace directory imported from :func:`_ids` (``tmp_path/t``)."""
    _ids(tmp_path / "ids.npy")
    trace = tmp_path / "t"
    args = ["import", "ids", tmp_path / "ids.npy", "--model", "demo", "--out", trace, "--no-plots", "-q"]
    assert invoke(args).exit_code == 0
    return trace


def test_import_routes_takes_one_path_as_str_or_path(tmp_path: Path) -> None:
    import moescope

    ids = _ids(tmp_path / "ids.npy")
    expected = np.bincount(ids[:, 0].ravel(), minlength=8)
    for i, one in enumerate([str(tmp_path / "ids.npy"), tmp_path / "ids.npy"]):
        res = moescope.import_routes("ids", one, model="demo", out=tmp_path / f"o{i}", plots=False)
        assert res.tokens == len(ids)
        load = moescope.load_trace(tmp_path / f"o{i}").expert_load
        got = load[load["layer"] == 0].sort_values("expert")["count"].to_numpy()
        assert (got == expected).all()


@pytest.mark.slow
def test_unknown_merge_by_is_a_usage_error(tmp_path: Path) -> None:
    trace = _imported_trace(tmp_path)
    args = ["prune", "demo", "--trace", trace, "--drop", "2", "--criterion", "frequency", "--method", "merge"]
    assert_clean_error(invoke([*args, "--merge-by", "bogus", "--dry-run"]), code=2, contains="--merge-by")
    line = assert_clean_error(invoke([*args, "--similarity", tmp_path / "nowhere", "--dry-run"]))
    assert "no similarity.json" in line and "Errno" not in line


def test_sglang_response_bad_bytes_and_deep_json_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"meta_info": {"routed_experts": ""}}\n')
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"a": 1}\n\xff\xfe{"a": 1}\n')
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    base = ["import", "sglang-response", "--model", "demo", "--out", tmp_path / "o", "-q"]
    line = assert_clean_error(invoke([*base[:2], good, latin, *base[2:]]))
    assert "latin.jsonl" in line and "UTF-8" in line
    line = assert_clean_error(invoke([*base[:2], deep, *base[2:]]))
    assert "deep.jsonl:1" in line and "malformed JSON" in line
    assert not (tmp_path / "o").exists()


def test_html_under_a_file_is_refused_cleanly(tmp_path: Path) -> None:
    trace = _imported_trace(tmp_path)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    line = assert_clean_error(invoke(["report", trace, "--html", blocker / "r.html", "-q"]))
    assert "notes.txt is a file, not a directory" in line
    assert blocker.read_text() == "mine"


def test_html_refuses_a_manifest_whose_layers_are_not_plans(tmp_path: Path) -> None:
    trace = _imported_trace(tmp_path)
    bad = tmp_path / "prune_manifest.json"
    for layers in ('{"0": "zz"}', '{"x": {}}'):
        bad.write_text(f'{{"tool": "moescope", "kind": "prune", "complete": true, "layers": {layers}}}')
        args = ["report", trace, "--html", tmp_path / "r.html", "--prune-manifest", bad, "-q"]
        assert_clean_error(invoke(args), contains="no per-layer plan")
    assert not (tmp_path / "r.html").exists()


def test_merge_by_weight_with_a_similarity_report_is_refused(tmp_path: Path) -> None:
    trace = _imported_trace(tmp_path)
    args = ["prune", "demo", "--trace", trace, "--drop", "2", "--criterion", "frequency", "--method", "merge"]
    line = assert_clean_error(
        invoke([*args, "--merge-by", "weight", "--similarity", tmp_path, "--dry-run"]), code=2
    )
    assert "--merge-by weight does not read --similarity" in line


def test_ids_weight_column_must_hold_finite_gate_weights(tmp_path: Path) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = _ids(tmp_path / "ids.npy", tokens=20)
    t, layer, _slot = np.meshgrid(np.arange(20), np.arange(4), np.arange(2), indexing="ij")
    base = {"layer": layer.ravel(), "token": t.ravel(), "expert": ids.reshape(-1)}
    n = len(base["token"])
    cases = {
        "str": pa.array(["x"] * n),
        "inf": pa.array(np.full(n, np.inf)),
        "nan": pa.array(np.full(n, np.nan), from_pandas=False),  # NaN, not null
        "neg": pa.array(np.full(n, -0.5)),
    }
    for name, weight in cases.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({**base, "weight": weight}), path)
        args = ["import", "ids", path, "--model", "demo", "--out", tmp_path / name, "--no-plots", "-q"]
        line = assert_clean_error(invoke(args), contains="column 'weight'")
        assert path.name in line
        assert not (tmp_path / name).exists()
    ok = tmp_path / "ok.parquet"
    pd.DataFrame({**base, "weight": np.full(n, 0.5)}).to_parquet(ok)
    args = ["import", "ids", ok, "--model", "demo", "--out", tmp_path / "ok", "--no-plots", "-q"]
    assert invoke(args).exit_code == 0


def test_out_below_a_file_is_named(tmp_path: Path) -> None:
    """``--out f.txt/x`` where f.txt is a file: one line naming the file (was 'File exists')."""
    (tmp_path / "f.txt").write_text("hi\n")
    _ids(tmp_path / "ids.npy")
    args = ["import", "ids", tmp_path / "ids.npy", "--model", "demo", "--out", tmp_path / "f.txt" / "x", "-q"]
    line = assert_clean_error(invoke(args))
    assert "f.txt is a file, not a directory" in line
    assert (tmp_path / "f.txt").read_text() == "hi\n"
