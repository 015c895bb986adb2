"""Options shared by several commands, defined once as validated ``Annotated`` aliases.

Each command keeps its own default (``dtype: DtypeOpt = "auto"``); the flag name, help text
and validation live here, so they read and behave the same in every command. Validation
runs in option callbacks, while click parses the command line: a bad value is a usage
error (exit 2) before any model is loaded, and the command body receives the canonical
spelling (``bf16`` arrives as ``bfloat16``).

- :data:`DtypeOpt`: ``auto``, ``float32``, ``bfloat16``, ``float16`` (aliases ``fp32``,
  ``bf16``, ``fp16``, ``float``, ``half``).
- :data:`DeviceOpt`: ``cpu``, ``cuda``, ``cuda:N``, ``mps``; CUDA and MPS are checked
  against this torch and machine (torch is imported only for those values).
- :data:`SplitOpt`: ``train`` or ``heldout``, the splits of the built-in corpus.
- :data:`CriterionOpt`: the pruning criteria of :data:`moescope.pruning.CRITERIA`.
- :data:`PlotFormatOpt`: ``png``, ``svg`` or ``pdf``, the plot files' format.
"""

from __future__ import annotations

import re
from typing import Annotated

import typer

from moescope.cli._errors import NO_CUDA
from moescope.demo.corpus import SPLITS

#: dtype spellings -> the canonical name ``moescope.execution.load.torch_dtype`` takes
DTYPES: dict[str, str] = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}

#: pruning criteria; equal to ``moescope.pruning.CRITERIA`` (tested), spelled out here so that
#: parsing the command line does not import numpy and pandas
CRITERIA: tuple[str, ...] = ("frequency", "soft", "reap", "ean", "random")

_DEVICE = re.compile(r"^(cpu|mps|cuda)(?::(\d+))?$")


def check_dtype(value: str) -> str:
    """Canonical dtype name, or a usage error naming the valid ones."""
    key = DTYPES.get(value.strip().lower())
    if key is None:
        raise typer.BadParameter(
            f"unknown dtype {value!r}; use auto, float32, bfloat16 or float16 (or fp32, bf16, fp16)."
        )
    return key


def check_device(value: str) -> str:
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        typer.BadParameter: an unknown device, or one this torch or machine lacks.
    """
    device = value.strip().lower()
    m = _DEVICE.match(device)
    if m is None or (m.group(1) == "cpu" and m.group(2) not in (None, "0")):
        raise typer.BadParameter(f"unknown device {value!r}; use cpu, cuda, cuda:N (N = 0, 1, ...) or mps.")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return device
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        raise typer.BadParameter(f"--device {value} needs torch; install it first.") from None
    if kind == "cuda":
        if getattr(torch.version, "cuda", None) is None and getattr(torch.version, "hip", None) is None:
            raise typer.BadParameter(f"{NO_CUDA}.")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise typer.BadParameter(
                "no CUDA GPU is visible (torch.cuda.is_available() is False: check the driver and "
                "CUDA_VISIBLE_DEVICES); pass --device cpu."
            )
        if index is not None and int(index) >= count:
            raise typer.BadParameter(
                f"{device} does not exist: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}."
            )
        return device
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        raise typer.BadParameter("MPS is not available in this torch or on this machine; pass --device cpu.")
    return device


def check_split(value: str | None) -> str | None:
    """``train``, ``heldout``, ``all`` or None (the library's default: held-out for the built-in corpus)."""
    if value is None:
        return None
    split = value.strip().lower()
    if split not in (*SPLITS, "all"):
        raise typer.BadParameter(
            f"unknown split {value!r}; use {', '.join(SPLITS)} or all (splits of the built-in corpus 'demo')."
        )
    return split


def check_criterion(value: str) -> str:
    """One of :data:`CRITERIA`."""
    criterion = value.strip().lower()
    if criterion not in CRITERIA:
        raise typer.BadParameter(f"unknown criterion {value!r}; use one of {', '.join(CRITERIA)}.")
    return criterion


DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        callback=check_dtype,
        metavar="DTYPE",
        help="auto, float32, bfloat16 or float16 (fp32, bf16, fp16 accepted).",
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        callback=check_device,
        metavar="DEVICE",
        help="torch device: cpu, cuda, cuda:N or mps (checked against this torch and machine).",
    ),
]
SplitOpt = Annotated[
    str | None,
    typer.Option(
        "--split",
        callback=check_split,
        metavar="SPLIT",
        help="train, heldout or all: split of the built-in corpus 'demo' (files have none); "
        "trace and eval read heldout unless told.",
        show_default=False,
    ),
]
CriterionOpt = Annotated[
    str,
    typer.Option(
        "--criterion",
        callback=check_criterion,
        metavar="CRITERION",
        help="frequency (tokens routed), soft (sum of gate weights), reap (mean gate x output norm "
        "over routed tokens), ean (sum of output norms) or random (seeded baseline).",
    ),
]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
TrustRemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Run the checkpoint's own modelling code.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]


def check_max_memory(value: str | None) -> str | None:
    """A size (``20GiB``) or accelerate's per-device form (``0=20GiB,cpu=60GiB``)."""
    if value is None:
        return None
    from moescope.execution.plan import parse_size

    try:
        for part in value.split(","):
            parse_size(part.split("=", 1)[-1])
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def check_device_map(value: str | None) -> str | None:
    """Only ``auto`` (accelerate's placement) is accepted."""
    if value is not None and value != "auto":
        raise typer.BadParameter(
            f"--device-map {value!r}: only 'auto' is supported (accelerate's placement)."
        )
    return value


MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Memory budget, e.g. 20GiB (default: about 85% of available RAM, or of the GPU's with "
        "--device cuda); with --device-map auto, per device: 0=20GiB,cpu=60GiB.",
        callback=check_max_memory,
    ),
]
StreamOpt = Annotated[
    bool | None,
    typer.Option(
        "--stream/--no-stream",
        help="Run layer by layer (one decoder layer's weights in memory) or load whole; default: stream "
        "only when the model does not fit --max-memory.",
        show_default=False,
    ),
]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="auto: let accelerate place the model across GPUs, CPU and disk (re-reads offloaded "
        "weights every forward; --stream reads them once per pass).",
        callback=check_device_map,
    ),
]


#: plot file formats; equal to ``moescope.stats.plots.PLOT_FORMATS`` (tested), spelled out here so
#: that parsing the command line does not import numpy and pandas
PLOT_FORMATS: tuple[str, ...] = ("png", "svg", "pdf")


def check_plot_format(value: str) -> str:
    """One of :data:`PLOT_FORMATS` (any case), else a usage error naming them."""
    fmt = value.strip().lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise typer.BadParameter(f"unknown plot format {value!r}; use {', '.join(PLOT_FORMATS)}.")
    return fmt


PlotFormatOpt = Annotated[
    str,
    typer.Option(
        "--plot-format",
        callback=check_plot_format,
        metavar="FORMAT",
        help="File format of the plots: png, svg or pdf (vector, for publication figures).",
    ),
]


def window_step(seq_len: int, stride: int | None) -> int:
    """The sliding-window step of ``--seq-len``/``--stride`` (default: half the window), checked.

    Raises:
        typer.BadParameter: a window shorter than 2 tokens, or a step outside 1..seq_len.
    """
    if seq_len < 2:
        raise typer.BadParameter(f"--seq-len {seq_len} is too short; use at least 2.")
    step = stride if stride is not None else max(1, seq_len // 2)
    if not 1 <= step <= seq_len:
        raise typer.BadParameter(f"--stride {step} must be between 1 and --seq-len ({seq_len}).")
    return step
