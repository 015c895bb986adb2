"""Dequantise the two quantised storage formats published MoE checkpoints use, per tensor.

- **FP8 with block scales** (DeepSeek-V3, Kimi-K2, GLM-4.5-FP8 layout): ``X.weight`` is
  ``F8_E4M3`` ``[out, in]`` and ``X.weight_scale_inv`` is ``F32`` ``[ceil(out/bo), ceil(in/bi)]``
  (blocks of ``bo × bi``, 128 × 128 in practice): ``W = fp8 × scale_inv`` broadcast over
  each block.
- **MXFP4** (gpt-oss layout): ``X_blocks`` is ``U8`` ``[..., rows, G, 16]`` (two FP4 E2M1
  values per byte, low nibble first, 32 values per group) and ``X_scales`` is ``U8``
  ``[..., rows, G]`` (E8M0 exponents, bias 127): ``W[..., rows, 32g + j] = fp4 × 2**(s - 127)``.
  gpt-oss experts store ``[E, out, in]`` this way while the module holds ``[E, in, out]``, so
  :func:`dequantize_state` transposes the last two dimensions for ``mlp.experts.*`` tensors.

Used by layer streaming (:mod:`moescope.execution.stream`), which builds the skeleton without the
quantisation config and feeds it dequantised tensors in the compute dtype.
"""

from __future__ import annotations

from typing import Any

#: FP4 E2M1 values by 4-bit code (sign bit 3)
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

_SCALE_INV = ".weight_scale_inv"
_BLOCKS = "_blocks"
_SCALES = "_scales"


def dequantize_fp8_blocks(
    weight: Any, scale_inv: Any, dtype: Any, block: tuple[int, int] | None = None
) -> Any:
    """``[out, in]`` FP8 weight times its per-block inverse scale, in ``dtype``.

    ``block`` is the config's ``weight_block_size``; without it the block is inferred from
    the shapes, which is right only when the dimensions are multiples of it.
    """
    import torch

    out, inp = weight.shape
    so, si = scale_inv.shape
    bo, bi = block if block is not None else (-(-out // so), -(-inp // si))
    if -(-out // bo) != so or -(-inp // bi) != si:
        from moescope.errors import CheckpointError

        raise CheckpointError(
            f"an FP8 weight {list(weight.shape)} has scales {list(scale_inv.shape)}, which do not match "
            f"blocks of {bo}x{bi}; check quantization_config.weight_block_size."
        )
    scale = scale_inv.float().repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)[:, :inp]
    return (weight.to(torch.float32) * scale).to(dtype)


def dequantize_mxfp4(blocks: Any, scales: Any, dtype: Any) -> Any:
    """``[..., G, 16]`` packed FP4 with ``[..., G]`` E8M0 scales → ``[..., 32·G]`` in ``dtype``."""
    import torch

    lut = torch.tensor(FP4_E2M1, dtype=torch.float32)
    b = blocks.to(torch.uint8)
    lo = lut[(b & 0x0F).long()]
    hi = lut[(b >> 4).long()]
    vals = torch.stack((lo, hi), dim=-1).flatten(-2)  # [..., G, 32]: low nibble first
    vals = torch.ldexp(vals, scales.to(torch.int32).unsqueeze(-1) - 127)
    return vals.flatten(-2).to(dtype)


def quantized_keys(keys: list[str]) -> bool:
    """Whether any of ``keys`` is FP8-block or MXFP4 storage."""
    return any(k.endswith((_SCALE_INV, _BLOCKS, _SCALES)) for k in keys)


def dequantize_state(
    state: dict[str, Any], dtype: Any, block: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Replace FP8-block and MXFP4 pairs in ``state`` by dequantised tensors named as unquantised.

    Args:
        state: name → tensor or lazy safetensors slice (``[:]`` materialises it).
        dtype: compute dtype of the result.
        block: FP8 ``weight_block_size`` from the quantisation config.

    Returns:
        A new dict: scales gone, ``X.weight`` dequantised, ``X_blocks`` + ``X_scales`` → ``X``.
    """
    out: dict[str, Any] = {}
    for name, value in state.items():
        if name.endswith((_SCALE_INV, _SCALES)):
            continue
        scale_name = name[: -len(".weight")] + _SCALE_INV if name.endswith(".weight") else None
        if scale_name is not None and scale_name in state:
            out[name] = dequantize_fp8_blocks(_full(value), _full(state[scale_name]), dtype, block)
        elif name.endswith(_BLOCKS) and name[: -len(_BLOCKS)] + _SCALES in state:
            base = name[: -len(_BLOCKS)]
            w = dequantize_mxfp4(_full(value), _full(state[base + _SCALES]), dtype)
            out[base] = w.transpose(-1, -2).contiguous() if ".experts." in base else w
        else:
            out[name] = value
    return out


def _full(value: Any) -> Any:
    return (
        value
        if hasattr(value, "dtype") and hasattr(value, "shape") and not hasattr(value, "get_shape")
        else value[:]
    )
