"""Tests for moescope.pruning and `moescope prune`: tiny random models of six families.

(Every registry family is pruned end to end in tests/test_families.py; here the stages
are checked in detail: scores, plans, byte ranges, sharding, logits, refusals, the CLI.)

Each family is built from its transformers config class (hidden 32, 2 layers, 4 experts,
vocab 99), saved once per session; traces are real trace directories written from hand-set sums (``write_trace``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from moescope import pruning as P
from moescope.cli.app import app
from moescope.errors import CheckpointError, MoescopeError, PruneError, TraceError
from moescope.tracedir.state import TraceState
from moescope.tracing.write import write_trace_dir
from tests.tiny import char_tokenizer, tiny_model

_HIDDEN = 32
_LAYERS = 2
_EXPERTS = 4
_VOCAB = 99
_COMMON: dict[str, Any] = dict(
    vocab_size=_VOCAB,
    hidden_size=_HIDDEN,
    num_hidden_layers=_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def family_config(family: str) -> Any:
    """A tiny random config of ``family`` with 4 experts, top-2."""
    import transformers as tf

    if family == "mixtral":
        return tf.MixtralConfig(**_COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **_COMMON,
            intermediate_size=16,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
        )
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(  # type: ignore[call-arg]  # head_dim goes through **kwargs
            **_COMMON,
            intermediate_size=16,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=8,
        )
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(
            **{**_COMMON, "num_key_value_heads": 4},
            intermediate_size=16,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
            n_shared_experts=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
    if family == "olmoe":
        return tf.OlmoeConfig(**_COMMON, intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    if family == "gpt_oss":
        return tf.GptOssConfig(
            **_COMMON,
            intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=16,
        )
    raise ValueError(family)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every family saved once with save_pretrained (per-expert layout on disk)."""
    import transformers

    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("tiny_moe")
    out: dict[str, Path] = {}
    for fam in FAMILIES:
        torch.manual_seed(1)
        model = transformers.AutoModelForCausalLM.from_config(family_config(fam))
        if fam == "deepseek_v3":  # varied sigmoid scores, and a correction bias that matters
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.mlp.gate.weight.mul_(20.0)
                    layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(_EXPERTS) * 0.05)
        model.save_pretrained(root / fam)
        out[fam] = root / fam
    return out


def write_trace(
    path: Path,
    *,
    model: str,
    num_experts: int = _EXPERTS,
    layers: tuple[int, ...] = (0, 1),
    top_k: int = 2,
    loads: Mapping[int, Sequence[float]] | None = None,
    domains: Mapping[str, Mapping[int, Sequence[float]]] | None = None,
    lacks: list[str] | None = None,
) -> Path:
    """A real trace dir (``state.npz`` + derived files); ``loads[layer][expert]`` is the count."""
    state = TraceState(list(layers), num_experts, top_k, meta={"model": model, "lacks": lacks or []})
    state.tokens = 100
    for i, layer in enumerate(layers):
        state.counts[i] = (loads or {}).get(layer) or [10 * (e + 1) for e in range(num_experts)]
    counts = state.counts.astype(float)
    # weight 0.5 per token, out norm 2 per token, except expert 0 with big outputs.
    norm = np.where(np.arange(num_experts) == 0, 20.0, 2.0)
    state.set_floats("weight", 0.5 * counts)
    state.set_floats("out_norm", norm * counts)
    state.set_floats("wout_norm", 0.5 * norm * counts)
    for dom, per_layer in (domains or {}).items():
        d = state.domain_index(dom)
        state.dom_counts[d] = [per_layer[layer] for layer in layers]
    if domains:
        state.set_floats("dom_weight", 0.5 * state.dom_counts.astype(float))
    write_trace_dir(path, state, timings={}, plots=False)
    return path


def _state(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


# ------------------------------------------------------------------ scoring


def test_scores_by_criterion(tmp_path: Path) -> None:
    tr = P.read_trace(write_trace(tmp_path / "t", model="m"))
    freq = P.expert_scores(tr, "frequency")
    assert freq[freq.layer == 0]["score"].tolist() == [10, 20, 30, 40]
    reap = P.expert_scores(tr, "reap")
    # mean gate x norm over routed tokens: expert 0 has 0.5 * 20, others 0.5 * 2.
    assert reap[reap.layer == 0]["score"].tolist() == pytest.approx([10.0, 1.0, 1.0, 1.0])
    ean = P.expert_scores(tr, "ean")
    assert ean[ean.layer == 1]["score"].tolist() == pytest.approx([200.0, 40.0, 60.0, 80.0])
    r1 = P.expert_scores(tr, "random", seed=1)["score"].tolist()
    assert r1 == P.expert_scores(tr, "random", seed=1)["score"].tolist()
    assert r1 != P.expert_scores(tr, "random", seed=2)["score"].tolist()


def test_balance_domains_averages_normalised_loads(tmp_path: Path) -> None:
    # Domain "big" dominates pooled counts and loves expert 3; "small" only uses expert 0.
    domains = {
        "big": {0: [0, 100, 200, 700], 1: [0, 100, 200, 700]},
        "small": {0: [10, 0, 0, 0], 1: [10, 0, 0, 0]},
    }
    pooled = {0: [10, 100, 200, 700], 1: [10, 100, 200, 700]}
    tr = P.read_trace(write_trace(tmp_path / "t", model="m", loads=pooled, domains=domains))
    plain = P.expert_scores(tr, "frequency")
    balanced = P.expert_scores(tr, "frequency", balance_domains=True)
    b0 = balanced[balanced.layer == 0]["score"].tolist()
    assert b0 == pytest.approx([0.5, 0.05, 0.1, 0.35])
    plan_plain = P.plan_prune(plain, num_experts=4, top_k=2, keep=2, criterion="frequency")
    plan_bal = P.plan_prune(balanced, num_experts=4, top_k=2, keep=2, criterion="frequency")
    assert plan_plain.kept[0] == [2, 3]
    assert plan_bal.kept[0] == [0, 3]
    with pytest.raises(PruneError, match="out_norm_sum"):
        P.expert_scores(tr, "ean", balance_domains=True)


def test_plan_refuses_keep_below_top_k_and_bad_groups(tmp_path: Path) -> None:
    tr = P.read_trace(write_trace(tmp_path / "t", model="m", num_experts=8))
    scores = P.expert_scores(tr, "frequency")
    with pytest.raises(PruneError, match="top_k=2"):
        P.plan_prune(scores, num_experts=8, top_k=2, keep=1, criterion="frequency")
    cfg = {"model_type": "deepseek_v3", "n_group": 2, "topk_group": 1}
    with pytest.raises(PruneError, match="divisible by 2"):
        P.plan_prune(scores, num_experts=8, top_k=2, keep=5, criterion="frequency", config=cfg)
    with pytest.raises(PruneError, match="per group"):
        P.plan_prune(scores, num_experts=8, top_k=3, keep=4, criterion="frequency", config=cfg)
    plan = P.plan_prune(scores, num_experts=8, top_k=2, keep=4, criterion="frequency", config=cfg)
    # counts grow with the id, so each group of 4 keeps its two highest: 2,3 and 6,7.
    assert plan.kept[0] == [2, 3, 6, 7]
    assert plan.n_group == 2


def test_resolve_keep() -> None:
    assert P.resolve_keep(8, drop=2, keep=None, ratio=None) == 6
    assert P.resolve_keep(8, drop=None, keep=3, ratio=None) == 3
    assert P.resolve_keep(8, drop=None, keep=None, ratio=0.25) == 6
    with pytest.raises(PruneError):
        P.resolve_keep(8, drop=1, keep=1, ratio=None)
    with pytest.raises(PruneError):
        P.resolve_keep(8, drop=0, keep=None, ratio=None)


# ------------------------------------------------------------------ checkpoints


def _moe_param_shrink(model: Any, num_experts: int, drop: int) -> int:
    """Parameters removed by dropping ``drop`` experts per MoE layer, from the original model."""
    removed = 0
    for name, p in model.named_parameters():
        if ".mlp." not in name or "shared" in name:
            continue
        leaf = name.split(".mlp.")[1]
        if leaf.startswith("experts.") or leaf.split(".")[0] in ("gate", "router"):
            if p.shape[0] == num_experts:
                removed += p.numel() // num_experts * drop
            elif leaf.startswith("experts."):  # per-expert ModuleList
                idx = int(leaf.split(".")[1])
                removed += p.numel() if idx >= num_experts - drop else 0
    return removed


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_reloads_and_runs(family: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import transformers

    src = tiny_models[family]
    trace = write_trace(tmp_path / "trace", model=str(src))
    out = tmp_path / "pruned"
    plan, result = P.prune(str(src), trace, out, drop=1, criterion="frequency")
    assert result is not None and result.verified
    # frequency grows with the id: expert 0 goes in every layer.
    assert plan.kept == {0: [1, 2, 3], 1: [1, 2, 3]}
    cfg = json.loads((out / "config.json").read_text())
    assert P.config_num_experts(cfg) == 3
    manifest = json.loads((out / "prune_manifest.json").read_text())
    assert manifest["layers"]["0"]["dropped"] == [0]
    assert manifest["criterion"] == "frequency"

    orig = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    n_orig = sum(p.numel() for p in orig.parameters())
    n_pruned = sum(p.numel() for p in pruned.parameters())
    assert n_pruned == n_orig - _moe_param_shrink(orig, _EXPERTS, 1)
    assert n_pruned < n_orig
    from moescope.accounting.params import count_params

    # moescope params reads both checkpoints from their headers and agrees with transformers
    assert count_params(str(src)).total_params == n_orig
    assert count_params(str(out)).total_params == n_pruned

    # Tensor shapes: every E-first tensor now has 3 rows, kept rows equal the source's.
    before, after = _state(src), _state(out)
    for name, t in after.items():
        if name in before and before[name].shape != t.shape:
            assert before[name].shape[0] == _EXPERTS and t.shape[0] == 3
            assert torch.equal(t, before[name][[1, 2, 3]])
    renamed = [k for k in before if ".experts.3." in k]
    for k in renamed:  # old expert 3 is new expert 2
        assert torch.equal(after[k.replace(".experts.3.", ".experts.2.")], before[k])
    assert not any(".experts.3." in k for k in after)
    with torch.no_grad():
        logits = pruned(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 4, _VOCAB)


def _masked_original_logits(
    family: str, src: Path, dropped: dict[int, list[int]], ids: torch.Tensor
) -> torch.Tensor:
    """Logits of the unpruned model with the dropped experts made unreachable by routing."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        if family == "gpt_oss":  # top-k on logits + bias: a huge negative bias never wins
            with torch.no_grad():
                mlp.router.bias[dropped[i]] = -1e9
        elif family == "deepseek_v3":  # choice uses sigmoid + correction bias; weights exclude it
            with torch.no_grad():
                mlp.gate.e_score_correction_bias[dropped[i]] = -1e9
        else:  # softmax -> top-k -> renormalise, recomputed with -inf logits for dropped experts
            gate = mlp.gate
            drop = list(dropped[i])

            def forward(hidden: torch.Tensor, gate: Any = gate, drop: list[int] = drop) -> Any:
                hidden = hidden.reshape(-1, gate.weight.shape[1])
                logits = torch.nn.functional.linear(hidden, gate.weight)
                masked = logits.float().clone()
                masked[:, drop] = float("-inf")
                probs = masked.softmax(-1)
                top, idx = probs.topk(gate.top_k, dim=-1)
                return logits, top / top.sum(-1, keepdim=True), idx

            gate.forward = forward
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3", "qwen3_moe"])
def test_pruned_logits_equal_masked_original(
    family: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    import transformers

    src = tiny_models[family]
    loads = {0: [50, 10, 40, 30], 1: [5, 60, 45, 20]}  # drop 1 and 0 respectively
    trace = write_trace(tmp_path / "trace", model=str(src), loads=loads)
    out = tmp_path / "pruned"
    plan, _ = P.prune(str(src), trace, out, drop=1, criterion="frequency")
    assert plan.kept == {0: [0, 2, 3], 1: [1, 2, 3]}
    ids = torch.tensor([[3, 17, 42, 8, 91, 23, 5, 60, 11, 77]])
    want = _masked_original_logits(family, src, {0: [1], 1: [0]}, ids)
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = pruned(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # And the masking matters: the unmasked original differs.
    orig = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(orig(input_ids=ids).logits, got, atol=1e-4)


def test_sharded_checkpoint_keeps_sharding(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import transformers

    src = tmp_path / "sharded"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["qwen3_moe"])
    model.save_pretrained(src, max_shard_size="20KB")
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 2
    (src / "tokenizer_config.json").write_text("{}")
    trace = write_trace(tmp_path / "trace", model=str(src))
    out = tmp_path / "pruned"
    P.prune(str(src), trace, out, keep=2, criterion="soft")
    out_shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert set(out_shards) <= set(shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(out_shards)
    assert set(index["weight_map"]) == set(_state(out))
    assert (out / "tokenizer_config.json").exists()
    assert not list(tmp_path.glob(".pruned.tmp-*"))


def test_prune_refuses_other_model_trace(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_models["mixtral"]
    with pytest.raises(TraceError, match="8 experts"):
        P.prune(str(src), write_trace(tmp_path / "a", model=str(src), num_experts=8), tmp_path / "o", drop=1)
    with pytest.raises(TraceError, match="layers"):
        P.prune(
            str(src), write_trace(tmp_path / "b", model=str(src), layers=(0, 1, 2)), tmp_path / "o", drop=1
        )
    with pytest.raises(TraceError, match="traced on org/other"):
        P.prune(str(src), write_trace(tmp_path / "c", model="org/other"), tmp_path / "o", drop=1)
    assert not (tmp_path / "o").exists()


def test_gap_in_expert_numbering_is_caught() -> None:
    layout = P.MoELayout(4, 2, {0: "model.layers.0.mlp."})
    wm = {f"model.layers.0.mlp.experts.{j}.w1.weight": "a" for j in (0, 2)}
    with pytest.raises(CheckpointError, match="expected 0..1"):
        P._validate_experts(wm, layout, 2)


def test_dbrx_packed_rows(tmp_path: Path) -> None:
    """DBRX stores experts as [E*I, H]: expert j owns rows j*I..(j+1)*I."""
    from safetensors.numpy import save_file

    e, i, h = 4, 3, 2
    w1 = np.arange(e * i * h, dtype=np.float32).reshape(e * i, h)
    router = np.arange(e * h, dtype=np.float32).reshape(e, h)
    save_file(
        {
            "transformer.blocks.0.ffn.experts.mlp.w1": w1,
            "transformer.blocks.0.ffn.router.layer.weight": router,
        },
        str(tmp_path / "model.safetensors"),
    )
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "dbrx", "ffn_config": {"moe_num_experts": 4, "moe_top_k": 1}})
    )
    ckpt = P.open_checkpoint(tmp_path)
    layout = P.detect_layout(ckpt)
    assert layout.layers == {0: "transformer.blocks.0.ffn."} and layout.top_k == 1
    tensors = P.plan_tensors(ckpt, layout, {0: [1, 3]})["model.safetensors"]
    shapes = {t.name: t.shape for t in tensors}
    assert shapes == {
        "transformer.blocks.0.ffn.experts.mlp.w1": (2 * i, h),
        "transformer.blocks.0.ffn.router.layer.weight": (2, h),
    }
    cfg, fields = P.updated_config(ckpt.config, 2, 4)
    assert fields == ["ffn_config.moe_num_experts"] and cfg["ffn_config"]["moe_num_experts"] == 2
    info = ckpt.tensors["transformer.blocks.0.ffn.experts.mlp.w1"]
    ranges = P.row_ranges(info, 4, [1, 3])
    raw = (tmp_path / "model.safetensors").read_bytes()
    got = np.frombuffer(b"".join(raw[s : s + n] for s, n in ranges), dtype=np.float32).reshape(-1, h)
    np.testing.assert_array_equal(got, np.concatenate([w1[3:6], w1[9:12]]))


@pytest.mark.parametrize(
    ("family", "edit", "error", "needle"),
    [
        ("llama", {}, "NotMoEError", "dense family"),
        ("mixtral", {"model_type": "brand_new_moe"}, "NotMoEError", "would have to guess"),
    ],
)
def test_prune_refuses_what_the_registry_cannot_vouch_for(
    family: str, edit: dict[str, Any], error: str, needle: str, tmp_path: Path
) -> None:
    """Dense, unknown and unsupported families are refused before anything is written."""
    src = tmp_path / "src"
    tiny_model(family).save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **edit}))
    trace = write_trace(tmp_path / "trace", model=str(src))
    with pytest.raises(MoescopeError, match=needle) as info:
        P.prune(str(src), trace, tmp_path / "o", drop=1, criterion="frequency")
    assert type(info.value).__name__ == error
    res = runner.invoke(
        app, ["prune", str(src), "--trace", str(trace), "--drop", "1", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 1 and len(_error_lines(res.stderr)) == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_top_k_is_never_guessed(tiny_models: dict[str, Path]) -> None:
    """A config without the experts-per-token field is refused, not read as top-2."""
    cfg = json.loads((tiny_models["mixtral"] / "config.json").read_text())
    del cfg["num_experts_per_tok"]
    cfg["num_hidden_layers"] = 0  # past moe_spec's own check: pruning's must still refuse
    with pytest.raises(PruneError, match="num_experts_per_tok"):
        P.config_top_k(cfg)
    assert P.config_top_k({"model_type": "phimoe", "num_local_experts": 4}) == 2  # sparsemixer: always 2


# ------------------------------------------------------------------ CLI


runner = CliRunner()


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def test_cli_dry_run_json(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_models["olmoe"]
    trace = write_trace(tmp_path / "trace", model=str(src))
    res = runner.invoke(
        app,
        [
            "prune",
            str(src),
            "--trace",
            str(trace),
            "--drop",
            "2",
            "--criterion",
            "frequency",
            "--out",
            str(tmp_path / "o"),
            "--dry-run",
            "--json",
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert set(data) == _PRUNE_JSON_KEYS
    assert data["method"] == "drop" and data["merge"] is None
    assert data["dry_run"] is True and data["num_experts_after"] == 2
    # nothing written: the result fields are null
    assert all(data[k] is None for k in ("out", "bytes_in", "bytes_out", "config_fields", "verified"))
    rows = data["plan"]
    assert len(rows) == _LAYERS * _EXPERTS
    assert set(rows[0]) == {"layer", "expert", "score", "rank", "action", "new_expert"}
    dropped = sorted((r["layer"], r["expert"]) for r in rows if r["action"] == "drop")
    assert dropped == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert data["layers"] == {"0": {"kept": [2, 3]}, "1": {"kept": [2, 3]}}
    assert not (tmp_path / "o").exists()


#: ``prune --json``: one object shape with or without --dry-run
_PRUNE_JSON_KEYS = {
    "dry_run",
    "criterion",
    "num_experts_before",
    "num_experts_after",
    "layers",
    "plan",
    "out",
    "bytes_in",
    "bytes_out",
    "config_fields",
    "verified",
    "method",
    "merge",
}


def test_cli_writes_checkpoint(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_models["mixtral"]
    trace = write_trace(tmp_path / "trace", model=str(src))
    res = runner.invoke(
        app,
        [
            "prune",
            str(src),
            "--trace",
            str(trace),
            "--ratio",
            "0.5",
            "--criterion",
            "reap",
            "--out",
            str(tmp_path / "o"),
            "--json",
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["num_experts_after"] == 2 and data["verified"] is True
    # reap: expert 0 has 10x output norms, then ties broken by id -> keep 0 and 1.
    assert data["layers"]["0"]["kept"] == [0, 1]
    assert set(data) == _PRUNE_JSON_KEYS and data["dry_run"] is False
    assert data["out"] == str(tmp_path / "o") and data["bytes_out"] < data["bytes_in"]
    kept = sorted((r["layer"], r["new_expert"]) for r in data["plan"] if r["action"] == "keep")
    assert kept == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize(
    ("lacks", "criterion", "extra", "needle"),
    [
        (["out_norms"], "reap", [], "out_norms (the norms of the experts' outputs)"),
        (["out_norms"], "ean", [], "use --criterion frequency or soft or random"),
        (["gate_weights", "out_norms"], "soft", [], "gate_weights"),
        (["domains"], "frequency", ["--balance-domains"], "drop --balance-domains"),
    ],
)
def test_cli_refuses_criteria_the_trace_lacks(
    lacks: list[str],
    criterion: str,
    extra: list[str],
    needle: str,
    tiny_models: dict[str, Path],
    tmp_path: Path,
) -> None:
    src = tiny_models["olmoe"]
    trace = write_trace(tmp_path / "trace", model=str(src), lacks=lacks)
    args = ["prune", str(src), "--trace", str(trace), "--drop", "1", "--dry-run", "--criterion", criterion]
    res = runner.invoke(app, [*args, *extra])
    assert res.exit_code == 1
    line = " ".join(_error_lines(res.stderr)[0].split())
    assert needle in line and "lacks" in line and "Traceback" not in res.stderr
    # what the trace does have still scores
    ok = runner.invoke(app, [*args[:-1], "frequency", "--json"])
    assert ok.exit_code == 0, ok.stderr


def test_csv_only_directory_is_not_a_trace(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The one loader: summary.json marked complete and state.npz, as report and merge require."""
    src = tiny_models["olmoe"]
    trace = write_trace(tmp_path / "trace", model=str(src))
    (trace / "state.npz").unlink()
    res = runner.invoke(app, ["prune", str(src), "--trace", str(trace), "--drop", "1", "--dry-run"])
    assert res.exit_code == 1 and "state.npz" in _error_lines(res.stderr)[0]
    summary = json.loads((trace / "summary.json").read_text())
    (trace / "summary.json").write_text(json.dumps({**summary, "complete": False}))
    with pytest.raises(TraceError, match="not marked complete"):
        P.read_trace(trace)


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--keep", "1"], 1, "top_k=2"),
        (["--drop", "1", "--keep", "2"], 2, "exactly one"),
        (["--drop", "1", "--trace-other"], 1, "traced on org/other"),
    ],
)
def test_cli_errors(
    args: list[str], code: int, needle: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    src = tiny_models["qwen3_moe"]
    other = "--trace-other" in args
    args = [a for a in args if a != "--trace-other"]
    trace = write_trace(tmp_path / "trace", model="org/other" if other else str(src))
    res = runner.invoke(app, ["prune", str(src), "--trace", str(trace), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == code
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
    if code == 1:
        assert len(_error_lines(res.stderr)) == 1


# ------------------------------------------------------------------ end to end with the trace writer


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_end_to_end_trace_prune_eval(family: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    trace_mod = pytest.importorskip("moescope.tracing")
    import transformers

    from moescope.evaluation.perplexity import perplexity

    src = tiny_models[family]
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = char_tokenizer()

    class Doc:
        def __init__(self, text: str, domain: str) -> None:
            self.text, self.domain, self.doc_id = text, domain, None

    docs = [
        Doc("def f(x): return x + 1\n" * 4, "code"),
        Doc("once upon a time there was a fox.\n" * 3, "prose"),
    ]
    trace_mod.trace_model(model, tok, docs, tmp_path / "trace", seq_len=32, plots=False, model_ref=str(src))
    tr = P.read_trace(tmp_path / "trace")
    assert tr.num_experts == _EXPERTS and tr.layers == [0, 1]
    assert tr.domain_load is not None and set(tr.domain_load["domain"]) == {"code", "prose"}
    reap = P.expert_scores(tr, "reap")
    assert (reap["score"] >= 0).all() and reap["score"].sum() > 0
    plan, result = P.prune(str(src), tmp_path / "trace", tmp_path / "out", keep=2, criterion="reap")
    assert result is not None and result.verified
    # The kept experts are the two with the highest mean gate x output norm, per layer.
    load = tr.expert_load.assign(reap=tr.expert_load.weighted_out_norm_sum / tr.expert_load["count"])
    for layer in (0, 1):
        best = load[load.layer == layer].sort_values(["reap", "expert"], ascending=[False, True]).expert[:2]
        assert plan.kept[layer] == sorted(best.tolist())
    _, balanced = P.prune(
        str(src),
        tmp_path / "trace",
        tmp_path / "out_bal",
        keep=2,
        criterion="frequency",
        balance_domains=True,
    )
    assert balanced is not None and balanced.verified
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    res = perplexity(pruned, tok, docs, seq_len=32, stride=16)
    assert set(res.domains) == {"code", "prose"} and res.perplexity > 1


@pytest.mark.parametrize("command", ["prune", "similarity", "eval"])
def test_help_has_examples(command: str) -> None:
    res = runner.invoke(app, [command, "--help"])
    assert res.exit_code == 0
    assert "Examples" in res.stdout and f"moescope {command}" in res.stdout


# ------------------------------------------------------------------ streamed verification
@pytest.mark.parametrize("method", ["drop", "merge"])
def test_prune_verifies_streamed_under_a_tiny_budget(
    method: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A pruned checkpoint bigger than --max-memory is verified one decoder layer at a time."""
    src = tiny_models["mixtral"]
    trace = write_trace(tmp_path / "trace", model=str(src))
    res = runner.invoke(
        app,
        [
            "prune",
            str(src),
            "--trace",
            str(trace),
            "--drop",
            "1",
            "--method",
            method,
            "--max-memory",
            "1KiB",
            "--out",
            str(tmp_path / "o"),
            "--json",
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["verified"] is True
    assert "verifying the pruned checkpoint: streaming the model layer by layer" in res.stderr
    manifest = json.loads((tmp_path / "o" / "prune_manifest.json").read_text())
    check = manifest["verification"]
    assert check["mode"] == "stream" and check["logits_shape"] == [1, 8, _VOCAB]
    # every weight of the pruned checkpoint was read exactly once
    assert check["bytes_read"] == sum(f.stat().st_size for f in (tmp_path / "o").glob("*.safetensors")) - sum(
        _header_bytes(f) for f in (tmp_path / "o").glob("*.safetensors")
    )


def _header_bytes(path: Path) -> int:
    with path.open("rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_streamed_and_whole_verification_agree(
    family: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    src = tiny_models[family]
    trace = write_trace(tmp_path / "trace", model=str(src))
    out = tmp_path / "pruned"
    P.prune(str(src), trace, out, drop=1, criterion="frequency", verify=False)
    lines: list[str] = []
    whole = P.verify_checkpoint(out, stream=False, on_plan=lines.append)
    streamed = P.verify_checkpoint(out, stream=True, on_plan=lines.append)
    assert whole["mode"] == "whole" and streamed["mode"] == "stream"
    for key in ("parameters", "logits_shape", "num_experts", "dtype"):
        assert whole[key] == streamed[key], key
    assert lines[0].startswith("verifying the pruned checkpoint: loading the model whole (--no-stream)")
    assert lines[1].startswith(
        "verifying the pruned checkpoint: streaming the model layer by layer (--stream)"
    )


def test_streamed_verification_catches_a_missing_tensor(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A layer tensor gone from the checkpoint fails the streamed verification as it fails the whole one."""
    from safetensors.torch import save_file

    src = tiny_models["mixtral"]
    trace = write_trace(tmp_path / "trace", model=str(src))
    out = tmp_path / "pruned"
    P.prune(str(src), trace, out, drop=1, criterion="frequency", verify=False)
    state = _state(out)
    victim = next(k for k in state if k.startswith("model.layers.1.") and "self_attn.q_proj" in k)
    del state[victim]
    for f in out.glob("*.safetensors"):
        f.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for stream in (False, True):
        with pytest.raises(CheckpointError, match="missing_keys"):
            P.verify_checkpoint(out, stream=stream)


def test_prune_refuses_stream_with_device_map(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_models["mixtral"]
    trace = write_trace(tmp_path / "trace", model=str(src))
    with pytest.raises(PruneError, match="two ways to fit a model"):
        P.prune(str(src), trace, tmp_path / "o", drop=1, stream=True, device_map="auto")
    assert not (tmp_path / "o").exists()
