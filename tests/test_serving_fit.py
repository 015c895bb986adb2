"""``fit``: bytes and KV cache equal ``params``'s on the sample configs; the roofline by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from moescope.accounting.params import count_params
from moescope.serving.accounting import ModelBytes, model_bytes
from moescope.serving.fit import Hardware, fit, preset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "sample_configs").glob("*.json"))
CONFIGS = [p for p in CONFIGS if p.name != "published.json"]
GB = 1e9


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_bytes_and_kv_equal_params(path: Path) -> None:
    rep = count_params(str(path), context=8192)
    for dtype in ("bf16", "fp8", "int4"):
        mb = model_bytes(str(path), dtype=dtype, context=8192)
        assert mb.total_bytes == rep.memory_bytes[dtype]
        assert mb.dense_bytes + mb.routed_bytes == pytest.approx(mb.total_bytes, rel=1e-12)
        per_param = {"bf16": 2, "fp8": 1, "int4": 0.5}[dtype]
        assert mb.routed_bytes == pytest.approx(rep.components["routed_experts"] * per_param, rel=1e-12)
        assert mb.kv_bytes_per_token == rep.kv_cache_bytes_per_token
        assert mb.kv_bytes_at_context == rep.kv_cache_bytes_at_context
        assert mb.flops_per_token == rep.flops_per_token
    if rep.weight_bytes is not None:
        assert model_bytes(str(path), context=8192).total_bytes == rep.weight_bytes


def test_demo_stored_bytes_are_the_files() -> None:
    rep = count_params("demo")
    mb = model_bytes("demo")
    assert mb.total_bytes == rep.weight_bytes
    assert mb.routed_bytes == rep.components["routed_experts"] * 4  # float32 checkpoint
    assert set(mb.expert_bytes) == set(rep.moe_layers)


def _toy() -> ModelBytes:
    return ModelBytes(
        model="toy", dtype="bf16", total_bytes=18 * GB, dense_bytes=10 * GB, routed_bytes=8 * GB,
        expert_bytes={0: 1 * GB, 1: 1 * GB}, num_experts=4, top_k=1, moe_layers=[0, 1], context=100,
        kv_bytes_per_token=10**7, kv_bytes_at_context=1 * 10**9, flops_per_token=10**12, total_params=9 * 10**9,
        active_params=6 * 10**9,
    )  # fmt: skip


def test_roofline_by_hand() -> None:
    hw = Hardware("toy", 14 * GB, 100 * GB, None, 1e12, 1e10, 5e10, 1e9, 1e14)
    rows = {r.batch: r for r in fit(_toy(), hw, batches=[1, 2, 4]).rows}
    # B=1: GPU 14 - dense 10 - KV 1 = 3 GB: one expert per layer (2 GB); 3 in RAM.
    # Uniform routing: each expert touched with p = 1/4; per layer 0.25 on the GPU, 0.75 in RAM.
    r = rows[1]
    assert (r.gpu_experts_per_layer, r.ram_experts_per_layer, r.disk_experts_per_layer) == (1, 3, 0)
    assert r.hbm_bytes == pytest.approx(10e9 + 1e9 + 2 * 0.25 * 1e9)
    assert r.pcie_bytes == pytest.approx(2 * 0.75 * 1e9)
    assert r.step_seconds == pytest.approx(0.15)  # PCIe: 1.5 GB at 10 GB/s beats HBM 11.5 ms, compute 10 ms
    assert (r.bound, r.tokens_per_second) == ("pcie", pytest.approx(1 / 0.15))
    # B=2: KV 2 GB leaves 2 GB: still one per layer; p = 1 - 0.75^2 = 0.4375
    r = rows[2]
    assert r.pcie_bytes == pytest.approx(2 * 3 * 0.4375 * 1e9)
    assert r.tokens_per_second == pytest.approx(2 / 0.2625)
    assert r.distinct_experts_per_layer == pytest.approx(4 * 0.4375)
    # B=4: KV 4 GB leaves 0 GB: no expert on the GPU, all 4 in RAM
    assert rows[4].gpu_experts_per_layer == 0 and rows[4].ram_experts_per_layer == 4
    # CPU offload: RAM experts read at RAM bandwidth instead of crossing PCIe
    cpu = fit(_toy(), hw, batches=[1], offload="cpu").rows[0]
    assert cpu.ram_bytes == pytest.approx(1.5e9) and cpu.pcie_bytes == 0
    assert cpu.step_seconds == pytest.approx(max(1.5e9 / 5e10, 11.5e9 / 1e12, 1e12 / 1e14))


def test_does_not_fit_says_why() -> None:
    hw = Hardware("toy", 9 * GB, 0, None, 1e12, 1e10, 5e10, 1e9, 1e14)
    (r,) = fit(_toy(), hw, batches=[1]).rows
    assert not r.fits and r.tokens_per_second is None and "exceed GPU memory" in (r.why or "")
    hw = Hardware("toy", 12 * GB, 2 * GB, None, 1e12, 1e10, 5e10, 1e9, 1e14)
    (r,) = fit(_toy(), hw, batches=[1]).rows
    assert not r.fits and "--disk" in (r.why or "")
    disk = fit(_toy(), Hardware("toy", 12 * GB, 2 * GB, 100 * GB, 1e12, 1e10, 5e10, 1e9, 1e14), batches=[1])
    r = disk.rows[0]
    assert (r.gpu_experts_per_layer, r.ram_experts_per_layer, r.disk_experts_per_layer) == (0, 1, 3)
    assert r.disk_bytes == pytest.approx(2 * 0.75 * 1e9) and r.bound == "disk"


def test_dense_model_and_presets() -> None:
    mb = model_bytes(str(ROOT / "sample_configs/Mistral-7B-v0.1.json"), dtype="bf16")
    report = fit(mb, preset("h100-sxm"), batches=[1])
    (r,) = report.rows
    assert r.coverage == "dense" and r.hbm_bytes == pytest.approx(mb.total_bytes + mb.kv_bytes_at_context)
    assert r.tokens_per_second == pytest.approx(1 / max(r.hbm_bytes / 3.35e12, mb.flops_per_token / 989e12))
    assert any("roofline" in a for a in report.assumptions)
    assert preset("rtx4090", ram=64 * 2**30).ram == 64 * 2**30
