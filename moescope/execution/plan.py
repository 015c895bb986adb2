"""How a command runs the model: whole, streamed layer by layer, or placed by accelerate.

:func:`plan_execution` reads only the safetensors headers (the weights' bytes in the chosen
dtype; quantised weights count as dequantised) and compares them with the memory budget
(``--max-memory``, default about 85% of what is available on the device);
:func:`load_runner` builds what the plan says: a loaded model, or a
:class:`moescope.execution.stream.StreamedModel`.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moescope.checkpoint.ref import ResolvedRef

#: share of the budget the kept hidden states of one streamed chunk may use
HIDDEN_SHARE = 0.5
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30})


def parse_size(text: str) -> int:
    """``"20GiB"``, ``"512MB"``, ``"1.5g"`` or a plain byte count → bytes.

    Raises:
        ValueError: not a size.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = (m.group(2) or "b").lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"--max-memory {text!r}: expected a size such as 20GiB, 512MB or 8g.")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"--max-memory {text!r}: must be positive.")
    return value


def available_memory(device: str = "cpu") -> int:
    """Bytes available now: free GPU memory for ``cuda``, else ``MemAvailable`` (or total RAM)."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def default_budget(device: str = "cpu") -> int:
    """About 85% of the memory available on ``device``."""
    return int(0.85 * available_memory(device))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def describe_plan(stream: bool, model_bytes: int, budget: int) -> str:
    """The stderr line that says how a command runs the model and why."""
    if stream:
        return (
            f"streaming the model layer by layer: its weights ({_gib(model_bytes)}) exceed the memory "
            f"budget ({_gib(budget)}; set it with --max-memory)"
        )
    return (
        f"loading the model whole: its weights ({_gib(model_bytes)}) fit the memory budget ({_gib(budget)})"
    )


@dataclass(frozen=True)
class Execution:
    """How a command runs the model, and why.

    Attributes:
        mode: ``whole`` (``from_pretrained`` then ``.to(device)``), ``stream`` (layer by
            layer, :class:`StreamedModel`) or ``device_map`` (accelerate's placement).
        budget: the memory budget in bytes.
        model_bytes: the weights' bytes in the chosen dtype.
        message: one line for stderr.
    """

    mode: str
    budget: int
    model_bytes: int
    message: str


def plan_execution(
    ref: ResolvedRef | str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    max_memory: str | None = None,
    stream: bool | None = None,
    device_map: str | None = None,
) -> Execution:
    """Decide whole, streamed or accelerate-placed execution from the headers and the budget.

    Args:
        ref: model reference (headers are read, never the weights).
        revision: hub revision.
        dtype: compute dtype name (``auto``: as stored).
        device: torch device.
        max_memory: ``--max-memory`` (a size; default about 85% of what is available).
        stream: ``--stream``/``--no-stream``; None decides by size.
        device_map: ``auto`` hands placement to accelerate.
    """
    if device_map is not None and stream:
        from moescope.errors import MoescopeError

        raise MoescopeError(
            "--stream and --device-map auto are two ways to fit a model: pass one (streaming reads each "
            "weight once per pass; accelerate re-reads offloaded weights every forward)."
        )
    single = max_memory is not None and "=" not in max_memory
    budget = parse_size(max_memory) if single and max_memory else default_budget(device)
    size = weight_bytes_of(ref, revision, dtype)
    if device_map is not None:
        msg = f"placing the model with accelerate (device_map={device_map}): weights {_gib(size)}"
        return Execution("device_map", budget, size, msg)
    if stream is None:
        stream = size > budget
        return Execution("stream" if stream else "whole", budget, size, describe_plan(stream, size, budget))
    why = "--stream" if stream else "--no-stream"
    return Execution(
        "stream" if stream else "whole",
        budget,
        size,
        f"{describe_plan(stream, size, budget).split(':')[0]} ({why})",
    )


def weight_bytes_of(ref: ResolvedRef | str, revision: str | None, dtype: str) -> int:
    """Bytes of the weights in ``dtype``, from safetensors headers (config-only: 0)."""
    from moescope.checkpoint.ref import open_checkpoint

    ck = open_checkpoint(ref, revision)
    quantized = any(t.name.endswith(("_scale_inv", "_blocks")) for t in ck.tensors)
    if dtype == "auto" and not quantized:
        return int(sum(t.nbytes for t in ck.tensors))
    item = {"float32": 4}.get(dtype, 2)  # quantised weights are dequantised to bf16 (auto) or dtype
    values = sum(
        t.numel * (2 if t.name.endswith("_blocks") else 1)
        for t in ck.tensors
        if not t.name.endswith(("_scale_inv", "_scales"))
    )
    return int(values * item)


def load_runner(
    model_ref: ResolvedRef | str,
    mode: str,
    revision: str | None,
    dtype: str,
    device: str,
    trust_remote_code: bool,
    max_memory: str | None,
    device_map: str | None,
) -> tuple[Any, Any]:
    """``(model or StreamedModel, tokenizer)`` for an :class:`Execution` mode, with quiet progress bars.

    ``stream`` resolves the reference to a local checkpoint (a hub id is fetched into the HF
    cache first) and builds a :class:`StreamedModel`; ``whole`` and ``device_map`` load with
    :func:`moescope.execution.load.load_model`.
    """
    from transformers.utils import logging as hf_logging

    from moescope.execution.load import load_model, load_tokenizer

    bars = hf_logging.is_progress_bar_enabled()
    if bars and not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # no "Loading weights" bar in logs and pipes
    try:
        if mode == "stream":
            from moescope.checkpoint.ref import local_dir
            from moescope.execution.stream import StreamedModel

            path = local_dir(model_ref, revision)
            streamed = StreamedModel(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
            streamed.model.name_or_path = str(path)
            return streamed, load_tokenizer(str(path), trust_remote_code=trust_remote_code)
        per_device: dict[Any, str] | None = None
        if device_map is not None and max_memory and "=" in max_memory:
            pairs = (part.split("=", 1) for part in max_memory.split(","))
            per_device = {int(k) if k.isdigit() else k: v for k, v in pairs}  # accelerate: GPU ids are ints
        return load_model(
            model_ref,
            revision=revision,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
            device_map=device_map,
            max_memory=per_device,
        )
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def open_model(
    model_ref: ResolvedRef | str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    max_memory: str | None = None,
    stream: bool | None = None,
    device_map: str | None = None,
    on_plan: Any = None,
) -> tuple[Execution, Any, Any]:
    """Plan the execution, say it (``on_plan(line)``), and load: ``(plan, model, tokenizer)``.

    The model is a :class:`moescope.execution.stream.StreamedModel` when the plan streams; the caller
    closes it.
    """
    from moescope.checkpoint.ref import as_ref

    model_ref = as_ref(model_ref, revision)  # decoded once for the plan and the load
    plan = plan_execution(
        model_ref,
        revision=revision,
        dtype=dtype,
        device=device,
        max_memory=max_memory,
        stream=stream,
        device_map=device_map,
    )
    if on_plan is not None:
        on_plan(plan.message)
    model, tokenizer = load_runner(
        model_ref, plan.mode, revision, dtype, device, trust_remote_code, max_memory, device_map
    )
    return plan, model, tokenizer
