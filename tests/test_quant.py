"""Quantised checkpoints run streamed: FP8 block scales and MXFP4, against a reference dequantisation.

Each test writes a tiny checkpoint in the hub's exact quantised layout (DeepSeek-V3's
``weight`` + ``weight_scale_inv``; gpt-oss's ``*_blocks`` + ``*_scales``), dequantises it
independently here in numpy into an ordinary checkpoint, and checks that streaming the
quantised one gives the same logits as transformers running the reference.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file

from moescope.execution.stream import StreamedModel
from tests.tiny import tiny_model

_FP4 = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32
)
_BLOCK = 16


def _logits_ref(path: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, experts_implementation="eager"
    ).eval()
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _logits_streamed(path: Path, ids: torch.Tensor) -> torch.Tensor:
    sm = StreamedModel(path, dtype="float32")
    got: dict[int, Any] = {}
    sm.run(
        [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
        logits=lambda b, t: got.__setitem__(b, t),
    )
    return got[0]


def _write(path: Path, tensors: dict[str, Any], config: dict[str, Any], numpy: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    (save_np if numpy else save_file)(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_fp8_block_scales(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny_model("deepseek_v3").save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    quant: dict[str, Any] = {}
    ref: dict[str, np.ndarray] = {}
    for name, w in load_file(str(tmp_path / "src" / "model.safetensors")).items():
        w = w.float()
        is_linear = w.ndim == 2 and not any(
            s in name for s in ("norm", "embed", "lm_head", "mlp.gate.weight")
        )
        if not is_linear:
            quant[name] = w
            ref[name] = w.numpy()
            continue
        out, inp = w.shape
        so, si = math.ceil(out / _BLOCK), math.ceil(inp / _BLOCK)
        scale = np.zeros((so, si), np.float32)
        q = torch.empty(out, inp, dtype=torch.float8_e4m3fn)
        for a in range(so):
            for b in range(si):
                blk = w[a * _BLOCK : (a + 1) * _BLOCK, b * _BLOCK : (b + 1) * _BLOCK]
                scale[a, b] = max(float(blk.abs().max()), 1e-8) / 448.0
                q[a * _BLOCK : (a + 1) * _BLOCK, b * _BLOCK : (b + 1) * _BLOCK] = (blk / scale[a, b]).to(
                    q.dtype
                )
        quant[name] = q
        quant[name[: -len("weight")] + "weight_scale_inv"] = torch.from_numpy(scale)
        # the reference: every element times the scale of its block, in float32
        rows = np.arange(out)[:, None] // _BLOCK
        cols = np.arange(inp)[None, :] // _BLOCK
        ref[name] = q.float().numpy() * scale[rows, cols]
    qcfg = {**config, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                              "weight_block_size": [_BLOCK, _BLOCK]}}  # fmt: skip
    _write(tmp_path / "fp8", quant, qcfg)
    _write(tmp_path / "ref", ref, config, numpy=True)
    assert sum(k.endswith("weight_scale_inv") for k in quant) >= 6
    ids = torch.randint(3, 99, (2, 10), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_logits_streamed(tmp_path / "fp8", ids), _logits_ref(tmp_path / "ref", ids))


def _mxfp4_encode(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[..., rows, cols]`` float → blocks ``[..., rows, cols/32, 16]`` and E8M0 scales."""
    *lead, rows, cols = w.shape
    g = w.reshape(*lead, rows, cols // 32, 32)
    amax = np.maximum(np.abs(g).max(-1), 1e-30)
    exp = np.ceil(np.log2(amax / 6.0)).astype(np.int32)
    scaled = g / np.ldexp(1.0, exp)[..., None]
    codes = np.abs(scaled[..., None] - _FP4).argmin(-1).astype(np.uint8)  # nearest FP4 value
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.astype(np.uint8), (exp + 127).astype(np.uint8)


def _mxfp4_decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    lo, hi = _FP4[blocks & 0x0F], _FP4[blocks >> 4]
    vals = np.stack([lo, hi], -1).reshape(*blocks.shape[:-1], 32)
    vals = vals * np.ldexp(1.0, scales.astype(np.int32) - 127)[..., None]
    return vals.reshape(*blocks.shape[:-2], -1).astype(np.float32)


def test_mxfp4_experts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny_model("gpt_oss", intermediate_size=64).save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    quant: dict[str, np.ndarray] = {}
    ref: dict[str, np.ndarray] = {}
    packed = 0
    for name, w in load_file(str(tmp_path / "src" / "model.safetensors")).items():
        arr = w.float().numpy()
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stored = np.ascontiguousarray(arr.transpose(0, 2, 1))  # hub layout: [E, out, in]
            blocks, scales = _mxfp4_encode(stored)
            quant[name + "_blocks"], quant[name + "_scales"] = blocks, scales
            ref[name] = np.ascontiguousarray(_mxfp4_decode(blocks, scales).transpose(0, 2, 1))
            packed += 1
        else:
            quant[name] = arr
            ref[name] = arr
    assert packed == 2 * config["num_hidden_layers"]
    qcfg = {**config, "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}  # fmt: skip
    _write(tmp_path / "mxfp4", quant, qcfg, numpy=True)
    _write(tmp_path / "ref", ref, config, numpy=True)
    ids = torch.randint(3, 99, (2, 10), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_logits_streamed(tmp_path / "mxfp4", ids), _logits_ref(tmp_path / "ref", ids))


def test_dequantize_mxfp4_nibble_order() -> None:
    from moescope.execution.quant import dequantize_mxfp4

    # byte 0x21: low nibble 1 (0.5) first, high nibble 2 (1.0) second; scale 128 doubles
    blocks = torch.tensor([[0x21] + [0] * 15], dtype=torch.uint8)
    scales = torch.tensor([128], dtype=torch.uint8)
    vals = dequantize_mxfp4(blocks, scales, torch.float32)
    assert vals.shape == (32,) and vals[:3].tolist() == [1.0, 2.0, 0.0]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_other_quantisation_is_refused(method: str, tmp_path: Path) -> None:
    from moescope.errors import MoescopeError

    torch.manual_seed(0)
    tiny_model("mixtral").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoescopeError, match="not streamed"):
        StreamedModel(tmp_path)
