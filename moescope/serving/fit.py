"""Will it fit, and how fast can it decode: placement and a roofline bound from the accounting.

What: :func:`fit` places a model on one machine (:class:`Hardware`: GPU memory, RAM,
optional disk, and their bandwidths) for decode batches of B sequences at a context, and
bounds decode speed by the roofline: a step of B tokens takes at least as long as its
slowest resource needs (every transfer and the compute overlapped perfectly, each at its
peak rate), so ``tokens/s <= B / max(t_hbm, t_pcie, t_ram, t_disk, t_compute)``.

Placement, per batch size (the KV cache grows with B):

1. the dense weights (everything but routed experts) and the KV cache of B sequences at
   ``context`` go to GPU memory; if they do not fit, the row says so (dense offload is not
   modelled);
2. the rest of GPU memory holds the same number ``C_gpu`` of experts in every MoE layer,
   then RAM holds ``C_ram`` more, then disk (when ``--disk`` is given) the rest; if the
   experts do not all fit, the row says so. With a trace the hottest experts (by the trace's
   counts) sit on the fastest tier; without one every expert is equally likely (uniform).

Bytes per decode step:

- HBM: dense weights + KV cache of B sequences at context (both read once per step) + the
  GPU-resident experts the step touches;
- PCIe (``offload="gpu"``, experts computed on the GPU): every touched expert held in RAM or
  on disk is copied to the GPU once per step (no cache beyond the static placement; the
  ``offload`` command simulates dynamic caches); disk-held experts are also read from disk;
- RAM (``offload="cpu"``, llama.cpp ``--n-cpu-moe`` style): RAM-held experts are computed by
  the CPU, read at RAM bandwidth; only activations cross PCIe (not counted); CPU FLOP/s are
  not a limit in this bound;
- compute: B × ``flops_per_token`` at context (``params``'s figure: 2 × active matmul
  weights + attention against ``context`` keys) at the GPU's peak FLOP/s.

Experts touched per step: per layer and expert, the share of steps of B tokens that route to
it: measured from the trace's routes (B concurrent documents when the trace has B
documents, else B consecutive tokens, else independent routing with the trace's marginals,
named per row in ``coverage``), or, without a trace, ``1 - (1 - k/E)^B`` for every expert
(``uniform``). Every row states its assumptions; there is no correction factor anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from moescope.errors import ConfigError, MoescopeError
from moescope.serving.accounting import ModelBytes

__all__ = ["PRESETS", "FitReport", "FitRow", "Hardware", "fit", "preset"]

GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    """One machine: capacities in bytes, bandwidths in bytes/s, compute in FLOP/s.

    Attributes:
        name: preset name or ``custom``.
        gpu_memory: GPU memory usable for weights and KV cache (all of it: pass less to
            reserve room for activations and the runtime).
        ram: host memory usable for experts (0: none).
        disk: disk space for experts, or None (disk not used).
        hbm_bw: GPU memory bandwidth.
        pcie_bw: host-to-GPU bandwidth.
        ram_bw: host memory bandwidth.
        disk_bw: disk read bandwidth.
        flops: GPU peak dense bf16 tensor FLOP/s.
        source: where the preset's figures come from.
    """

    name: str
    gpu_memory: float
    ram: float
    disk: float | None
    hbm_bw: float
    pcie_bw: float
    ram_bw: float
    disk_bw: float
    flops: float
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        return asdict(self)


_PCIE4 = 31.5e9  # 16 GT/s × 16 lanes × 128/130 / 8 bits, one direction
_PCIE5 = 63.0e9
_DDR5_2CH = 89.6e9  # DDR5-5600, two channels × 8 bytes
_DDR5_8CH = 307.2e9  # DDR5-4800, eight channels × 8 bytes
_NVME4 = 7.0e9
#: vendor peak figures (dense, no sparsity); RAM and disk are typical hosts for that card
PRESETS: dict[str, Hardware] = {
    "rtx3090": Hardware(
        "rtx3090", 24 * GiB, 0, None, 936e9, _PCIE4, _DDR5_2CH, _NVME4, 71e12,
        "NVIDIA GA102 whitepaper: 936 GB/s GDDR6X, 71 TFLOP/s bf16 tensor (fp32 accumulate); PCIe 4.0 x16; "
        "host DDR5-5600 dual channel, NVMe Gen4",
    ),
    "rtx4090": Hardware(
        "rtx4090", 24 * GiB, 0, None, 1008e9, _PCIE4, _DDR5_2CH, _NVME4, 165.2e12,
        "NVIDIA Ada whitepaper: 1008 GB/s GDDR6X, 165.2 TFLOP/s bf16 tensor (fp32 accumulate); PCIe 4.0 x16; "
        "host DDR5-5600 dual channel, NVMe Gen4",
    ),
    "a100-80gb": Hardware(
        "a100-80gb", 80 * GiB, 0, None, 2039e9, _PCIE4, _DDR5_8CH, _NVME4, 312e12,
        "NVIDIA A100 SXM 80GB datasheet: 2039 GB/s HBM2e, 312 TFLOP/s bf16; PCIe 4.0 x16; host 8-channel "
        "DDR5-4800, NVMe Gen4",
    ),
    "h100-sxm": Hardware(
        "h100-sxm", 80 * GiB, 0, None, 3.35e12, _PCIE5, _DDR5_8CH, _NVME4, 989e12,
        "NVIDIA H100 SXM datasheet: 3.35 TB/s HBM3, 989 TFLOP/s bf16 dense; PCIe 5.0 x16; host 8-channel "
        "DDR5-4800, NVMe Gen4",
    ),
    "h200": Hardware(
        "h200", 141e9, 0, None, 4.8e12, _PCIE5, _DDR5_8CH, _NVME4, 989e12,
        "NVIDIA H200 SXM datasheet: 141 GB HBM3e at 4.8 TB/s, 989 TFLOP/s bf16 dense; PCIe 5.0 x16; host "
        "8-channel DDR5-4800, NVMe Gen4",
    ),
}  # fmt: skip


def preset(name: str, **overrides: float | None) -> Hardware:
    """A preset with some figures replaced (None keeps the preset's).

    Raises:
        ConfigError: an unknown preset name.
    """
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: use one of {', '.join(PRESETS)}.")
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(PRESETS[name], **given) if given else PRESETS[name]  # type: ignore[arg-type]


@dataclass(frozen=True)
class FitRow:
    """One batch size of :func:`fit`; ``--json`` keys = field names.

    ``fits`` false (with ``why``) leaves the speed fields None. Bytes are per decode step.
    """

    model: str
    batch: int
    context: int
    fits: bool
    why: str | None
    gpu_experts_per_layer: int | None
    ram_experts_per_layer: int | None
    disk_experts_per_layer: int | None
    dense_bytes: float
    kv_bytes: float
    gpu_bytes_used: float | None
    distinct_experts_per_layer: float | None
    coverage: str
    hbm_bytes: float | None
    pcie_bytes: float | None
    ram_bytes: float | None
    disk_bytes: float | None
    flops: float
    step_seconds: float | None
    tokens_per_second: float | None
    bound: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        return asdict(self)


@dataclass(frozen=True)
class FitReport:
    """What :func:`fit` found for one model on one machine."""

    model: str
    dtype: str
    hardware: Hardware
    offload: str
    bytes: ModelBytes
    rows: list[FitRow]
    assumptions: list[str] = field(default_factory=list)

    @property
    def compute_bound_batch(self) -> int | None:
        """The smallest batch whose bound is compute (None: memory-bound at every batch tried)."""
        return next((r.batch for r in self.rows if r.bound == "compute"), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready object."""
        return {
            "model": self.model,
            "dtype": self.dtype,
            "offload": self.offload,
            "hardware": self.hardware.to_dict(),
            "bytes": self.bytes.to_dict(),
            "compute_bound_batch": self.compute_bound_batch,
            "assumptions": self.assumptions,
            "rows": [r.to_dict() for r in self.rows],
        }


@dataclass(frozen=True)
class Touch:
    """Per batch size: per MoE layer, each expert's share of steps touching it, and where
    the figure came from (``uniform``, ``concurrent``, ``consecutive``, ``independent``)."""

    by_batch: dict[int, np.ndarray]  # batch -> [layers, E]
    source: dict[int, str]
    hot_order: np.ndarray  # [layers, E] experts, most used first


def uniform_touch(mb: ModelBytes, batches: Sequence[int]) -> Touch:
    """Every expert equally likely: touched with probability ``1 - (1 - k/E)^B``."""
    n_l, e_n = len(mb.moe_layers), mb.num_experts
    p = {b: np.full((n_l, e_n), 1.0 - (1.0 - mb.top_k / e_n) ** b) for b in batches}
    order = np.tile(np.arange(e_n), (n_l, 1))
    return Touch(p, dict.fromkeys(batches, "uniform"), order)


def trace_touch(mb: ModelBytes, routes: Any, batches: Sequence[int]) -> Touch:
    """Touch shares measured on a trace's routes (:func:`moescope.serving.batch_coverage`).

    Raises:
        MoescopeError: the trace was recorded on a model of another shape.
    """
    from moescope.serving.coverage import batch_coverage

    if routes.num_experts != mb.num_experts or routes.layers != mb.moe_layers:
        raise MoescopeError(
            f"the trace routes {routes.num_experts} experts on layers {routes.layers} but {mb.model} has "
            f"{mb.num_experts} on {mb.moe_layers}; pass the trace recorded on this model."
        )
    cov = batch_coverage(routes, batches)
    by: dict[int, list[list[float]]] = {b: [] for b in batches}
    src: dict[int, str] = {}
    for c in cov:
        by[c.batch].append(c.touch)
        src[c.batch] = (
            "concurrent"
            if c.concurrent is not None
            else "consecutive"
            if c.consecutive is not None
            else "independent"
        )
    counts = np.stack(
        [
            np.bincount(routes.layer(la)[routes.layer(la) >= 0].astype(np.int64), minlength=mb.num_experts)
            for la in routes.layers
        ]
    )
    order = np.argsort(-counts, axis=1, kind="stable")
    return Touch({b: np.array(v) for b, v in by.items()}, src, order)


def _row(mb: ModelBytes, hw: Hardware, b: int, touch: Touch | None, offload: str) -> FitRow:
    kv = float(b * mb.kv_bytes_at_context)
    flops = float(b * mb.flops_per_token)
    base: dict[str, Any] = dict(
        model=mb.model, batch=b, context=mb.context, dense_bytes=mb.dense_bytes, kv_bytes=kv, flops=flops,
        coverage="dense" if not mb.is_moe else (touch.source[b] if touch else "uniform"),
    )  # fmt: skip
    nothing: dict[str, Any] = dict(
        gpu_experts_per_layer=None, ram_experts_per_layer=None, disk_experts_per_layer=None, gpu_bytes_used=None,
        distinct_experts_per_layer=None, hbm_bytes=None, pcie_bytes=None, ram_bytes=None, disk_bytes=None,
        step_seconds=None, tokens_per_second=None, bound=None,
    )  # fmt: skip
    free = hw.gpu_memory - mb.dense_bytes - kv
    if free < 0:
        why = (
            f"dense weights ({mb.dense_bytes / GiB:.2f} GiB) + KV cache ({kv / GiB:.2f} GiB) exceed GPU memory "
            f"({hw.gpu_memory / GiB:.2f} GiB)"
        )
        return FitRow(**base, **nothing, fits=False, why=why)
    hbm = mb.dense_bytes + kv
    pcie = ram_b = disk_b = 0.0
    c_gpu = c_ram = c_disk = 0
    distinct = None
    used = mb.dense_bytes + kv
    if mb.is_moe:
        assert touch is not None
        unit = mb.one_expert_per_layer
        e_n = mb.num_experts
        c_gpu = min(e_n, int(free // unit))
        c_ram = min(e_n - c_gpu, int(hw.ram // unit))
        c_disk = e_n - c_gpu - c_ram
        if c_disk and (hw.disk is None or c_disk * unit > hw.disk):
            have = f"{hw.ram / GiB:.2f} GiB RAM" + (
                "" if hw.disk is None else f" + {hw.disk / GiB:.2f} GiB disk"
            )
            why = (
                f"experts need {mb.routed_bytes / GiB:.2f} GiB; {c_gpu} per layer fit on the GPU, {c_ram} in "
                f"{have}{'' if hw.disk is not None else ' (pass --disk to use one)'}"
            )
            return FitRow(**base, **nothing, fits=False, why=why)
        p = touch.by_batch[b]
        eb = np.array([mb.expert_bytes[la] for la in mb.moe_layers])
        ranked = np.take_along_axis(p, touch.hot_order, axis=1)  # hottest first
        t_gpu = ranked[:, :c_gpu].sum(axis=1)
        t_ram = ranked[:, c_gpu : c_gpu + c_ram].sum(axis=1)
        t_disk = ranked[:, c_gpu + c_ram :].sum(axis=1)
        distinct = float(p.sum(axis=1).mean())
        hbm += float((t_gpu * eb).sum())
        used += c_gpu * unit
        disk_b = float((t_disk * eb).sum())
        if offload == "gpu":
            pcie = float(((t_ram + t_disk) * eb).sum())
        else:
            ram_b = float(((t_ram + t_disk) * eb).sum())
    times = {
        "hbm": hbm / hw.hbm_bw,
        "pcie": pcie / hw.pcie_bw,
        "ram": ram_b / hw.ram_bw,
        "disk": disk_b / hw.disk_bw,
        "compute": flops / hw.flops,
    }
    bound = max(times, key=times.__getitem__)
    step = times[bound]
    return FitRow(
        **base, fits=True, why=None, gpu_experts_per_layer=c_gpu if mb.is_moe else None,
        ram_experts_per_layer=c_ram if mb.is_moe else None, disk_experts_per_layer=c_disk if mb.is_moe else None,
        gpu_bytes_used=used, distinct_experts_per_layer=distinct, hbm_bytes=hbm, pcie_bytes=pcie, ram_bytes=ram_b,
        disk_bytes=disk_b, step_seconds=step, tokens_per_second=b / step if step > 0 else None, bound=bound,
    )  # fmt: skip


def assumptions(mb: ModelBytes, hw: Hardware, offload: str, traced: bool) -> list[str]:
    """The assumptions behind every figure of :func:`fit`, as sentences."""
    lines = [
        f"weights in {mb.dtype}: {mb.total_bytes / GiB:.2f} GiB = dense {mb.dense_bytes / GiB:.2f} GiB + routed "
        f"experts {mb.routed_bytes / GiB:.2f} GiB (moescope params' accounting)",
        f"KV cache: {mb.kv_bytes_per_token:,} bytes/token in bf16 (params), {mb.kv_bytes_at_context / GiB:.3f} GiB "
        f"per sequence at context {mb.context:,}, times the batch; all of it read once per decode step",
        f"hardware '{hw.name}': GPU {hw.gpu_memory / GiB:.2f} GiB (all usable), RAM {hw.ram / GiB:.2f} GiB, disk "
        + ("not used" if hw.disk is None else f"{hw.disk / GiB:.2f} GiB")
        + f"; HBM {hw.hbm_bw / 1e9:g} GB/s, PCIe {hw.pcie_bw / 1e9:g} GB/s, RAM {hw.ram_bw / 1e9:g} GB/s, disk "
        f"{hw.disk_bw / 1e9:g} GB/s, {hw.flops / 1e12:g} TFLOP/s peak"
        + (f" ({hw.source})" if hw.source else ""),
        "roofline: a step takes as long as its slowest resource at peak rate, transfers and compute fully "
        "overlapped, so tokens/s is an upper bound; compute = batch × params' FLOPs/token at the context",
        "placement: dense weights and KV cache on the GPU; then the same number of experts per layer on the "
        "GPU, in RAM, on disk, "
        + ("hottest first by the trace's counts" if traced else "any (uniform routing)"),
    ]
    if mb.is_moe:
        lines.append(
            "experts touched per step: "
            + (
                "measured on the trace (per row: concurrent documents, consecutive tokens, or independent "
                "routing with the trace's marginals where the trace is too short)"
                if traced
                else f"uniform routing: each expert with probability 1-(1-{mb.top_k}/{mb.num_experts})^B"
            )
        )
        lines.append(
            "offloaded experts: "
            + (
                "copied to the GPU over PCIe once per step they are used (static placement, no cache)"
                if offload == "gpu"
                else "computed by the CPU from RAM at RAM bandwidth (CPU FLOP/s not a limit), activations only over PCIe"
            )
        )
    return lines


def fit(
    mb: ModelBytes,
    hardware: Hardware,
    *,
    batches: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    routes: Any = None,
    offload: str = "gpu",
) -> FitReport:
    """Placement and roofline decode bound for each batch size (see the module docstring).

    Args:
        mb: the model's bytes (:func:`moescope.serving.accounting.model_bytes`).
        hardware: the machine (:data:`PRESETS`, :func:`preset` or your own :class:`Hardware`).
        batches: decode batch sizes (sequences per step).
        routes: a trace's :class:`~moescope.serving.routes.Routes` for measured expert
            coverage and hot-first placement, or None for uniform routing.
        offload: ``gpu`` (offloaded experts copied over PCIe) or ``cpu`` (computed from RAM).

    Raises:
        MoescopeError: a bad ``offload`` or batch size, or a trace of another model.
    """
    if offload not in ("gpu", "cpu"):
        raise MoescopeError(f"--offload {offload!r}: use gpu or cpu.")
    if any(b < 1 for b in batches):
        raise MoescopeError("batch sizes must be at least 1.")
    touch = None
    if mb.is_moe:
        touch = uniform_touch(mb, batches) if routes is None else trace_touch(mb, routes, batches)
    rows = [_row(mb, hardware, b, touch, offload) for b in batches]
    return FitReport(
        model=mb.model,
        dtype=mb.dtype,
        hardware=hardware,
        offload=offload,
        bytes=mb,
        rows=rows,
        assumptions=assumptions(mb, hardware, offload, routes is not None),
    )
