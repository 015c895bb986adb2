"""The shipped demo models: they load by name, run, generate, and match their model cards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from moescope.corpus.read import read_corpus
from moescope.demo import DEMO_MODELS, demo_model_dir

_BOS, _EOS, _PAD = 256, 257, 258


@pytest.fixture(scope="module")
def moe() -> tuple[Any, Any]:
    from moescope.execution.load import load_model

    return load_model("demo")


@pytest.fixture(scope="module")
def dense() -> tuple[Any, Any]:
    from moescope.execution.load import load_model

    return load_model("demo-dense")


@pytest.fixture(scope="module")
def metrics() -> dict[str, Any]:
    path = demo_model_dir("demo")
    assert path is not None
    return json.loads((path / "train_metrics.json").read_text())


def test_demo_names_resolve_to_shipped_folders() -> None:
    assert set(DEMO_MODELS) == {"demo", "demo-dense"}
    assert demo_model_dir("nope") is None
    total = 0
    for name in DEMO_MODELS:
        folder = demo_model_dir(name)
        assert folder is not None
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
            assert (folder / f).is_file(), folder / f
        total += (folder / "model.safetensors").stat().st_size
    assert total <= 15 * 2**20


def test_auto_classes_load_both_offline() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    for name, model_type in (("demo", "mixtral"), ("demo-dense", "mistral")):
        folder = demo_model_dir(name)
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        assert model.config.model_type == model_type
        assert model.dtype == torch.float32
        assert isinstance(tok, PreTrainedTokenizerFast)
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (_BOS, _EOS, _PAD)


def test_tokenizer_is_byte_level(moe: tuple[Any, Any]) -> None:
    _, tok = moe
    text = "déjà vu\n\tx = {'a': 1}  # ok"
    ids = tok(text).input_ids
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert len(tok) == 259


def test_moe_is_top2_of_8_and_dense_twin_matches_active_params(
    moe: tuple[Any, Any], dense: tuple[Any, Any]
) -> None:
    m, d = moe[0], dense[0]
    cfg = m.config
    assert cfg.num_local_experts >= 8 and cfg.num_experts_per_tok == 2
    for attr in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
    ):
        assert getattr(cfg, attr) == getattr(d.config, attr), attr
    total = sum(p.numel() for p in m.parameters())
    routed = sum(p.numel() for n, p in m.named_parameters() if ".mlp.experts." in n)
    assert routed > total / 2  # the experts are most of the MoE
    active = total - routed * (1 - cfg.num_experts_per_tok / cfg.num_local_experts)
    dense_total = sum(p.numel() for p in d.parameters())
    assert abs(active / dense_total - 1) <= 0.05


@pytest.mark.parametrize("which", ["moe", "dense"])
def test_forward_and_generate(which: str, moe: tuple[Any, Any], dense: tuple[Any, Any]) -> None:
    model, tok = moe if which == "moe" else dense
    ids = tok("def main():\n    ", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert logits.shape == (1, ids.shape[1], 259)
    assert torch.isfinite(logits).all()
    assert out.shape[1] > ids.shape[1]
    assert isinstance(tok.decode(out[0], skip_special_tokens=True), str)
    # A trained model predicts code far better than uniform guessing (ln 259 = 5.56 nats).
    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert float(loss) < 3.5


def _heldout_windows(domain: str, seq_len: int, n: int) -> torch.Tensor:
    """The script's held-out windows for one domain: bos + bytes + eos per document, concatenated."""
    ids: list[int] = []
    for doc in read_corpus(f"demo:{domain}", split="heldout"):
        ids += [_BOS, *doc.text.encode("utf-8"), _EOS]
    stream = torch.tensor(ids)
    n = min(n, len(stream) // seq_len)
    return stream[: n * seq_len].view(n, seq_len)


def test_shipped_heldout_loss_matches_the_card(moe: tuple[Any, Any], metrics: dict[str, Any]) -> None:
    """Recompute the MoE's held-out loss on the numbers domain (the smallest) and compare."""
    model, _ = moe
    args = metrics["args"]
    w = _heldout_windows("numbers", args["seq_len"], args["eval_windows"])
    assert int(w[:, 1:].numel()) == metrics["data"]["heldout_eval_tokens"]["numbers"]
    loss_sum = 0.0
    with torch.no_grad():
        for i in range(0, len(w), 32):
            b = w[i : i + 32]
            logits = model(input_ids=b).logits[:, :-1]
            loss_sum += float(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum")
            )
    loss = loss_sum / w[:, 1:].numel()
    assert loss == pytest.approx(metrics["models"]["moe"]["heldout_loss"]["numbers"], rel=2e-3)


def test_card_metrics_no_dead_experts_and_domains_differ(metrics: dict[str, Any]) -> None:
    routing = metrics["routing"]
    layers = metrics["args"]["layers"]
    assert len(routing["min_share_per_layer"]) == layers
    assert min(routing["min_share_per_layer"]) >= 0.02
    for row in routing["share"]:
        assert sum(row) == pytest.approx(1.0, abs=1e-3)
    assert all(layer["mean"] > 0.01 for layer in routing["js_divergence_bits"])
    for kind in ("moe", "dense"):
        losses = metrics["models"][kind]["heldout_loss"]
        assert set(losses) == {"code", "prose", "numbers", "all"}
        assert all(0 < v < 3.5 for v in losses.values())


def test_routing_on_heldout_uses_every_expert(moe: tuple[Any, Any]) -> None:
    """Independent of the card: route some held-out prose and code, count top-2 choices."""
    model, _ = moe
    cfg = model.config
    x = torch.cat([_heldout_windows("prose", 128, 8), _heldout_windows("code", 128, 8)])
    with torch.no_grad():
        out = model(input_ids=x, output_router_logits=True)
    assert len(out.router_logits) == cfg.num_hidden_layers
    for logits in out.router_logits:
        counts = torch.bincount(logits.topk(2, dim=-1).indices.reshape(-1), minlength=cfg.num_local_experts)
        assert (counts > 0).all()


def test_model_cards_quote_the_metrics(metrics: dict[str, Any]) -> None:
    for name, kind in (("demo", "moe"), ("demo-dense", "dense")):
        folder = demo_model_dir(name)
        assert folder is not None
        card = Path(folder / "README.md").read_text()
        for domain in ("code", "prose", "numbers"):
            assert f"{metrics['models'][kind]['heldout_loss'][domain]:.4f}" in card
        assert "float32" in card
