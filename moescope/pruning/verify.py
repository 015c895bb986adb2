"""Verify stage: reload a pruned checkpoint with transformers and run one forward pass.

The reload is planned like every command that runs a model
(:func:`moescope.execution.plan.plan_execution`: ``--max-memory``, ``--stream/--no-stream``,
``--device-map auto``, and the same stderr line): a pruned checkpoint that fits the budget is
loaded whole with ``from_pretrained``; one that does not is **streamed layer by layer**
(:class:`moescope.execution.stream.StreamedModel`), so pruning a model bigger than memory
does not fail at its last step. Both paths check the same things: every checkpoint tensor is
a parameter of the model (no unexpected or mis-shaped key), every parameter is loaded (none
missing), and the forward gives finite logits.

The reload uses the checkpoint's own dtype unless told otherwise (``dtype="auto"``), so a
bf16 checkpoint is not verified in float32 (twice its size in memory), on the device asked
for; the experts implementation is the device's default (:mod:`moescope.execution.load`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moescope import families
from moescope.errors import CheckpointError
from moescope.pruning.layout import config_num_experts


def verify_checkpoint(
    path: str | Path,
    *,
    tokens: int = 8,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    max_memory: str | None = None,
    stream: bool | None = None,
    device_map: str | None = None,
    on_plan: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Reload a checkpoint with transformers (whole, streamed or device-mapped) and run one forward pass.

    Args:
        path: the checkpoint directory.
        tokens: length of the test sequence.
        device: torch device for the reload (``cpu``, ``cuda``, ``cuda:N``, ``mps``).
        dtype: ``auto`` (the checkpoint's dtype), ``float32``, ``bfloat16`` or ``float16``.
        trust_remote_code: allow the checkpoint's own modelling code (copied from the source).
        max_memory: memory budget (``--max-memory``); default about 85% of what is available.
        stream: ``True`` streams, ``False`` loads whole, ``None`` decides by size.
        device_map: ``auto`` hands placement to accelerate.
        on_plan: called with the one line that says how the checkpoint is run, and why.

    Returns:
        ``{"parameters", "logits_shape", "num_experts", "dtype", "device", "mode"}``
        (``mode``: ``whole``, ``stream`` or ``device_map``).

    Raises:
        CheckpointError: missing or unexpected keys, a load failure, or non-finite logits.
    """
    from moescope.execution.plan import plan_execution

    config = json.loads((Path(path) / "config.json").read_text())
    plan = plan_execution(
        str(path), dtype=dtype, device=device, max_memory=max_memory, stream=stream, device_map=device_map
    )
    if on_plan is not None:
        on_plan(f"verifying the pruned checkpoint: {plan.message}")
    if plan.mode == "stream":
        check = _verify_streamed(Path(path), tokens, device, dtype, trust_remote_code)
    else:
        check = _verify_loaded(Path(path), tokens, device, dtype, trust_remote_code, device_map, max_memory)
    return {**check, "num_experts": config_num_experts(config), "mode": plan.mode}


def _probe_ids(vocab: int, tokens: int) -> Any:
    import torch

    return ((torch.arange(tokens) * 7 + 3) % vocab)[None]


def _bug(path: Path, bad: dict[str, Any]) -> CheckpointError:
    return CheckpointError(
        f"{path}: pruned checkpoint loads with {bad}; this is a moescope bug, please report."
    )


def _verify_loaded(
    path: Path,
    tokens: int,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    device_map: str | None,
    max_memory: str | None,
) -> dict[str, Any]:
    """``from_pretrained`` (whole, or placed by accelerate) with the loading report, then one forward."""
    import torch
    import transformers

    from moescope.execution.load import auto_class, default_experts_implementation, torch_dtype

    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(dtype),
        "output_loading_info": True,
        "trust_remote_code": trust_remote_code,
    }
    offload: Any = None
    if device_map is not None:
        import tempfile

        offload = tempfile.TemporaryDirectory(prefix="moescope-verify-offload-")
        kwargs.update(device_map=device_map, offload_folder=offload.name)
        if max_memory and "=" in max_memory:
            pairs = (part.split("=", 1) for part in max_memory.split(","))
            kwargs["max_memory"] = {int(k) if k.isdigit() else k: v for k, v in pairs}
    transformers.logging.set_verbosity_error()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # stderr stays quiet in --json runs
    model: Any
    info: dict[str, Any]
    record = families.lookup(families.family_of(json.loads((path / "config.json").read_text())))
    if record is not None and record.experts_implementation:
        kwargs["experts_implementation"] = default_experts_implementation(device)
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        head, _kind = auto_class(config)
        model, info = head.from_pretrained(str(path), config=config, **kwargs)
        if device_map is None:
            model.to(device)
        model.eval()
    except CheckpointError:
        raise
    except Exception as exc:  # transformers raises many types; report the first line
        raise CheckpointError(f"{path}: transformers cannot load the pruned checkpoint: {exc}") from exc
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise _bug(path, bad)
    ids = _probe_ids(int(model.config.get_text_config().vocab_size), tokens)
    first = next(model.parameters())
    with torch.no_grad():
        dev = first.device if device_map is None else device
        inputs = {"input_ids": ids.to(dev)}
        if getattr(model.config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids[:, :1].to(dev)
        out = model(**inputs)
        logits = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    if not torch.isfinite(logits).all():
        raise CheckpointError(f"{path}: the pruned model's logits are not finite.")
    del offload  # the offload folder outlives the forward
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "logits_shape": list(logits.shape),
        "dtype": str(first.dtype).removeprefix("torch."),
        "device": str(first.device),
    }


def _verify_streamed(
    path: Path, tokens: int, device: str, dtype: str, trust_remote_code: bool
) -> dict[str, Any]:
    """One layer resident at a time: every layer's tensors must load into exactly its parameters."""
    import torch

    from moescope.errors import MoescopeError
    from moescope.execution.stream import StreamedModel

    try:
        streamed = StreamedModel(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    except MoescopeError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: transformers cannot load the pruned checkpoint: {exc}") from exc
    try:
        ids = _probe_ids(int(streamed.config.get_text_config().vocab_size), tokens)
        missing: list[str] = [
            n for n, p in streamed.model.named_parameters() if p.is_meta and not _in_layer(n, streamed)
        ]
        dtypes: set[str] = set()

        def after(layer: int, _batch: int) -> None:
            prefix = _layer_prefix(streamed, layer)
            for name, p in streamed.layers[layer].named_parameters():
                if p.is_meta:
                    missing.append(f"{prefix}{name}")
                else:
                    dtypes.add(str(p.dtype).removeprefix("torch."))

        out: list[Any] = []
        streamed.run(
            [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
            after_layer=after,
            logits=lambda _b, t: out.append(t.float()),
        )
        bad: dict[str, Any] = {}
        if missing:
            bad["missing_keys"] = sorted(missing)
        if streamed.unexpected_keys:
            bad["unexpected_keys"] = sorted(streamed.unexpected_keys)
        if streamed.mismatched_keys:
            bad["mismatched_keys"] = sorted(streamed.mismatched_keys)
        if bad:
            raise _bug(path, bad)
        if not out or not torch.isfinite(out[0]).all():
            raise CheckpointError(f"{path}: the pruned model's logits are not finite.")
        return {
            "parameters": sum(p.numel() for p in streamed.model.parameters()),
            "logits_shape": list(out[0].shape),
            "dtype": next(iter(dtypes), str(streamed.dtype).removeprefix("torch.")),
            "device": str(streamed.device),
            "bytes_read": streamed.bytes_read,
        }
    finally:
        streamed.close()


def _layer_prefix(streamed: Any, layer: int) -> str:
    for name, module in streamed.model.named_modules():
        if module is streamed.layers[layer]:
            return f"{name}."
    return f"layers.{layer}."


def _in_layer(name: str, streamed: Any) -> bool:
    """Whether a parameter name belongs to a decoder layer (those are loaded one at a time)."""
    prefix = _layer_prefix(streamed, 0).rsplit(".", 2)[0] + "."
    return name.startswith(prefix)
