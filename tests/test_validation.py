"""Inputs are validated before any arithmetic (issue 8): every bad config, spec file,
safetensors header or index gives exactly one ``Error:`` line and exit 1 from
``moescope params``, never a traceback, an impossible number or a huge allocation, and its
files are byte-identical afterwards.

Three layers: a case table run through the real CLI, property-based fuzzing of the header
parser and of config validation (the only exception allowed is a ``MoescopeError``), and
the shipped sample configs, which must all still pass.
"""

from __future__ import annotations

import copy
import json
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moescope.accounting.params import account
from moescope.arch.closedform import has_closed_form
from moescope.arch.inventory import DTYPE_BITS
from moescope.arch.moe import moe_spec
from moescope.arch.specfile import spec_to_config
from moescope.arch.validate import validate_config
from moescope.checkpoint.header import parse_header, read_local_header, read_safetensors_header
from moescope.checkpoint.jsonfiles import safe_child
from moescope.checkpoint.ref import Checkpoint
from moescope.errors import CheckpointError, ConfigError, MoescopeError
from tests.safety import assert_clean_error, invoke, snapshot

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_configs"
SAMPLE_CONFIGS = sorted(p for p in SAMPLES.glob("*.json") if p.name != "published.json")
SAMPLE_SPECS = sorted((SAMPLES / "specs").glob("*.json"))

_DELETE = object()

# ---------------------------------------------------------------------------------------
# Builders: each writes its files under a directory and returns (the path to pass to
# `moescope params`, substrings the error line must hold).
# ---------------------------------------------------------------------------------------

Build = Callable[[Path], tuple[Path, tuple[str, ...]]]


def _sample(name: str) -> dict[str, Any]:
    return json.loads((SAMPLES / f"{name}.json").read_text())


def _patched(cfg: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with dotted keys set (or removed with ``_DELETE``)."""
    cfg = copy.deepcopy(cfg)
    for key, value in patch.items():
        *parents, leaf = key.split(".")
        cur = cfg
        for part in parents:
            cur = cur[part]
        if value is _DELETE:
            cur.pop(leaf, None)
        else:
            cur[leaf] = value
    return cfg


def config_case(sample: str, patch: dict[str, Any], *expect: str) -> Build:
    """A sample config (or spec under ``specs/``) with ``patch`` applied, passed as a file."""

    def build(d: Path) -> tuple[Path, tuple[str, ...]]:
        path = d / "cfg.json"
        path.write_text(json.dumps(_patched(_sample(sample), patch)))
        return path, ("cfg.json", *expect)

    return build


def raw_config_case(text: str, *expect: str) -> Build:
    def build(d: Path) -> tuple[Path, tuple[str, ...]]:
        path = d / "cfg.json"
        path.write_text(text)
        return path, ("cfg.json", *expect)

    return build


def _st_bytes(header: dict[str, Any] | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def header_case(
    header: dict[str, Any] | bytes, data_len: int, *expect: str, length: int | None = None
) -> Build:
    """A bare ``.safetensors`` file with ``header`` and ``data_len`` zero bytes of data."""

    def build(d: Path) -> tuple[Path, tuple[str, ...]]:
        path = d / "w.safetensors"
        path.write_bytes(_st_bytes(header, bytes(data_len), length))
        return path, ("w.safetensors", *expect)

    return build


def _t(dtype: str, shape: list[Any], start: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


_GOOD_SHARD = {"model.embed_tokens.weight": _t("F32", [2, 2], 0, 16)}


def index_case(shard_path: Callable[[Path], Any], *expect: str, link: bool = False) -> Build:
    """A checkpoint directory whose index lists one shard at ``shard_path(dir)``; a valid
    safetensors file waits outside the checkpoint (it must never be read)."""

    def build(d: Path) -> tuple[Path, tuple[str, ...]]:
        outside = d / "outside"
        outside.mkdir()
        (outside / "secret.safetensors").write_bytes(_st_bytes(_GOOD_SHARD, bytes(16)))
        ckpt = d / "ckpt"
        ckpt.mkdir()
        (ckpt / "config.json").write_text(json.dumps(_sample("Mistral-7B-v0.1")))
        if link:
            (ckpt / "model-00001-of-00001.safetensors").symlink_to(outside / "secret.safetensors")
        wm = {"model.embed_tokens.weight": shard_path(d)}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
        return ckpt, ("model.safetensors.index.json", *expect)

    return build


def duplicate_tensor_case(d: Path) -> tuple[Path, tuple[str, ...]]:
    ckpt = d / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(_sample("Mistral-7B-v0.1")))
    for name in ("a.safetensors", "b.safetensors"):
        (ckpt / name).write_bytes(_st_bytes(_GOOD_SHARD, bytes(16)))
    return ckpt, ("model.embed_tokens.weight", "both")


def _deep(n: int) -> str:
    return "[" * n + "]" * n


CASES: dict[str, Build] = {
    # --- configs: dimensions --------------------------------------------------------
    "negative_hidden_size": config_case("Mixtral-8x7B-v0.1", {"hidden_size": -4096}, "hidden_size", "-4096"),
    "num_local_experts_0": config_case(
        "Mixtral-8x7B-v0.1", {"num_local_experts": 0}, "num_local_experts is 0", "at least 1 expert"
    ),
    "negative_sliding_window": config_case(
        "Mistral-7B-v0.1", {"sliding_window": -4096}, "sliding_window", "-4096"
    ),
    "sliding_window_0_in_use": config_case("Mistral-7B-v0.1", {"sliding_window": 0}, "sliding_window is 0"),
    "num_hidden_layers_1e12": config_case(
        "Mixtral-8x7B-v0.1", {"num_hidden_layers": 1e12}, "num_hidden_layers", "whole number"
    ),
    "num_hidden_layers_huge_int": config_case(
        "Mixtral-8x7B-v0.1", {"num_hidden_layers": 10**12}, "num_hidden_layers", "at most 10,000"
    ),
    "num_attention_heads_0": config_case(
        "Mixtral-8x7B-v0.1", {"num_attention_heads": 0}, "num_attention_heads is 0"
    ),
    "layers_as_string": config_case("Llama-3-8B", {"num_hidden_layers": "32"}, "num_hidden_layers", '"32"'),
    "hidden_as_float": config_case("Llama-3-8B", {"hidden_size": 4096.5}, "hidden_size", "4096.5"),
    "layers_as_bool": config_case("Llama-3-8B", {"num_hidden_layers": True}, "num_hidden_layers", "true"),
    "vocab_0": config_case("Qwen2.5-7B", {"vocab_size": 0}, "vocab_size is 0"),
    "negative_intermediate": config_case("Llama-2-7b", {"intermediate_size": -1}, "intermediate_size is -1"),
    "hidden_too_large": config_case("Llama-2-7b", {"hidden_size": 4096 * 10**6}, "hidden_size", "at most"),
    "head_dim_0": config_case("Qwen3-30B-A3B", {"head_dim": 0}, "head_dim is 0"),
    "kv_heads_not_dividing": config_case(
        "Mixtral-8x7B-v0.1", {"num_key_value_heads": 3}, "num_key_value_heads is 3", "multiple"
    ),
    "hidden_not_divisible_by_heads": config_case(
        "Mistral-7B-v0.1",
        {"num_attention_heads": 48},
        "hidden_size (4096)",
        "num_attention_heads (48)",
        "head_dim",
    ),
    "tie_word_embeddings_string": config_case(
        "Mixtral-8x7B-v0.1", {"tie_word_embeddings": "false"}, "tie_word_embeddings", "true or false"
    ),
    "model_type_not_string": config_case("Llama-2-7b", {"model_type": 7}, "model_type is 7"),
    "architectures_not_list": config_case(
        "Llama-2-7b", {"architectures": "LlamaForCausalLM"}, "architectures", "list"
    ),
    "layer_types_length": config_case(
        "gpt-oss-20b", {"layer_types": ["full_attention"]}, "layer_types", "24"
    ),
    # --- configs: experts and routing -------------------------------------------------
    "top_k_0": config_case("Mixtral-8x7B-v0.1", {"num_experts_per_tok": 0}, "num_experts_per_tok is 0"),
    "top_k_above_experts": config_case("Qwen3-30B-A3B", {"num_experts_per_tok": 129}, "only 128"),
    "experts_missing": config_case(
        "Mixtral-8x7B-v0.1", {"num_local_experts": _DELETE}, "has no num_local_experts"
    ),
    "experts_too_many": config_case(
        "DeepSeek-V3", {"n_routed_experts": 10**6}, "n_routed_experts", "at most 100,000"
    ),
    "negative_shared_experts": config_case("DeepSeek-V3", {"n_shared_experts": -1}, "n_shared_experts is -1"),
    "topk_group_above_n_group": config_case(
        "DeepSeek-V3", {"topk_group": 9}, "topk_group is 9", "n_group is 8"
    ),
    "experts_not_in_groups": config_case(
        "DeepSeek-V3", {"n_group": 7}, "n_routed_experts (256)", "n_group (7)"
    ),
    "first_k_dense_past_layers": config_case(
        "DeepSeek-V3", {"first_k_dense_replace": 62}, "first_k_dense_replace is 62"
    ),
    "mlp_only_layers_negative": config_case(
        "Qwen2-57B-A14B", {"mlp_only_layers": [-1]}, "mlp_only_layers", "-1"
    ),
    "decoder_sparse_step_0": config_case(
        "Qwen1.5-MoE-A2.7B", {"decoder_sparse_step": 0}, "decoder_sparse_step"
    ),
    "expert_width_missing": config_case(
        "Qwen3-30B-A3B", {"moe_intermediate_size": _DELETE}, "has no moe_intermediate_size"
    ),
    "hidden_size_missing": config_case("Mixtral-8x7B-v0.1", {"hidden_size": _DELETE}, "has no hidden_size"),
    "jamba_attn_period_0": config_case("Jamba-v0.1", {"attn_layer_period": 0}, "attn_layer_period is 0"),
    "jamba_offset_past_period": config_case(
        "Jamba-v0.1", {"expert_layer_offset": 2}, "expert_layer_offset is 2", "expert_layer_period is 2"
    ),
    "llama4_moe_layers_out_of_range": config_case(
        "Llama-4-Scout-17B-16E",
        {"text_config.moe_layers": [0, 99]},
        "text_config.moe_layers",
        "99",
        "48 layers",
    ),
    "text_config_not_object": config_case("Llama-4-Scout-17B-16E", {"text_config": [1]}, "text_config"),
    "switch_experts_0": config_case("switch-base-8", {"num_experts": 0}, "num_experts is 0"),
    # --- DBRX's nested configs --------------------------------------------------------------
    "dbrx_experts_0": config_case(
        "DBRX", {"ffn_config.moe_num_experts": 0}, "ffn_config.moe_num_experts is 0"
    ),
    "dbrx_top_k_above_experts": config_case(
        "DBRX", {"ffn_config.moe_top_k": 17}, "ffn_config.moe_top_k", "only 16"
    ),
    "dbrx_ffn_config_not_object": config_case("DBRX", {"ffn_config": 5}, "ffn_config is 5"),
    "dbrx_kv_heads_not_dividing": config_case(
        "DBRX", {"attn_config.kv_n_heads": 5}, "attn_config.kv_n_heads is 5"
    ),
    "dbrx_width_string": config_case(
        "DBRX", {"ffn_config.ffn_hidden_size": "10752"}, "ffn_config.ffn_hidden_size"
    ),
    # --- malformed JSON -------------------------------------------------------------------
    "config_nested_too_deep": raw_config_case(_deep(100_000), "malformed JSON"),
    "config_int_too_long": raw_config_case(
        '{"model_type": "llama", "hidden_size": ' + "9" * 5000 + "}", "JSON"
    ),
    # --- spec files -------------------------------------------------------------------------
    "spec_moe_layers_out_of_range": config_case(
        "specs/GLaM-64B-64E", {"moe_layers": [1, 3, 64]}, "moe_layers", "64", "fix the spec"
    ),
    "spec_moe_layers_negative": config_case("specs/GLaM-64B-64E", {"moe_layers": [-1]}, "moe_layers", "-1"),
    "spec_moe_layers_not_list": config_case("specs/GLaM-64B-64E", {"moe_layers": "odd"}, "moe_layers"),
    "spec_moe_layers_without_experts": config_case(
        "specs/GPT-3-175B", {"moe_layers": [1]}, "num_experts is 0"
    ),
    "spec_heads_0": config_case("specs/GLaM-64B-64E", {"num_heads": 0}, "num_heads is 0"),
    "spec_top_k_above_experts": config_case("specs/GLaM-64B-64E", {"top_k": 65}, "top_k is 65"),
    "spec_negative_layers": config_case("specs/PaLM-540B", {"num_layers": -2}, "num_layers is -2"),
    "spec_layers_1e12": config_case("specs/PaLM-540B", {"num_layers": 1e12}, "num_layers"),
    "spec_offset_past_step": config_case("specs/GShard-600B", {"moe_offset": 2}, "moe_offset is 2"),
    "spec_norm_unknown": config_case("specs/GPT-3-175B", {"norm": "batchnorm"}, "norm", "batchnorm"),
    "spec_bool_as_string": config_case("specs/GPT-3-175B", {"bias": "yes"}, "bias", "true or false"),
    # --- safetensors headers ------------------------------------------------------------------
    "shape_4M_params_in_16_bytes": header_case(
        {"w": _t("BF16", [2048, 2048], 0, 16)}, 16, "'w'", "[2048, 2048]", "16 bytes"
    ),
    "overlapping_offsets": header_case(
        {"a": _t("F32", [4], 0, 16), "b": _t("F32", [4], 8, 24)}, 24, "'a'", "'b'", "overlap"
    ),
    "unknown_dtype": header_case({"w": _t("F128", [1], 0, 16)}, 16, "'w'", "unknown dtype", "F128"),
    "string_in_shape": header_case({"w": _t("F32", ["2", 2], 0, 16)}, 16, "'w'", "'2'"),
    "negative_dim": header_case({"w": _t("F32", [-2, -2], 0, 16)}, 16, "'w'", "-2"),
    "float_dim": header_case({"w": _t("F32", [2.0, 2], 0, 16)}, 16, "'w'", "2.0"),
    "offsets_backwards": header_case({"w": _t("F32", [0], 16, 8)}, 16, "'w'", "data_offsets"),
    "offsets_as_bools": header_case({"w": _t("BOOL", [1], False, True)}, 1, "'w'", "data_offsets"),
    "offsets_past_file": header_case({"w": _t("F32", [4], 0, 16)}, 8, "'w'", "truncated"),
    "shape_not_list": header_case({"w": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}}, 16, "'w'"),
    "entry_not_object": header_case({"w": [1, 2]}, 0, "'w'", "not a JSON object"),
    "dtype_missing": header_case({"w": {"shape": [1], "data_offsets": [0, 4]}}, 4, "'w'", "no dtype"),
    "f4_half_byte": header_case({"w": _t("F4", [3], 0, 2)}, 2, "'w'", "F4"),
    "metadata_not_object": header_case({"__metadata__": [1], **_GOOD_SHARD}, 16, "__metadata__"),
    "header_is_list": header_case(b"[]", 0, "not a JSON object"),
    "header_not_utf8": header_case(b"\xff\xfe{}", 0, "not valid JSON"),
    "header_nested_too_deep": header_case(_deep(50_000).encode(), 0, "not valid JSON"),
    "header_length_past_file": header_case(b"{}", 0, "larger than the file", length=2**40),
    "header_length_huge": header_case(b"{}", 0, "larger than the file", length=2**64 - 1),
    # --- index files ------------------------------------------------------------------------------
    "index_dotdot_shard": index_case(lambda d: "../outside/secret.safetensors", "'..'"),
    "index_absolute_shard": index_case(lambda d: str(d / "outside" / "secret.safetensors"), "absolute path"),
    "index_symlink_outside": index_case(
        lambda d: "model-00001-of-00001.safetensors", "outside the checkpoint", link=True
    ),
    "index_shard_not_string": index_case(lambda d: 5, "not a file name"),
    "index_shard_nul": index_case(lambda d: "a\x00.safetensors", "not a file name"),
    "index_windows_absolute": index_case(lambda d: "C:\\weights\\x.safetensors", "absolute path"),
    "duplicate_tensor_in_two_shards": duplicate_tensor_case,
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_one_clean_error(case: str, tmp_path: Path) -> None:
    target, expect = CASES[case](tmp_path)
    before = snapshot(tmp_path)
    result = invoke(["params", target])
    line = assert_clean_error(result, 1)
    for part in expect:
        assert part.lower() in line.lower(), (part, line)
    assert snapshot(tmp_path) == before, "params changed its input files"


def test_enough_cases() -> None:
    assert len(CASES) >= 30


def test_index_path_unreadable_index(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_sample("Mistral-7B-v0.1")))
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": [')
    line = assert_clean_error(invoke(["params", tmp_path]), 1)
    assert "model.safetensors.index.json" in line and "malformed JSON" in line


# ---------------------------------------------------------------------------------------
# The public readers and the containment check
# ---------------------------------------------------------------------------------------


def test_read_safetensors_header_matches_safetensors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    tensors = {"a": torch.zeros(3, 5, dtype=torch.bfloat16), "b": torch.ones(7), "e": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    data_start, header = read_safetensors_header(tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    assert data_start == 8 + struct.unpack("<Q", raw[:8])[0]
    assert header["__metadata__"] == {"format": "pt"}
    assert header["a"]["shape"] == [3, 5] and header["a"]["dtype"] == "BF16"
    begin, end = header["b"]["data_offsets"]
    assert raw[data_start + begin : data_start + end] == torch.ones(7).numpy().tobytes()
    infos, n = read_local_header(tmp_path / "m.safetensors")
    assert n == data_start and {t.name: t.nbytes for t in infos} == {"a": 30, "b": 28, "e": 0}


def test_packed_dtypes(tmp_path: Path) -> None:
    """F4 holds two elements per byte, F6 four per three bytes; they must fill whole bytes."""
    ok = {"f4": _t("F4", [2, 3], 0, 3), "f6": _t("F6_E2M3", [4], 3, 6), "e8": _t("F8_E8M0", [2], 6, 8)}
    raw = json.dumps(ok).encode()
    infos = parse_header(raw, "p.safetensors", 8 + len(raw) + 8)
    assert {t.name: t.nbytes for t in infos} == {"f4": 3, "f6": 3, "e8": 2}
    for bad in ({"x": _t("F6_E3M2", [3], 0, 2)}, {"x": _t("F4", [2, 3], 0, 6)}):
        raw = json.dumps(bad).encode()
        with pytest.raises(CheckpointError, match="'x'"):
            parse_header(raw, "p.safetensors", None)
    assert len(DTYPE_BITS) == 22


def test_safe_child(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    (root / "sub").mkdir(parents=True)
    assert safe_child(root, "sub/./x.safetensors", "index") == root / "sub" / "x.safetensors"
    for bad in ("../x", "sub/../../x", "/etc/passwd", "\\\\server\\share", "", None, ["x"]):
        with pytest.raises(CheckpointError, match="index"):
            safe_child(root, bad, "index")
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises(CheckpointError):
        safe_child(root, "loop", "index")


def test_hf_cache_snapshot_links_are_inside(tmp_path: Path) -> None:
    """A snapshot in the HF cache holds symlinks into the repo's blobs/: that is inside."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "blobs" / "deadbeef").write_bytes(_st_bytes(_GOOD_SHARD, bytes(16)))
    (snap / "model-00001-of-00001.safetensors").symlink_to(Path("../../blobs/deadbeef"))
    wm = {"model.embed_tokens.weight": "model-00001-of-00001.safetensors"}
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    path = safe_child(snap, "model-00001-of-00001.safetensors", "index")
    assert read_local_header(path)[0][0].shape == (2, 2)
    result = invoke(["params", snap, "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["total_params"] == 4


def test_index_paths_are_normalised(tmp_path: Path) -> None:
    """``./a`` and ``a`` name one shard: it is read once, not counted twice."""
    (tmp_path / "a.safetensors").write_bytes(
        _st_bytes({**_GOOD_SHARD, "lm_head.weight": _t("F32", [2, 2], 16, 32)}, bytes(32))
    )
    wm = {"model.embed_tokens.weight": "a.safetensors", "lm_head.weight": "./a.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    result = invoke(["params", tmp_path, "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["total_params"] == 8


def test_empty_fused_expert_tensor_with_huge_first_dim(tmp_path: Path) -> None:
    """An empty tensor may claim any first dimension; counting experts must not enumerate it."""
    header = {"model.layers.0.mlp.experts.gate_up_proj": _t("BF16", [2**62, 0, 4], 0, 0)}
    (tmp_path / "w.safetensors").write_bytes(_st_bytes(header))
    result = invoke(["params", tmp_path / "w.safetensors", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["total_params"] == 0


# ---------------------------------------------------------------------------------------
# Every shipped config still passes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SAMPLE_CONFIGS, ids=lambda p: p.stem)
def test_sample_configs_validate(path: Path) -> None:
    cfg = json.loads(path.read_text())
    validate_config(cfg, str(path))
    moe_spec(cfg, str(path))


@pytest.mark.parametrize("path", SAMPLE_SPECS, ids=lambda p: p.stem)
def test_sample_specs_validate(path: Path) -> None:
    cfg = spec_to_config(json.loads(path.read_text()), str(path))
    validate_config(cfg, str(path))


def test_tiny_and_demo_configs_validate() -> None:
    from tests.tiny import FAMILIES, tiny_config

    for family in FAMILIES:
        validate_config(tiny_config(family).to_dict(), family)
    for demo in ("demo", "demo-dense"):
        assert invoke(["params", demo], catch_exceptions=False).exit_code == 0


def test_spec_inside_a_directory_is_normalised(tmp_path: Path) -> None:
    """A spec saved as a directory's config.json is accounted like the spec file itself."""
    spec = SAMPLES / "specs" / "GLaM-64B-64E.json"
    (tmp_path / "config.json").write_text(spec.read_text())
    a = json.loads(invoke(["params", tmp_path, "--json"]).stdout)[0]
    b = json.loads(invoke(["params", spec, "--json"]).stdout)[0]
    assert a["total_params"] == b["total_params"] and a["active_params"] == b["active_params"]


# ---------------------------------------------------------------------------------------
# Property-based fuzzing: the only exception allowed is a MoescopeError
# ---------------------------------------------------------------------------------------

_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_dims = st.one_of(
    st.integers(0, 8),
    st.integers(-3, 2**70),
    st.sampled_from([2.0, "4", None, True, [2], -1]),
)
_dtypes = st.one_of(st.sampled_from(sorted(DTYPE_BITS)), st.sampled_from(["F128", "", "bf16", 3, None]))
_offset = st.one_of(st.integers(0, 64), st.integers(-5, 2**66), st.sampled_from([1.5, "0", None, False]))
_entry = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": _dtypes,
            "shape": st.one_of(st.lists(_dims, max_size=4), st.sampled_from([3, "x", None])),
            "data_offsets": st.one_of(
                st.lists(_offset, min_size=2, max_size=2), st.lists(_offset, max_size=3), st.just("0:4")
            ),
        }
    ),
    st.sampled_from([None, 1, "x", [0, 4], {}]),
)


@st.composite
def _valid_headers(draw: st.DrawFn) -> dict[str, Any]:
    """Headers that are valid by construction (contiguous tensors), to exercise the accept path."""
    header: dict[str, Any] = {}
    offset = 0
    for i in range(draw(st.integers(0, 6))):
        dtype = draw(st.sampled_from(sorted(DTYPE_BITS)))
        shape = draw(st.lists(st.integers(0, 6), max_size=3))
        numel = 1
        for s in shape:
            numel *= s
        if numel * DTYPE_BITS[dtype] % 8:
            shape, numel = [*shape, 2] if shape else [2], numel * 2 if shape else 2
        nbytes = numel * DTYPE_BITS[dtype] // 8
        header[f"t{i}"] = _t(dtype, shape, offset, offset + nbytes)
        offset += nbytes
    return header


def _check_accepted(infos: list[Any], header: dict[str, Any], data_len: int) -> None:
    spans = []
    for t in infos:
        start, end = header[t.name]["data_offsets"]
        assert 0 <= start <= end <= data_len
        assert t.numel * DTYPE_BITS[t.dtype] == 8 * (end - start) == 8 * t.nbytes
        if end > start:
            spans.append((start, end))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


@_FUZZ
@given(raw=st.binary(max_size=200), size=st.one_of(st.none(), st.integers(0, 10**6)))
def test_fuzz_header_random_bytes(raw: bytes, size: int | None) -> None:
    try:
        parse_header(raw, "f.safetensors", size)
    except CheckpointError:
        pass


@_FUZZ
@given(
    header=st.one_of(
        st.dictionaries(st.text(max_size=8), _entry, max_size=5),
        _valid_headers(),
        _valid_headers().map(lambda h: {**h, "__metadata__": {"format": "pt"}}),
    ),
    data_len=st.one_of(st.integers(0, 300), st.none()),
)
def test_fuzz_header_json(header: dict[str, Any], data_len: int | None) -> None:
    raw = json.dumps(header).encode()
    size = None if data_len is None else 8 + len(raw) + data_len
    try:
        infos = parse_header(raw, "f.safetensors", size)
    except CheckpointError:
        return
    _check_accepted(infos, header, data_len if data_len is not None else 2**80)


@st.composite
def _aliased_headers(draw: st.DrawFn) -> dict[str, Any]:
    """A valid header plus one more tensor of a shape already seen, written with 2.0 or true
    for its dimensions: equal to the ints as dictionary keys, so only a type check refuses it."""
    header = draw(_valid_headers())
    if not header:
        return header
    src = header[draw(st.sampled_from(sorted(header)))]
    end = max(e["data_offsets"][1] for e in header.values())
    size = src["data_offsets"][1] - src["data_offsets"][0]
    as_bool = draw(st.booleans()) and 1 in src["shape"]
    if as_bool:
        shape: list[Any] = [True if d == 1 else d for d in src["shape"]]
    else:
        shape = [float(d) for d in src["shape"]]
    at = draw(st.integers(0, len(header)))
    items = list(header.items())
    items.insert(at, ("alias", {**src, "shape": shape, "data_offsets": [end, end + size]}))
    return dict(items)


@_FUZZ
@given(
    header=st.one_of(
        st.dictionaries(st.text(max_size=8), _entry, max_size=5),
        _valid_headers(),
        _aliased_headers(),
        _valid_headers().map(lambda h: {**h, "__metadata__": {"format": "pt"}}),
        _valid_headers().map(lambda h: dict(reversed(list(h.items())))),  # not in offset order
    ),
    data_len=st.one_of(st.integers(0, 300), st.none()),
)
def test_fast_header_checks_agree_with_exact(header: dict[str, Any], data_len: int | None) -> None:
    """The fast path (a size per distinct (dtype, shape), dimension types checked at the end)
    accepts and refuses exactly what the entry-by-entry checks do, with the same message."""
    from moescope.checkpoint.header import _check_entries, _check_entries_exact

    def run(check: Callable[..., Any]) -> tuple[str, Any]:
        try:
            return "ok", list(check(header, "f.safetensors", data_len, "f.safetensors"))
        except CheckpointError as exc:
            return "error", str(exc)

    assert run(_check_entries) == run(_check_entries_exact)


@settings(max_examples=60, deadline=None)
@given(
    header=st.one_of(_valid_headers(), st.dictionaries(st.text(max_size=4), _entry, max_size=3)),
    slack=st.integers(-40, 40),
    length=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_fuzz_header_files(header: dict[str, Any], slack: int, length: int | None) -> None:
    """Whole files through both local readers: a wrong length, a short or long data section."""
    raw = json.dumps(header).encode()
    data_len = max(0, sum(max(0, _end(e)) for e in header.values()) + slack)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.safetensors"
        path.write_bytes(_st_bytes(raw, bytes(min(data_len, 4096)), length))
        for reader in (read_local_header, read_safetensors_header):
            try:
                reader(path)
            except CheckpointError:
                pass


def _end(entry: Any) -> int:
    try:
        end = entry["data_offsets"][1]
        return end if type(end) is int and end < 4096 else 0
    except (TypeError, KeyError, IndexError):
        return 0


_NASTY = st.one_of(
    st.integers(-(10**13), 10**13),
    st.integers(-3, 300),
    st.sampled_from(
        [0, -1, 1, 2, 3, 7, 10**12, 1e12, 1.5, 64.0, "32", "", "sliding_attention", None, True, False, [], {}]
    ),
    st.lists(
        st.one_of(st.integers(-2, 70), st.sampled_from(["full_attention", "sliding_attention", 1.0])),
        max_size=4,
    ),
    st.dictionaries(
        st.sampled_from(["moe_num_experts", "moe_top_k", "kv_n_heads", "x"]), st.integers(-2, 20), max_size=2
    ),
    st.just(float("nan")),
)


def _paths(cfg: dict[str, Any]) -> list[str]:
    """Dotted keys of a config, one level into nested dicts."""
    out = []
    for k, v in cfg.items():
        out.append(k)
        if isinstance(v, dict):
            out.extend(f"{k}.{kk}" for kk in v)
    return out


def _mutate(cfg: dict[str, Any], key: str, value: Any, delete: bool) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    *parents, leaf = key.split(".")
    cur = cfg
    for part in parents:
        cur = cur[part]
    if delete:
        cur.pop(leaf, None)
    else:
        cur[leaf] = value
    return cfg


def _account_config(cfg: dict[str, Any], where: str) -> None:
    """Everything ``moescope params`` does with a config, except a transformers meta build
    (seconds per example): validate, then account when there is a closed form."""
    validate_config(cfg, where)
    spec = moe_spec(cfg, where)
    # a closed form lists ~15 tensors a layer: deep stacks are valid but slow to fuzz
    if has_closed_form(cfg) and spec.num_layers <= 200:
        report = account(Checkpoint(where, "config", cfg, location=where))
        assert report.total_params >= 0 and (report.active_params or 0) <= report.total_params


_BASES = {p.stem: json.loads(p.read_text()) for p in SAMPLE_CONFIGS}


@pytest.fixture(scope="module")
def tiny_bases() -> dict[str, dict[str, Any]]:
    from tests.tiny import FAMILIES, tiny_config

    return {f"tiny-{f}": tiny_config(f).to_dict() for f in FAMILIES}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_config_mutations(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(_BASES)))
    cfg = _BASES[name]
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(_paths(cfg)))
        cfg = _mutate(cfg, key, data.draw(_NASTY), data.draw(st.booleans()))
    try:
        _account_config(cfg, f"{name}.json")
    except MoescopeError:
        pass


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzz_tiny_config_mutations(data: st.DataObject, tiny_bases: dict[str, dict[str, Any]]) -> None:
    name = data.draw(st.sampled_from(sorted(tiny_bases)))
    cfg = tiny_bases[name]
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(_paths(cfg)))
        cfg = _mutate(cfg, key, data.draw(_NASTY), data.draw(st.booleans()))
    try:
        _account_config(cfg, f"{name}.json")
    except MoescopeError:
        pass


_SPEC_BASES = {p.stem: json.loads(p.read_text()) for p in SAMPLE_SPECS}


@_FUZZ
@given(data=st.data())
def test_fuzz_spec_mutations(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(_SPEC_BASES)))
    spec = _SPEC_BASES[name]
    keys = sorted(spec) + ["moe_layers", "moe_every", "moe_offset", "num_kv_heads", "expert_ffn_size", "norm"]
    for _ in range(data.draw(st.integers(1, 3))):
        spec = _mutate(spec, data.draw(st.sampled_from(keys)), data.draw(_NASTY), data.draw(st.booleans()))
    try:
        cfg = spec_to_config(spec, f"{name}.json")
        _account_config(cfg, f"{name}.json")
    except ConfigError:
        pass
