"""Verify stage: reload a pruned checkpoint with transformers and run one forward pass.

The reload uses the checkpoint's own dtype unless told otherwise (``dtype="auto"``), so a
bf16 checkpoint is not verified in float32 (twice its size in memory), on the device asked
for; families whose experts accept ``experts_implementation`` (the registry says which) run
the eager loop on CPU, several times faster there than the default.
"""

from __future__ import annotations

import json
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
) -> dict[str, Any]:
    """Reload a checkpoint with transformers and run one forward pass.

    Args:
        path: the checkpoint directory.
        tokens: length of the test sequence.
        device: torch device for the reload (``cpu``, ``cuda``, ``cuda:N``, ``mps``).
        dtype: ``auto`` (the checkpoint's dtype), ``float32``, ``bfloat16`` or ``float16``.
        trust_remote_code: allow the checkpoint's own modelling code (copied from the source).

    Returns:
        ``{"parameters", "logits_shape", "num_experts", "dtype", "device"}``.

    Raises:
        CheckpointError: missing or unexpected keys, a load failure, or non-finite logits.
    """
    import torch
    import transformers

    from moescope.execution.load import auto_class, torch_dtype

    config = json.loads((Path(path) / "config.json").read_text())
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(dtype),
        "output_loading_info": True,
        "trust_remote_code": trust_remote_code,
    }
    record = families.lookup(families.family_of(config))
    if record is not None and record.experts_implementation and device.startswith("cpu"):
        kwargs["experts_implementation"] = "eager"
    transformers.logging.set_verbosity_error()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # stderr stays quiet in --json runs
    model: Any
    info: dict[str, Any]
    try:
        head, _kind = auto_class(transformers.AutoConfig.from_pretrained(str(path)))
        model, info = head.from_pretrained(str(path), **kwargs)
        model.to(device).eval()
    except Exception as exc:  # transformers raises many types; report the first line
        raise CheckpointError(f"{path}: transformers cannot load the pruned checkpoint: {exc}") from exc
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise CheckpointError(
            f"{path}: pruned checkpoint loads with {bad}; this is a moescope bug, please report."
        )
    vocab = int(model.config.get_text_config().vocab_size)
    ids = (torch.arange(tokens) * 7 + 3) % vocab
    with torch.no_grad():
        inputs = {"input_ids": ids[None].to(device)}
        if getattr(model.config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids[None, :1].to(device)
        out = model(**inputs)
        logits = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    if not torch.isfinite(logits).all():
        raise CheckpointError(f"{path}: the pruned model's logits are not finite.")
    param = next(model.parameters())
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "logits_shape": list(logits.shape),
        "num_experts": config_num_experts(config),
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": str(param.device),
    }
