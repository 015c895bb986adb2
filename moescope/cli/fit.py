"""`moescope fit`: will a model fit a machine, where do its experts go, how fast can it decode.

Validates flags, builds the :class:`moescope.serving.fit.Hardware` from ``--preset`` and the
explicit sizes and bandwidths, sizes the model with
:func:`moescope.serving.accounting.model_bytes` (``params``'s accounting), optionally
measures expert coverage on a trace, and prints :func:`moescope.serving.fit.fit`'s rows per
batch size with every assumption on stderr (``--json``: one object per model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from moescope.cli._errors import friendly
from moescope.cli._output import CsvOpt, JsonOpt, Output, QuietOpt, human

#: spelled out so --help stays fast (equal to moescope.serving.fit.PRESETS, tested)
PRESETS = ("rtx3090", "rtx4090", "a100-80gb", "h100-sxm", "h200")

EXAMPLES = """
Examples:

  moescope fit sample_configs/Qwen3-30B-A3B.json --preset rtx4090 --ram 64GiB --dtype int4
  moescope fit sample_configs/Mixtral-8x7B-v0.1.json --preset h100-sxm --dtype fp8 --dense sample_configs/Mistral-7B-v0.1.json
  moescope fit demo --trace traces/demo --gpu-memory 4MiB --ram 1GiB --hbm-bw 1000GB --pcie-bw 32GB --flops 100e12
  moescope fit org/name --preset rtx4090 --ram 64GiB --disk 1TB --offload cpu --json

Placement per batch size: dense weights and the KV cache of the batch at --context on the GPU, then
the same number of experts per layer on the GPU, in RAM, on disk (--disk; not used otherwise),
hottest first when --trace is given. Decode bound (roofline): a step of B tokens takes as long as
its slowest resource at peak rate (HBM: dense weights + KV cache + GPU experts touched; PCIe:
offloaded experts touched, copied once per step; RAM with --offload cpu: experts computed by the
CPU; disk; compute: B x params' FLOPs/token at --context), transfers and compute fully
overlapped, so tokens/s is an upper bound. Experts touched per step: measured on --trace (B
concurrent documents, else B consecutive tokens, else independent routing with the trace's
marginals), else uniform routing 1-(1-k/E)^B. No correction factors; all GPU memory is usable
(pass a smaller --gpu-memory to reserve some). Presets: rtx3090, rtx4090 (24 GiB), a100-80gb,
h100-sxm (80 GiB), h200 (141 GB); vendor peak figures, listed in --json "hardware".

Output: one table per model (batch, fits, experts per layer on GPU/RAM/disk, GPU memory used,
distinct experts per layer, bytes per step over HBM and over PCIe (RAM with --offload cpu), the
tokens/s bound and the resource that sets it) and the assumptions
on stderr. --json prints an array, one object per model: model, dtype, offload, hardware,
bytes (total_bytes, dense_bytes, routed_bytes, expert_bytes, kv_bytes_per_token,
kv_bytes_at_context, ...), compute_bound_batch, assumptions, rows (model, batch, context, fits,
why, gpu_experts_per_layer, ram_experts_per_layer, disk_experts_per_layer, dense_bytes, kv_bytes,
gpu_bytes_used, distinct_experts_per_layer, coverage, hbm_bytes, pcie_bytes, ram_bytes,
disk_bytes, flops, step_seconds, tokens_per_second, bound). --csv prints the rows of every model.
"""


def _size(value: str | None, flag: str) -> float | None:
    if value is None:
        return None
    from moescope.execution.plan import parse_size

    try:
        return float(parse_size(value))
    except ValueError:
        raise typer.BadParameter(f"{flag} {value!r}: expected a size such as 24GiB or 64GB.") from None


def _rate(value: str | None, flag: str) -> float | None:
    """A rate per second: ``32GB`` (bytes/s) or a plain number such as ``165e12``."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return _size(value, flag)


def fit_cmd(
    models: Annotated[list[str], typer.Argument(metavar="MODEL", help="Models (anything `params` takes).")],
    trace: Annotated[
        Path | None, typer.Option("--trace", help="Trace with routes (--save-routes): measured coverage.")
    ] = None,
    preset: Annotated[str | None, typer.Option("--preset", help=f"Hardware: {', '.join(PRESETS)}.")] = None,
    gpu_memory: Annotated[str | None, typer.Option("--gpu-memory", help="GPU memory, e.g. 24GiB.")] = None,
    ram: Annotated[
        str | None, typer.Option("--ram", help="Host memory for experts, e.g. 64GiB (default 0).")
    ] = None,
    disk: Annotated[
        str | None, typer.Option("--disk", help="Disk space for experts (default: not used).")
    ] = None,
    hbm_bw: Annotated[
        str | None, typer.Option("--hbm-bw", help="GPU memory bandwidth per second, e.g. 1008GB.")
    ] = None,
    pcie_bw: Annotated[
        str | None, typer.Option("--pcie-bw", help="Host-to-GPU bandwidth per second.")
    ] = None,
    ram_bw: Annotated[str | None, typer.Option("--ram-bw", help="Host memory bandwidth per second.")] = None,
    disk_bw: Annotated[str | None, typer.Option("--disk-bw", help="Disk read bandwidth per second.")] = None,
    flops: Annotated[str | None, typer.Option("--flops", help="GPU peak FLOP/s, e.g. 165e12.")] = None,
    dense: Annotated[
        list[str] | None,
        typer.Option("--dense", help="A dense model to set beside (the MoE-vs-dense trade)."),
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Weights as stored, bf16, fp8 or int4.")] = "stored",
    context: Annotated[
        int, typer.Option("--context", help="Tokens of context per sequence (KV cache).")
    ] = 4096,
    batch: Annotated[
        str, typer.Option("--batch", help="Decode batch sizes.")
    ] = "1,2,4,8,16,32,64,128,256,512",
    offload: Annotated[
        str, typer.Option("--offload", help="gpu: offloaded experts cross PCIe; cpu: the CPU computes them.")
    ] = "gpu",
    json_out: JsonOpt = False,
    csv_out: CsvOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Will it fit, where do the experts go, how fast can it decode: a roofline from the accounting."""
    out = Output.from_flags(json_out, csv_out, quiet)
    if preset is not None and preset not in PRESETS:
        raise typer.BadParameter(f"--preset {preset!r}: use one of {', '.join(PRESETS)}.")
    if dtype not in ("stored", "bf16", "fp8", "int4"):
        raise typer.BadParameter(f"--dtype {dtype!r}: use stored, bf16, fp8 or int4.")
    if offload not in ("gpu", "cpu"):
        raise typer.BadParameter(f"--offload {offload!r}: use gpu or cpu.")
    if context < 1:
        raise typer.BadParameter("--context must be at least 1.")
    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        raise typer.BadParameter(f"--batch {batch!r}: expected integers like 1,8,64.") from None
    if not batches or min(batches) < 1:
        raise typer.BadParameter("--batch: every size must be at least 1.")
    given = {
        "gpu_memory": _size(gpu_memory, "--gpu-memory"), "ram": _size(ram, "--ram"), "disk": _size(disk, "--disk"),
        "hbm_bw": _rate(hbm_bw, "--hbm-bw"), "pcie_bw": _rate(pcie_bw, "--pcie-bw"),
        "ram_bw": _rate(ram_bw, "--ram-bw"), "disk_bw": _rate(disk_bw, "--disk-bw"), "flops": _rate(flops, "--flops"),
    }  # fmt: skip
    from moescope.serving.fit import Hardware, fit
    from moescope.serving.fit import preset as make_preset

    if preset is not None:
        hw = make_preset(preset, **given)
    else:
        need = [f for f in ("gpu_memory", "hbm_bw", "pcie_bw", "flops") if given[f] is None]
        if need:
            flags = ", ".join("--" + f.replace("_", "-") for f in need)
            raise typer.BadParameter(f"without --preset, pass {flags} (or name a --preset).")
        hw = Hardware(
            "custom", given["gpu_memory"] or 0.0, given["ram"] or 0.0, given["disk"], given["hbm_bw"] or 0.0,
            given["pcie_bw"] or 0.0, given["ram_bw"] or given["pcie_bw"] or 0.0, given["disk_bw"] or 1e9,
            given["flops"] or 0.0,
        )  # fmt: skip
    from moescope.serving.accounting import model_bytes

    routes = None
    if trace is not None:
        from moescope.serving.routes import load_routes

        routes = load_routes(trace)
    reports = []
    for ref in [*models, *(dense or [])]:
        mb = model_bytes(ref, dtype=dtype, context=context)
        reports.append(fit(mb, hw, batches=batches, routes=routes if mb.is_moe else None, offload=offload))
    if out.fmt == "json":
        out.json([r.to_dict() for r in reports])
        return
    if out.fmt == "csv":
        out.csv([row.to_dict() for r in reports for row in r.rows])
        return
    for r in reports:
        _print_fit(out, r)
    for line in reports[0].assumptions[2:5]:
        out.note(f"assumes: {line}")


def _print_fit(out: Output, rep: Any) -> None:
    rows = []
    for r in rep.rows:
        if not r.fits:
            rows.append([r.batch, "no", *["-"] * 7])
            out.note(f"{rep.model}, batch {r.batch}: does not fit: {r.why}")
            continue
        place = "-" if r.gpu_experts_per_layer is None else (
            f"{r.gpu_experts_per_layer}/{r.ram_experts_per_layer}/{r.disk_experts_per_layer}"
        )  # fmt: skip
        offl = r.pcie_bytes or r.ram_bytes
        distinct = "-" if r.distinct_experts_per_layer is None else f"{r.distinct_experts_per_layer:.1f}"
        rows.append(
            [r.batch, "yes", place, human(r.gpu_bytes_used, "B"), distinct, human(r.hbm_bytes, "B"),
             human(offl, "B") if offl else "-", f"{r.tokens_per_second:,.1f}", r.bound]
        )  # fmt: skip
    mb = rep.bytes
    title = (
        f"{rep.model} on {rep.hardware.name} ({mb.dtype}: {human(mb.total_bytes, 'B')}, KV "
        f"{human(mb.kv_bytes_at_context, 'B')}/seq at {mb.context:,}; coverage: {rep.rows[0].coverage})"
    )
    out.table(
        rows,
        ["batch", "fits", "GPU/RAM/disk", "GPU used", "distinct", "HBM/step",
         "PCIe/step" if rep.offload == "gpu" else "RAM/step", "tok/s <=", "bound"],
        title=title,
    )  # fmt: skip
    cb = rep.compute_bound_batch
    out.note(
        f"{rep.model}: "
        + (f"compute-bound from batch {cb}" if cb else "memory-bound at every batch that fits")
    )
    for line in [*rep.assumptions[:2], *rep.assumptions[5:]]:
        out.note(f"{rep.model}: {line}")


def register(app: typer.Typer) -> None:
    """Add ``fit`` to the app."""
    app.command("fit", epilog=EXAMPLES)(friendly(fit_cmd))
