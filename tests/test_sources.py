"""The same checkpoint gives the same numbers through every source kind: a save_pretrained
directory (single file and sharded), a single .safetensors file, config-only, and a hub id
served by a loopback stand-in of the hub (the real huggingface_hub client does the work)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moescope.accounting.params import count_params
from tests.hubstub import HubStub, write_sparse_shard
from tests.tiny import tiny_model

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss", "llama"]


def _load_all(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint directory."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    """family -> (save_pretrained dir, sharded into several files, expected numel)."""
    torch.manual_seed(0)
    out = {}
    for fam in FAMILIES:
        model = tiny_model(fam)
        d = tmp_path_factory.mktemp(fam)
        model.save_pretrained(d, max_shard_size="20KB")
        out[fam] = (d, _numel(model))
    tied = tiny_model("qwen3_moe", tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("tied")
    tied.save_pretrained(d)
    out["tied"] = (d, _numel(tied))
    return out


@pytest.mark.parametrize("family", [*FAMILIES, "tied"])
def test_sources_agree(family: str, checkpoints: dict[str, tuple[Path, int]], tmp_path: Path) -> None:
    d, expected = checkpoints[family]
    from_dir = count_params(str(d))
    assert from_dir.source == "safetensors"
    assert from_dir.total_params == expected
    from_cfg = count_params(str(d / "config.json"))
    assert from_cfg.source == "config"
    for key in (
        "total_params",
        "active_params",
        "active_params_no_embedding",
        "flops_per_token",
        "moe_layers",
    ):
        assert getattr(from_cfg, key) == getattr(from_dir, key), key
    # The config path lists the MTP layers a config declares, as hub checkpoints store them
    # (#20); save_pretrained writes none, so the MTP counts alone may differ here.
    assert {**from_cfg.components, "mtp": 0} == {**from_dir.components, "mtp": 0}
    # a single .safetensors file with its config beside it
    single = tmp_path / "single"
    single.mkdir()
    save_file(_load_all(d), str(single / "model.safetensors"))
    shutil.copy(d / "config.json", single / "config.json")
    from_file = count_params(str(single / "model.safetensors"))
    assert from_file.total_params == expected
    assert from_file.active_params == from_dir.active_params
    assert from_file.source_kind == "file"


def test_sharded_dir_has_index(checkpoints: dict[str, tuple[Path, int]]) -> None:
    d, _ = checkpoints["mixtral"]
    assert (d / "model.safetensors.index.json").exists()
    assert len(list(d.glob("*.safetensors"))) > 2


def test_per_expert_layout_is_seen(checkpoints: dict[str, tuple[Path, int]]) -> None:
    d, _ = checkpoints["mixtral"]
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    assert any(".experts.3." in k for k in idx["weight_map"]), "save_pretrained writes per-expert tensors"


def test_active_arithmetic(checkpoints: dict[str, tuple[Path, int]]) -> None:
    d, _ = checkpoints["mixtral"]
    r = count_params(str(d))
    routed = r.components["routed_experts"]
    assert r.active_params == r.total_params - routed + routed * 2 // 4
    assert r.topk_ratio == 0.5


def test_single_file_without_config(checkpoints: dict[str, tuple[Path, int]], tmp_path: Path) -> None:
    d, expected = checkpoints["olmoe"]
    save_file(_load_all(d), str(tmp_path / "bare.safetensors"))
    r = count_params(str(tmp_path / "bare.safetensors"))
    assert r.total_params == expected
    assert r.is_moe and r.num_experts == 4
    assert r.active_params is None
    assert any("tensor names alone" in n for n in r.notes)


def _write(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))


def test_mxfp4_blocks_count_as_logical_params(tmp_path: Path) -> None:
    """gpt-oss style: *_blocks hold two 4-bit values per byte (32 values per 16-byte block);
    *_scales are not parameters."""
    torch.manual_seed(0)
    ref = tiny_model("gpt_oss", intermediate_size=64)
    quant = {}
    for k, v in ref.state_dict().items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, d_in, d_out = v.shape  # in-memory [E, in, out]; stored as [E, out, in/32, 16] bytes
            quant[k + "_blocks"] = torch.zeros(e, d_out, d_in // 32, 16, dtype=torch.uint8)
            quant[k + "_scales"] = torch.zeros(e, d_out, d_in // 32, dtype=torch.uint8)
        else:
            quant[k] = v.contiguous()
    _write(tmp_path / "mx", quant, ref.config.to_dict())
    r = count_params(str(tmp_path / "mx"))
    assert r.total_params == _numel(ref)
    assert r.active_params == count_params(str(tmp_path / "mx" / "config.json")).active_params
    assert r.weight_bytes == sum(t.numel() * t.element_size() for t in quant.values())
    assert r.weight_dtypes["U8"] > 0


def test_fp8_scales_are_not_params(tmp_path: Path) -> None:
    """DeepSeek style: F8_E4M3 weights with weight_scale_inv beside them."""
    torch.manual_seed(0)
    ref = tiny_model("mixtral")
    sd = ref.state_dict()
    q = {}
    for k, v in sd.items():
        if v.ndim == 2 and "embed" not in k and "lm_head" not in k:
            q[k] = v.to(torch.float8_e4m3fn)
            q[k.replace(".weight", ".weight_scale_inv")] = torch.ones(1, 1)
        elif v.ndim == 3:  # fused experts: write per-expert FP8 tensors like a hub checkpoint
            name = "w1" if "gate_up" in k else "w2"
            for j in range(v.shape[0]):
                base = (
                    k.replace("experts.gate_up_proj", f"block_sparse_moe.experts.{j}.{name}")
                    .replace("experts.down_proj", f"block_sparse_moe.experts.{j}.w2")
                    .replace(".mlp.", ".")
                )
                q[base + ".weight"] = v[j].to(torch.float8_e4m3fn).contiguous()
                q[base + ".weight_scale_inv"] = torch.ones(1, 1)
        else:
            q[k] = v
    _write(tmp_path / "fp8", q, ref.config.to_dict())
    r = count_params(str(tmp_path / "fp8"))
    assert r.total_params == _numel(ref)
    assert "F8_E4M3" in r.weight_dtypes
    assert r.weight_bytes < r.memory_bytes["bf16"]


def test_tied_embedding_counted_once(checkpoints: dict[str, tuple[Path, int]], tmp_path: Path) -> None:
    d, expected = checkpoints["tied"]
    r = count_params(str(d))
    assert r.total_params == expected
    assert r.components["lm_head"] == 0
    # a checkpoint that stores the tied head anyway still counts it once
    from safetensors.torch import load_file

    sd = load_file(str(d / "model.safetensors"))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    _write(tmp_path / "both", sd, json.loads((d / "config.json").read_text()))
    assert count_params(str(tmp_path / "both")).total_params == expected


def _hub_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "tied"])
def test_hub_id_matches_local(
    family: str, checkpoints: dict[str, tuple[Path, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, expected = checkpoints[family]
    with HubStub({"org/tiny": d}) as hub:
        _hub_env(monkeypatch, hub.endpoint)
        r = count_params("org/tiny")
        r_rev = count_params("org/tiny@main")
        # weights are only ever read through range requests (headers), never fetched whole
        shard_gets = [(m, p, rng) for m, p, rng in hub.log if m == "GET" and p.endswith(".safetensors")]
        assert shard_gets and all(rng for _, _, rng in shard_gets)
    local = count_params(str(d))
    assert r.source_kind == "hub" and r.source == "safetensors"
    assert r.total_params == expected == local.total_params
    assert r.active_params == local.active_params and r.flops_per_token == local.flops_per_token
    assert r_rev.total_params == expected


def test_hub_reads_under_one_percent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4-shard checkpoint of ~1.6 GB (sparse files): header reads transfer under 1% of it."""
    d = tmp_path / "big"
    d.mkdir()
    H, I, E, L = 1024, 1536, 16, 4
    wm: dict[str, str] = {}
    total = 0
    for layer in range(L):
        name = f"model-{layer + 1:05d}-of-{L:05d}.safetensors"
        t = {}
        for j in range(E):
            for w, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
                t[f"model.layers.{layer}.block_sparse_moe.experts.{j}.{w}.weight"] = ("BF16", shape)
        total += write_sparse_shard(d / name, t)
        wm.update({k: name for k in t})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    cfg = {
        "model_type": "mixtral",
        "num_local_experts": E,
        "num_experts_per_tok": 2,
        "num_hidden_layers": L,
        "hidden_size": H,
        "intermediate_size": I,
        "num_attention_heads": 8,
        "vocab_size": 10,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    with HubStub({"org/big": d}) as hub:
        _hub_env(monkeypatch, hub.endpoint)
        r = count_params("org/big")
        sent = hub.bytes_sent
    assert r.components["routed_experts"] == L * E * 3 * I * H
    assert r.weight_bytes == 2 * r.components["routed_experts"]
    assert sent < 0.01 * total, (sent, total)


def test_hub_errors(checkpoints: dict[str, tuple[Path, int]], monkeypatch: pytest.MonkeyPatch) -> None:
    from moescope.errors import ModelNotFoundError

    d, _ = checkpoints["llama"]
    with HubStub({"org/tiny": d}) as hub:
        _hub_env(monkeypatch, hub.endpoint)
        with pytest.raises(ModelNotFoundError, match="no such model"):
            count_params("org/missing")
        with pytest.raises(ModelNotFoundError, match="revision"):
            count_params("org/tiny@nope")


def test_offline_without_cache_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    from moescope.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="moescope download"):
        count_params("org/not-cached")


def test_download_then_offline(
    checkpoints: dict[str, tuple[Path, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`moescope download` fills the HF cache; offline, params then reads from it."""
    from typer.testing import CliRunner

    from moescope.cli.app import app

    d, expected = checkpoints["qwen2_moe"]
    (d / "pytorch_model.bin").write_bytes(b"never fetched")
    with HubStub({"org/dl": d}) as hub:
        _hub_env(monkeypatch, hub.endpoint)
        result = CliRunner().invoke(app, ["download", "org/dl"], catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
        assert not any(p.endswith(".bin") for _, p, _ in hub.log)
    snapshot = Path(result.stdout.strip())
    assert (snapshot / "config.json").exists() and list(snapshot.glob("*.safetensors"))
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    r = count_params("org/dl")
    assert r.total_params == expected and r.source == "safetensors"
    assert any("local HF cache" in n for n in r.notes)


def test_unknown_family_with_expert_tensors_warns(tmp_path: Path) -> None:
    t = {
        "model.embed_tokens.weight": torch.zeros(10, 8),
        "model.layers.0.mlp.experts.0.w1.weight": torch.zeros(16, 8),
        "model.layers.0.mlp.experts.1.w1.weight": torch.zeros(16, 8),
    }
    _write(tmp_path / "u", t, {"model_type": "mystery_moe", "num_hidden_layers": 1})
    with pytest.warns(UserWarning, match="expert-like tensors"):
        r = count_params(str(tmp_path / "u"))
    assert not r.is_moe and r.active_params == r.total_params == 10 * 8 + 2 * 16 * 8
    assert r.components["dense_mlp"] == 2 * 16 * 8


def test_mtp_layers_reported_apart(checkpoints: dict[str, tuple[Path, int]], tmp_path: Path) -> None:
    """DeepSeek-V3 checkpoints store the MTP module as layer num_hidden_layers; transformers skips it."""

    d, expected = checkpoints["deepseek_v3"]
    sd = _load_all(d)
    cfg = json.loads((d / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    extra = {
        k.replace(f"layers.{n - 1}.", f"layers.{n}."): v.clone()
        for k, v in sd.items()
        if f"layers.{n - 1}." in k
    }
    extra[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(32, 64)
    sd.update(extra)
    cfg["num_nextn_predict_layers"] = 1
    _write(tmp_path / "mtp", sd, cfg)
    r = count_params(str(tmp_path / "mtp"))
    assert r.total_params == expected
    # the saved router buffer e_score_correction_bias is not a parameter
    assert r.mtp_params == sum(
        v.numel() for k, v in extra.items() if not k.endswith("e_score_correction_bias")
    )
    assert r.components["mtp"] == r.mtp_params


def test_vision_tower_not_active(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = tiny_model("mixtral")
    sd = dict(ref.state_dict())
    sd["model.vision_tower.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(64, 16)
    _write(tmp_path / "v", sd, ref.config.to_dict())
    r = count_params(str(tmp_path / "v"))
    assert r.vision_params == 64 * 16
    assert r.total_params == _numel(ref) + 64 * 16
    plain = count_params(str(tmp_path / "v" / "config.json"))
    assert r.active_params == plain.active_params  # vision is never active for text


def test_dbrx_packed_experts(tmp_path: Path) -> None:
    """DBRX stores experts as 2-D [E*I, H] tensors; the closed form and the headers agree."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.DbrxConfig(
        d_model=32, n_heads=4, n_layers=2, vocab_size=99, max_seq_len=64,
        attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0),
        ffn_config=dict(moe_num_experts=4, moe_top_k=2, ffn_hidden_size=16),
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path / "dbrx")
    r = count_params(str(tmp_path / "dbrx"))
    assert r.total_params == _numel(model)
    assert r.num_experts == 4 and r.top_k == 2
    assert r.components["routed_experts"] == 2 * 3 * 4 * 16 * 32
    assert count_params(str(tmp_path / "dbrx" / "config.json")).active_params == r.active_params


# ---------------------------------------------------------------------------------------
# The one resolver of model references
# ---------------------------------------------------------------------------------------


def test_resolve_ref_kinds(checkpoints: dict[str, tuple[Path, int]], monkeypatch: pytest.MonkeyPatch) -> None:
    from moescope.checkpoint.ref import resolve_ref

    d, _ = checkpoints["llama"]
    demo = resolve_ref("demo")
    assert demo.kind == "demo" and demo.is_local and demo.local_dir is not None
    assert (demo.local_dir / "config.json").exists()
    r = resolve_ref(str(d), revision="ignored-for-paths")
    assert (r.kind, r.path, r.revision, r.path_or_id, r.where) == ("dir", d, None, str(d), str(d))
    f = resolve_ref(str(d / "config.json"))
    assert f.kind == "file" and f.local_dir == d
    monkeypatch.chdir(d.parent)
    assert resolve_ref(d.name).kind == "dir"  # a relative path is a path, not a hub id
    hub = resolve_ref("org/name@v1.0")
    assert (hub.kind, hub.repo_id, hub.revision, hub.path, hub.is_local) == (
        "hub",
        "org/name",
        "v1.0",
        None,
        False,
    )
    assert hub.path_or_id == "org/name" and hub.where == "org/name@v1.0"
    assert resolve_ref("org/name@v1.0", revision="main").revision == "main"  # --revision wins
    assert resolve_ref("org/name").where == "org/name" and resolve_ref("org/name").revision is None


@pytest.mark.parametrize(
    "ref",
    [
        "./no-such-dir",
        "/no/such/file.safetensors",
        "~/no-such-dir-xyz",
        "org/na me",
        "a/b/c",
        "org/..x",
        "single",
    ],
)
def test_resolve_ref_one_wording(ref: str) -> None:
    """Every command words a reference that names nothing the same way, naming what it accepts."""
    from moescope.checkpoint.ref import open_checkpoint, resolve_ref
    from moescope.errors import ModelNotFoundError

    messages = set()
    for resolve in (resolve_ref, open_checkpoint):
        with pytest.raises(ModelNotFoundError) as info:
            resolve(ref)
        messages.add(str(info.value))
    assert messages == {
        f"{ref}: no such file or directory; pass a save_pretrained directory, a .safetensors or "
        "config.json file, a hub id like org/name, or 'demo'."
    }


def test_resolve_ref_special_file(tmp_path: Path) -> None:
    import os

    from moescope.checkpoint.ref import resolve_ref
    from moescope.errors import ModelNotFoundError

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ModelNotFoundError, match="not a regular file or directory"):
        resolve_ref(str(fifo))


# ---------------------------------------------------------------------------------------
# The inventory type and the shard reader
# ---------------------------------------------------------------------------------------


def test_inventory_behaves_as_a_list_of_tensorinfo() -> None:
    from moescope.arch.inventory import Inventory, TensorInfo, as_inventory, total_numel
    from moescope.arch.inventory import TensorInfo as FromClosedform

    assert FromClosedform is TensorInfo  # the old import path still works
    a, b, c = TensorInfo("a", (2, 3), "BF16", 12, "x", 80), TensorInfo("b", (4,)), TensorInfo("c", ())
    inv = Inventory([a, b])
    inv.append(c)
    assert len(inv) == 3 and inv[0] == a and inv[-1] == c and list(inv) == [a, b, c]
    assert inv == [a, b, c] and inv[1:] == Inventory([b, c]) and inv != [a, b]
    assert inv.names == ["a", "b", "c"] and inv.shapes == [(2, 3), (4,), ()]
    assert inv[0].numel == 6 and c.numel == 1 and total_numel(inv) == 6 + 4 + 1
    more = Inventory()
    more.extend(inv)
    more.extend([a])
    assert len(more) == 4 and more.nbytes == [12, 0, 0, 12] and more.offsets == [80, None, None, 80]
    assert as_inventory(inv) is inv and as_inventory([a]) == [a] and not Inventory()
    assert "3 tensors" not in repr(inv) and "(4 tensors)" in repr(more)
    with pytest.raises(ValueError, match="length"):
        Inventory.from_columns(["a"], [], [], [], [])


def test_read_local_headers_names_the_first_bad_shard(tmp_path: Path) -> None:
    """Shards are read concurrently but checked in order: the first bad one is reported."""
    from moescope.checkpoint.shards import read_local_headers
    from moescope.errors import CheckpointError

    files = []
    for i in range(6):
        f = tmp_path / f"s{i}.safetensors"
        write_sparse_shard(f, {f"model.layers.{i}.w": ("BF16", (2, 2))})
        files.append(f.name)
    (tmp_path / "s2.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    (tmp_path / "s4.safetensors").write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="s2.safetensors"):
        read_local_headers(tmp_path, files)
    got = read_local_headers(tmp_path, [files[0], files[1], files[3]])
    assert [inv.names for inv, _, _, _ in got] == [
        ["model.layers.0.w"],
        ["model.layers.1.w"],
        ["model.layers.3.w"],
    ]
    assert [inv.files[0] for inv, _, _, _ in got] == ["s0.safetensors", "s1.safetensors", "s3.safetensors"]


def test_tensor_in_two_shards_is_refused(tmp_path: Path) -> None:
    """Shards 2 and 3 both store ``shared.w``: the error names the tensor and both shards."""
    from moescope.errors import CheckpointError

    wm = {}
    for i in range(3):
        name = f"model-0000{i + 1}-of-00003.safetensors"
        tensors = {f"model.layers.{i}.w": ("BF16", (2, 2))}
        if i:
            tensors["shared.w"] = ("BF16", (1,))
        write_sparse_shard(tmp_path / name, tensors)
        wm.update(dict.fromkeys(tensors, name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(
        CheckpointError, match="'shared.w' is stored in both model-00002-of-00003.safetensors and"
    ):
        count_params(str(tmp_path))


def test_inventory_offsets_and_metadata_locate_the_bytes(tmp_path: Path) -> None:
    """``offset`` and ``nbytes`` are enough to read a tensor's bytes; ``__metadata__`` is kept per shard."""
    from moescope.checkpoint.ref import open_checkpoint

    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(4, dtype=torch.bfloat16),
    }
    d = tmp_path / "ck"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    ck = open_checkpoint(str(d))
    assert ck.tensors.metadata == {"model.safetensors": {"format": "pt"}}
    raw = (d / "model.safetensors").read_bytes()
    for t in ck.tensors:
        assert t.file == "model.safetensors" and t.offset is not None
        expected = tensors[t.name].contiguous().view(torch.uint8).numpy().tobytes()
        assert raw[t.offset : t.offset + t.nbytes] == expected
    assert ck.tensors.by_name()["a"].shape == (2, 3)
