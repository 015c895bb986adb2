"""Every sample config: moescope's total equals transformers' meta-device model, exactly;
published figures fit under the stated convention; the sample table is current."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moescope.closedform import build_meta_model
from moescope.params import count_params
from moescope.published import compare, rounds_to

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "sample_configs").glob("*.json"))
CONFIGS = [p for p in CONFIGS if p.name != "published.json"]


def test_enough_sample_configs() -> None:
    moe = [p for p in CONFIGS if count_params(str(p)).is_moe]
    assert len(moe) >= 15
    assert len(CONFIGS) - len(moe) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_total_equals_meta_model(path: Path) -> None:
    cfg = json.loads(path.read_text())
    assert "_moescope_source" in cfg, "each sample config says where it came from"
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_moescope")}
    model = build_meta_model(cfg)
    expected = sum(p.numel() for p in model.parameters())
    report = count_params(str(path))
    assert report.total_params == expected
    # components partition the total (MTP is reported apart)
    assert sum(v for k, v in report.components.items() if k != "mtp") == report.total_params
    if report.is_moe:
        assert report.active_params < report.total_params
        assert report.components["routed_experts"] > 0


def test_published_figures_fit() -> None:
    rows = compare(ROOT / "sample_configs")
    assert len(rows) >= 26
    for row in rows:
        if row.convention == "none":
            assert row.note, f"{row.file}: a 'none fits' row must say why"
            continue
        assert row.fit in (
            "within 0.5%",
            "rounds to published",
            "total within 0.5%",
            "total rounds to published",
        ), row


def test_rounds_to() -> None:
    assert rounds_to(37.4e9, 37e9)
    assert not rounds_to(37.6e9, 37e9)
    assert rounds_to(12.88e9, 12.9e9)
    assert not rounds_to(12.8e9, 12.9e9)


def test_sample_table_is_current() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sample_table.py"), "--check"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
