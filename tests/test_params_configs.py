"""Every sample config: moescope's total equals transformers' meta-device model, exactly;
published figures fit under the stated convention; the sample table is current."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from moescope.accounting.params import account, count_params
from moescope.accounting.published import compare, rounds_to
from moescope.arch.closedform import config_inventory, has_closed_form
from moescope.arch.discover import build_meta_model
from moescope.arch.inventory import Inventory, TensorInfo, as_inventory
from moescope.arch.moe import MoESpec, classify, moe_spec
from moescope.arch.tensorclasses import classify_groups
from moescope.checkpoint.ref import Checkpoint
from tests.tiny import FAMILIES, meta_model, tiny_config

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


@pytest.mark.slow
def test_sample_table_is_current() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sample_table.py"), "--check"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------
# Classification by name shape (moescope.arch.tensorclasses) equals classifying every tensor
# ---------------------------------------------------------------------------------------


def _sample(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_moescope")}


def _per_expert(inv: Inventory, extra_layer: int | None = None) -> Inventory:
    """The inventory as hub checkpoints store it: one FP8 tensor (with its ``weight_scale_inv``)
    per expert and projection instead of fused ``[E, ...]`` tensors; ``extra_layer`` repeats the
    last layer under that index (an MTP layer, as DeepSeek-V3 stores it)."""
    out = Inventory()
    last = max((int(n.split(".")[2]) for n in inv.names if n.startswith("model.layers.")), default=0)
    for t in inv:
        copies = [t.name]
        if extra_layer is not None and t.name.startswith(f"model.layers.{last}."):
            copies.append(t.name.replace(f"model.layers.{last}.", f"model.layers.{extra_layer}.", 1))
        for name in copies:
            if name.endswith("experts.gate_up_proj") and len(t.shape) == 3:
                e, two_i, h = t.shape
                for j in range(e):
                    for proj in ("gate_proj", "up_proj"):
                        base = name.replace("experts.gate_up_proj", f"experts.{j}.{proj}")
                        out.append(TensorInfo(f"{base}.weight", (two_i // 2, h), "F8_E4M3"))
                        out.append(TensorInfo(f"{base}.weight_scale_inv", (1, 1), "F32"))
            elif name.endswith("experts.down_proj") and len(t.shape) == 3:
                e, h, i = t.shape
                for j in range(e):
                    base = name.replace("experts.down_proj", f"experts.{j}.down_proj")
                    out.append(TensorInfo(f"{base}.weight", (h, i), "F8_E4M3"))
                    out.append(TensorInfo(f"{base}.weight_scale_inv", (1, 1), "F32"))
            else:
                out.append(t._replace(name=name, dtype="BF16"))
    return out


def _assert_grouping_exact(inv: Inventory, spec: MoESpec) -> None:
    per_tensor = [classify(n, spec, len(s)) for n, s in zip(inv.names, inv.shapes, strict=True)]
    groups = classify_groups(inv, spec, min_tensors=0)
    seen: list[int] = []
    for g in groups:
        assert g.positions == sorted(g.positions)
        classes = [per_tensor[i] for i in g.positions]
        assert {c._replace(expert=None) for c in classes} == {g.cls}, g
        assert {c.expert for c in classes} == ({None} if g.experts is None else g.experts), g
        seen.extend(g.positions)
    assert sorted(seen) == list(range(len(inv)))
    assert [g.positions[0] for g in groups] == sorted(g.positions[0] for g in groups)


MOE_SAMPLES = [p for p in CONFIGS if has_closed_form(_sample(p)) and moe_spec(_sample(p)).is_moe]


@pytest.mark.parametrize("path", MOE_SAMPLES, ids=lambda p: p.stem)
def test_grouped_classification_equals_per_tensor(path: Path) -> None:
    """Fused (config-derived) and per-expert FP8 layouts, an MTP layer included."""
    cfg = _sample(path)
    spec = moe_spec(cfg)
    fused = as_inventory(config_inventory(cfg, spec))
    kept = {str(i) for i in range(4)} | {str(spec.num_layers - 1)}  # a few layers keep it quick
    small = Inventory(
        t for t in fused if not t.name.startswith("model.layers.") or t.name.split(".")[2] in kept
    )
    _assert_grouping_exact(fused, spec)
    _assert_grouping_exact(_per_expert(small, extra_layer=spec.num_layers), spec)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_grouped_classification_tiny_families(family: str) -> None:
    """Every registered family's in-memory names, and its per-expert names where it has any."""
    config = tiny_config(family)
    names = [(n, tuple(p.shape)) for n, p in meta_model(config, family).named_parameters()]
    inv = Inventory(TensorInfo(n, s) for n, s in names)
    spec = moe_spec(config.to_dict())
    _assert_grouping_exact(inv, spec)
    _assert_grouping_exact(_per_expert(inv), spec)


def test_grouped_classification_odd_names() -> None:
    """Layer and expert numbers that coincide, digit counts that differ, names without digits,
    and names the blanking cannot split (a NUL, a newline)."""
    spec = moe_spec(_sample(ROOT / "sample_configs" / "Mixtral-8x7B-v0.1.json"))
    names = [f"model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight" for i in range(12) for j in range(8)]
    names += ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.3.x\0y"]
    inv = Inventory(TensorInfo(n, (4, 4)) for n in names)
    _assert_grouping_exact(inv, spec)
    _assert_grouping_exact(Inventory([*inv, TensorInfo("a\nb", (2,))]), spec)


def test_accounting_per_expert_equals_fused() -> None:
    """A DeepSeek-V3-sized per-expert FP8 layout (89k tensors: the grouped path) is accounted
    like the config-derived fused inventory."""
    cfg = _sample(ROOT / "sample_configs" / "DeepSeek-V3.json")
    fused = account(Checkpoint("ds", "config", cfg))
    inv = _per_expert(as_inventory(config_inventory(cfg, moe_spec(cfg))))
    assert len(inv) > 80_000
    assert len(classify_groups(inv, moe_spec(cfg))) < len(inv) / 20  # grouped, not one by one
    stored = account(Checkpoint("ds", "dir", cfg, tensors=inv))
    for key in (
        "total_params",
        "active_params",
        "active_params_no_embedding",
        "flops_per_token",
        "components",
    ):
        assert getattr(stored, key) == getattr(fused, key), key
    assert list(stored.weight_dtypes) == ["BF16", "F8_E4M3", "F32"]  # in order of first appearance


def test_grouping_falls_back_when_the_expert_matters(monkeypatch: pytest.MonkeyPatch) -> None:
    """A classifier whose answer depends on the expert number (here: experts 5+ are "other")
    is caught by the spot checks, and the tensors are classified one by one."""
    import moescope.arch.tensorclasses as tc

    def picky(name: str, spec: MoESpec, ndim: int = 2) -> Any:
        c = classify(name, spec, ndim)
        return c._replace(component="other") if c.expert is not None and c.expert >= 5 else c

    monkeypatch.setattr(tc, "classify", picky)
    spec = moe_spec(_sample(ROOT / "sample_configs" / "Mixtral-8x7B-v0.1.json"))
    inv = Inventory(
        TensorInfo(f"model.layers.{i}.block_sparse_moe.experts.{j}.w{w}.weight", (4, 4))
        for i in range(32)
        for j in range(8)
        for w in (1, 2, 3)
    )
    groups = tc.classify_groups(inv, spec, min_tensors=0)
    per_tensor = [picky(n, spec, 2) for n in inv.names]
    for g in groups:
        for i in g.positions:
            assert per_tensor[i]._replace(expert=None) == g.cls
    assert sum(g.cls.component == "other" for g in groups) == 32 * 3 * 3
