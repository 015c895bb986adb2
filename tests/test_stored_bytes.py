"""``weights as stored`` from a config (``quantization_config`` included) against moescope's own
header path on a faithful headers-only layout of the same checkpoint (#20).

The layouts are written here from the config fields, the way the hub checkpoints store them
(per-expert FP8 matrices with F32 ``weight_scale_inv`` blocks and an MTP layer for DeepSeek-V3,
MXFP4 ``*_blocks``/``*_scales`` for gpt-oss, AutoGPTQ's packed int32 tensors), as sparse
safetensors files: the headers are real, the data regions are holes.
"""

from __future__ import annotations

import json
from math import ceil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from moescope.accounting.params import count_params
from moescope.cli.app import app
from tests.hubstub import write_sparse_shard

ROOT = Path(__file__).resolve().parent.parent
Layout = dict[str, tuple[str, tuple[int, ...]]]


def _sample(name: str) -> dict[str, Any]:
    cfg = json.loads((ROOT / "sample_configs" / f"{name}.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_moescope")}


def _write(d: Path, cfg: dict[str, Any], shards: list[Layout]) -> str:
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    wm: dict[str, str] = {}
    for i, t in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_sparse_shard(d / name, t)
        wm.update(dict.fromkeys(t, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return str(d)


def _deepseek_v3_layout(c: dict[str, Any]) -> list[Layout]:
    """DeepSeek-V3 / Kimi-K2 as published: every linear layer F8_E4M3 with an F32 128x128
    ``weight_scale_inv``; embeddings, norms, routers and heads BF16; the F32 correction bias;
    ``num_nextn_predict_layers`` MTP layers after the decoder, each with its own embedding,
    ``enorm``/``hnorm``, BF16 ``eh_proj`` and ``shared_head``."""
    h, v = c["hidden_size"], c["vocab_size"]
    heads, ql, kl = c["num_attention_heads"], c["q_lora_rank"], c["kv_lora_rank"]
    rope, nope, vd = c["qk_rope_head_dim"], c["qk_nope_head_dim"], c["v_head_dim"]
    e, mi, dense = c["n_routed_experts"], c["moe_intermediate_size"], c["first_k_dense_replace"]
    bo, bi = c["quantization_config"]["weight_block_size"]

    def fp8(t: Layout, name: str, out: int, inp: int) -> None:
        t[f"{name}.weight"] = ("F8_E4M3", (out, inp))
        t[f"{name}.weight_scale_inv"] = ("F32", (ceil(out / bo), ceil(inp / bi)))

    def mlp(t: Layout, p: str, inter: int) -> None:
        fp8(t, f"{p}.gate_proj", inter, h)
        fp8(t, f"{p}.up_proj", inter, h)
        fp8(t, f"{p}.down_proj", h, inter)

    def layer(i: int) -> Layout:
        p = f"model.layers.{i}"
        t: Layout = {f"{p}.input_layernorm.weight": ("BF16", (h,))}
        fp8(t, f"{p}.self_attn.q_a_proj", ql, h)
        t[f"{p}.self_attn.q_a_layernorm.weight"] = ("BF16", (ql,))
        fp8(t, f"{p}.self_attn.q_b_proj", heads * (nope + rope), ql)
        fp8(t, f"{p}.self_attn.kv_a_proj_with_mqa", kl + rope, h)
        t[f"{p}.self_attn.kv_a_layernorm.weight"] = ("BF16", (kl,))
        fp8(t, f"{p}.self_attn.kv_b_proj", heads * (nope + vd), kl)
        fp8(t, f"{p}.self_attn.o_proj", h, heads * vd)
        t[f"{p}.post_attention_layernorm.weight"] = ("BF16", (h,))
        if i < dense:
            mlp(t, f"{p}.mlp", c["intermediate_size"])
            return t
        t[f"{p}.mlp.gate.weight"] = ("BF16", (e, h))
        t[f"{p}.mlp.gate.e_score_correction_bias"] = ("F32", (e,))
        for j in range(e):
            mlp(t, f"{p}.mlp.experts.{j}", mi)
        mlp(t, f"{p}.mlp.shared_experts", mi * c["n_shared_experts"])
        return t

    n = c["num_hidden_layers"]
    shards = [layer(i) for i in range(n)]
    for i in range(n, n + c.get("num_nextn_predict_layers", 0)):
        t = layer(i)
        p = f"model.layers.{i}"
        t[f"{p}.embed_tokens.weight"] = ("BF16", (v, h))
        t[f"{p}.enorm.weight"] = ("BF16", (h,))
        t[f"{p}.hnorm.weight"] = ("BF16", (h,))
        t[f"{p}.eh_proj.weight"] = ("BF16", (h, 2 * h))
        t[f"{p}.shared_head.norm.weight"] = ("BF16", (h,))
        t[f"{p}.shared_head.head.weight"] = ("BF16", (v, h))
        shards.append(t)
    shards.append(
        {
            "model.embed_tokens.weight": ("BF16", (v, h)),
            "model.norm.weight": ("BF16", (h,)),
            "lm_head.weight": ("BF16", (v, h)),
        }
    )
    return shards


def _gpt_oss_layout(c: dict[str, Any]) -> list[Layout]:
    """gpt-oss as published: experts' projections as MXFP4 ``*_blocks`` ``[E, out, in/32, 16]``
    and ``*_scales`` ``[E, out, in/32]`` (U8), everything else BF16."""
    h, v, e, inter = c["hidden_size"], c["vocab_size"], c["num_local_experts"], c["intermediate_size"]
    heads, kv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    shards: list[Layout] = []
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t: Layout = {f"{p}.input_layernorm.weight": ("BF16", (h,))}
        for proj, out, inp in (
            ("q", heads * hd, h),
            ("k", kv * hd, h),
            ("v", kv * hd, h),
            ("o", h, heads * hd),
        ):
            t[f"{p}.self_attn.{proj}_proj.weight"] = ("BF16", (out, inp))
            t[f"{p}.self_attn.{proj}_proj.bias"] = ("BF16", (out,))
        t[f"{p}.self_attn.sinks"] = ("BF16", (heads,))
        t[f"{p}.post_attention_layernorm.weight"] = ("BF16", (h,))
        t[f"{p}.mlp.router.weight"] = ("BF16", (e, h))
        t[f"{p}.mlp.router.bias"] = ("BF16", (e,))
        for proj, out, inp in (("gate_up_proj", 2 * inter, h), ("down_proj", h, inter)):
            t[f"{p}.mlp.experts.{proj}_blocks"] = ("U8", (e, out, inp // 32, 16))
            t[f"{p}.mlp.experts.{proj}_scales"] = ("U8", (e, out, inp // 32))
            t[f"{p}.mlp.experts.{proj}_bias"] = ("BF16", (e, out))
        shards.append(t)
    shards.append(
        {
            "model.embed_tokens.weight": ("BF16", (v, h)),
            "model.norm.weight": ("BF16", (h,)),
            "lm_head.weight": ("BF16", (v, h)),
        }
    )
    return shards


def _check(tmp_path: Path, name: str, cfg: dict[str, Any], shards: list[Layout]) -> None:
    headers = count_params(_write(tmp_path / name, cfg, shards))
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    config = count_params(str(tmp_path / f"{name}.json"))
    assert headers.weight_bytes_source == "headers" and config.weight_bytes_source == "config"
    assert headers.weight_bytes and config.weight_bytes
    assert abs(config.weight_bytes - headers.weight_bytes) <= 0.01 * headers.weight_bytes, (
        config.weight_bytes,
        headers.weight_bytes,
    )
    assert config.memory_bytes["stored"] == config.weight_bytes
    assert config.mtp_params == headers.mtp_params
    assert config.total_params == headers.total_params


@pytest.mark.parametrize("name", ["DeepSeek-V3", "Kimi-K2-Instruct"])
def test_fp8_config_estimate_equals_the_headers(tmp_path: Path, name: str) -> None:
    """DeepSeek-V3's 641 GiB (not 1.22 TiB as bf16), its MTP layer counted from the config."""
    cfg = _sample(name)
    _check(tmp_path, name, cfg, _deepseek_v3_layout(cfg))
    if name == "DeepSeek-V3":
        assert count_params(str(ROOT / "sample_configs" / "DeepSeek-V3.json")).mtp_params > 11e9


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
def test_mxfp4_config_estimate_equals_the_headers(tmp_path: Path, name: str) -> None:
    """gpt-oss's config has no torch_dtype: stored bytes were 0; now the MXFP4 size."""
    cfg = _sample(name)
    _check(tmp_path, name, cfg, _gpt_oss_layout(cfg))


def test_unknown_stored_size_is_null_not_zero(tmp_path: Path) -> None:
    cfg = _sample("Mixtral-8x7B-v0.1")
    cfg.pop("torch_dtype", None)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    r = count_params(str(tmp_path / "c.json"))
    assert r.weight_bytes is None and r.memory_bytes["stored"] is None and r.weight_bytes_source is None


_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "torch_dtype": "float16", "tie_word_embeddings": False,
}  # fmt: skip


def _llama_layout(pack: Any) -> list[Layout]:
    """A tiny llama with every linear layer in ``pack(t, name, out, in)``'s storage."""
    h, inter, v = _LLAMA["hidden_size"], _LLAMA["intermediate_size"], _LLAMA["vocab_size"]
    kv = h // 4 * 2
    t: Layout = {"model.embed_tokens.weight": ("F16", (v, h)), "lm_head.weight": ("F16", (v, h))}
    t["model.norm.weight"] = ("F16", (h,))
    for i in range(2):
        p = f"model.layers.{i}"
        for n in ("input_layernorm", "post_attention_layernorm"):
            t[f"{p}.{n}.weight"] = ("F16", (h,))
        for name, out, inp in (
            ("self_attn.q_proj", h, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h), ("mlp.gate_proj", inter, h), ("mlp.up_proj", inter, h),
            ("mlp.down_proj", h, inter),
        ):  # fmt: skip
            pack(t, f"{p}.{name}", out, inp)
    return [t]


def _gptq(t: Layout, name: str, out: int, inp: int) -> None:
    """AutoGPTQ 4-bit, group 128: packed int32 weights and zeros, fp16 scales, int32 g_idx."""
    t[f"{name}.qweight"] = ("I32", (inp // 8, out))
    t[f"{name}.qzeros"] = ("I32", (inp // 128, out // 8))
    t[f"{name}.scales"] = ("F16", (inp // 128, out))
    t[f"{name}.g_idx"] = ("I32", (inp,))


def _awq(t: Layout, name: str, out: int, inp: int) -> None:
    t[f"{name}.qweight"] = ("I32", (inp, out // 8))
    t[f"{name}.qzeros"] = ("I32", (inp // 128, out // 8))
    t[f"{name}.scales"] = ("F16", (inp // 128, out))


def _ct_w4a16(t: Layout, name: str, out: int, inp: int) -> None:
    """compressed-tensors pack-quantized, 4-bit group 128 symmetric."""
    t[f"{name}.weight_packed"] = ("I32", (out, inp // 8))
    t[f"{name}.weight_scale"] = ("F16", (out, inp // 128))
    t[f"{name}.weight_shape"] = ("I32", (2,))


@pytest.mark.parametrize(
    ("method", "pack", "quant"),
    [
        ("gptq", _gptq, {"quant_method": "gptq", "bits": 4, "group_size": 128}),
        ("awq", _awq, {"quant_method": "awq", "bits": 4, "group_size": 128}),
        (
            "compressed-tensors",
            _ct_w4a16,
            {
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "ignore": ["lm_head"],
                "config_groups": {
                    "group_0": {
                        "targets": ["Linear"],
                        "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128},
                    }
                },
            },
        ),
    ],
)
def test_integer_quantisation_estimates(
    tmp_path: Path, method: str, pack: Any, quant: dict[str, Any]
) -> None:
    """The packed formats are not read as params (their names are not parameters the
    classifier knows), so only the stored bytes are compared."""
    cfg = {**_LLAMA, "quantization_config": quant}
    headers = count_params(_write(tmp_path / method, cfg, _llama_layout(pack)))
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    config = count_params(str(tmp_path / "c.json"))
    assert config.weight_bytes_format and method in config.weight_bytes_format
    assert config.weight_bytes == headers.weight_bytes


def test_table_labels_the_stored_size_and_gives_components_a_heading() -> None:
    res = CliRunner().invoke(
        app, ["params", "demo", str(ROOT / "sample_configs" / "DeepSeek-V3.json")], catch_exceptions=False
    )
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    flops = next(i for i, line in enumerate(lines) if "FLOPs / token" in line)
    heading = next(i for i, line in enumerate(lines) if "params by component" in line)
    embedding = next(i for i, line in enumerate(lines) if "  embedding" in line)
    assert flops < heading < embedding
    assert "read from headers" in res.stdout and "estimated from config" in res.stdout


def test_a_malformed_modules_to_not_convert_is_one_line(tmp_path: Path) -> None:
    """A non-list ``modules_to_not_convert`` (found by the config fuzz test) is a config error, not a traceback."""
    root = Path(__file__).resolve().parents[1] / "sample_configs"
    cfg = json.loads((root / "gpt-oss-20b.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"] = 1
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["params", str(path)])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "modules_to_not_convert" in res.output and len(res.output.strip().splitlines()) == 1
