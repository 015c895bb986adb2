"""Tests for moescope.evaluation.perplexity and `moescope eval`: windows, perplexity against HF's own loss."""

from __future__ import annotations

import json
import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from moescope.cli.app import app
from moescope.evaluation.perplexity import builtin_split, perplexity, windows

_VOCAB = 99


@dataclass
class Doc:
    text: str
    domain: str | None = None


def char_tokenizer() -> Any:
    """A character-level fast tokenizer over lowercase text (ids < 99), BOS/EOS added."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = string.ascii_lowercase + string.digits + " .,;:!?'\"()-\n"
    vocab = {t: i for i, t in enumerate([*specials, *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny qwen3_moe with a char tokenizer, saved once."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(  # type: ignore[call-arg]  # head_dim goes through **kwargs
        vocab_size=_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=16,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    path = tmp_path_factory.mktemp("eval_lm") / "qwen3"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def loaded(tiny_lm: Path) -> tuple[Any, Any]:
    from moescope.execution.load import load_model

    return load_model(str(tiny_lm), dtype="float32")


@pytest.mark.parametrize(
    ("n", "seq_len", "stride"), [(10, 4, 2), (10, 4, 4), (3, 8, 4), (50, 7, 3), (2, 2, 1)]
)
def test_windows_score_every_token_once(n: int, seq_len: int, stride: int) -> None:
    scored: list[int] = []
    for begin, end, targets in windows(n, seq_len, stride):
        assert end - begin <= seq_len and 0 < targets < end - begin + 1
        scored.extend(range(end - targets, end))
    assert scored == list(range(1, n))


def test_single_window_equals_hf_loss(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    text = "the quick brown fox jumps over the lazy dog."
    res = perplexity(model, tok, [Doc(text)], seq_len=128, stride=64)
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert res.tokens == len(ids) - 1
    assert res.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert res.domains == {}


@pytest.mark.parametrize(("seq_len", "stride"), [(16, 16), (16, 5)])
def test_strided_windows_match_hf_label_masking(loaded: tuple[Any, Any], seq_len: int, stride: int) -> None:
    """HF's recipe: per window, labels -100 except the new targets; sum loss x targets."""
    model, tok = loaded
    text = "abc def ghi jkl mno pqr stu vwx yz " * 3
    res = perplexity(model, tok, [Doc(text)], seq_len=seq_len, stride=stride, batch_size=3)
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    nll, count, prev_end = 0.0, 0, 1
    end = seq_len
    with torch.no_grad():
        while prev_end < len(ids):
            end = min(end, len(ids))
            begin = max(0, end - seq_len)
            window = torch.tensor([ids[begin:end]])
            labels = window.clone()
            labels[:, : -(end - prev_end)] = -100
            nll += float(model(input_ids=window, labels=labels).loss) * (end - prev_end)
            count += end - prev_end
            prev_end = end
            end += min(stride, seq_len - 1)
    assert res.tokens == count == len(ids) - 1
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_domains_pool_to_overall(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    docs = [
        Doc("def f(x): return x", "code"),
        Doc("once upon a time.", "prose"),
        Doc("1 2 3 4 5 6", "numbers"),
        Doc("print(1)", "code"),
    ]
    res = perplexity(model, tok, docs, seq_len=32, stride=16)
    assert set(res.domains) == {"code", "prose", "numbers"}
    assert res.domains["code"].documents == 2
    total = sum(d.tokens for d in res.domains.values())
    assert total == res.tokens
    pooled = math.exp(sum(d.nll for d in res.domains.values()) / total)
    assert res.perplexity == pytest.approx(pooled)
    capped = perplexity(model, tok, docs, seq_len=32, stride=16, max_tokens=15)
    assert all(d.tokens <= 5 for d in capped.domains.values())


def test_builtin_split_defaults_to_heldout() -> None:
    assert builtin_split(["demo"], None) == "heldout"
    assert builtin_split(["demo:code", "demo"], None) == "heldout"
    assert builtin_split(["notes.txt"], None) is None
    assert builtin_split(["demo"], "train") == "train"


runner = CliRunner()


def test_cli_eval_jsonl(tiny_lm: Path, tmp_path: Path) -> None:
    pytest.importorskip("moescope.corpus.read")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "\n".join(
            json.dumps({"text": t, "domain": d}) for t, d in [("hello world.", "a"), ("x = 1 + 2", "b")]
        )
        + "\n"
    )
    res = runner.invoke(
        app, ["eval", str(tiny_lm), str(corpus), "--seq-len", "8", "--json"], catch_exceptions=False
    )
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert set(data["domains"]) == {"a", "b"}
    assert data["tokens"] == sum(data["domain_tokens"].values())
    assert data["perplexity"] > 1


def test_cli_eval_bad_stride(tiny_lm: Path) -> None:
    res = runner.invoke(app, ["eval", str(tiny_lm), "demo", "--seq-len", "8", "--stride", "9"])
    assert res.exit_code == 2
    assert "Traceback" not in res.stderr
