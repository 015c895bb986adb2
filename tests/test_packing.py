"""One packing convention for trace, eval and similarity: documents, windows, held-out default."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from moescope.corpus.packing import (
    PackStats,
    collate,
    domain_streams,
    encode_document,
    pack_windows,
    pad_token_id,
    resolve_split,
    sliding_windows,
    token_batches,
)
from moescope.evaluation import perplexity as evaluate


@dataclass
class Doc:
    text: str
    domain: str | None = None


def _tokenizer(template: str | None = "<s> $A") -> Any:
    """Character-level tokenizer; ``template`` is what it adds around a text (BOS by default)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = string.ascii_lowercase + string.digits + " .,;:!?'\"()-\n"
    vocab = {t: i for i, t in enumerate([*specials, *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if template is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[("<s>", 1), ("</s>", 2)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def test_document_gets_the_tokenizers_specials_and_one_eos() -> None:
    bos = _tokenizer()
    plain = bos("ab", add_special_tokens=False)["input_ids"]
    assert encode_document(bos, "ab") == [1, *plain, 2]
    assert encode_document(_tokenizer("$A </s>"), "ab") == [*plain, 2]  # EOS already last: not doubled
    assert encode_document(_tokenizer(None), "ab") == [*plain, 2]
    assert encode_document(bos, "") == []
    assert pad_token_id(bos) == 0


@pytest.mark.parametrize(
    ("specs", "split", "want"),
    [
        (["demo"], None, "heldout"),
        (["demo:code", "demo"], None, "heldout"),
        ("demo:prose", None, "heldout"),
        (["demo"], "train", "train"),
        (["demo"], "all", None),
        (["notes.txt"], None, None),
        (["demo", "notes.txt"], None, None),
    ],
)
def test_held_out_default(specs: Any, split: str | None, want: str | None) -> None:
    assert resolve_split(specs, split) == want
    assert evaluate.builtin_split is resolve_split


def _stream(tok: Any, docs: list[Doc]) -> list[int]:
    return [i for d in docs for i in encode_document(tok, d.text)]


def test_consecutive_windows_cover_the_stream_once() -> None:
    tok = _tokenizer()
    docs = [Doc(f"doc {i} " * (i + 1), "a" if i % 2 else "b") for i in range(7)] + [Doc("")]
    stats = PackStats()
    wins = list(pack_windows(docs, tok, 10, stats=stats))
    stream = _stream(tok, docs)
    assert [len(w.tokens) for w in wins[:-1]] == [10] * (len(wins) - 1) and 0 < len(wins[-1].tokens) <= 10
    assert np.concatenate([w.tokens for w in wins]).tolist() == stream
    assert stats.tokens == len(stream) and stats.documents == 7
    docs_of = np.concatenate([w.docs for w in wins])
    assert docs_of.tolist() == [i for i, d in enumerate(docs) for _ in encode_document(tok, d.text)]
    domains = np.concatenate([w.domains for w in wins])
    assert set(domains.tolist()) == {0, 1}  # first-appearance order: b -> 0, a -> 1
    capped = list(pack_windows(docs, tok, 10, max_tokens=25))
    assert np.concatenate([w.tokens for w in capped]).tolist() == stream[:25]


def test_collate_pads_and_masks() -> None:
    wins = list(pack_windows([Doc("abcdefgh"), Doc("xy")], _tokenizer(), 8))
    batch = collate(wins, pad_id=0)
    assert batch.tokens.shape == (2, 8)
    assert batch.mask.sum(dim=1).tolist() == [8, 6]
    assert (batch.tokens[1, 6:] == 0).all() and (batch.docs[1, 6:] == -1).all()


def test_token_batches_never_cut_a_row() -> None:
    tok = _tokenizer()
    texts = [f"text number {i}." for i in range(9)]
    batches = list(token_batches(tok, texts, seq_len=16, batch_size=3, max_tokens=100))
    rows = [row for b in batches for row in b.tolist()]
    assert [t for row in rows for t in row] == _stream(tok, [Doc(t) for t in texts])[:100]
    assert all(len(r) == 16 for r in rows[:-1]) and len(rows[-1]) == 100 % 16
    assert all(b.dtype == torch.long for b in batches)


def test_eval_streams_are_the_same_documents_per_domain() -> None:
    tok = _tokenizer()
    docs = [Doc("one.", "a"), Doc("two.", "b"), Doc("three.", "a")]
    streams, counts = domain_streams(docs, tok)
    assert streams["a"] == _stream(tok, [docs[0], docs[2]]) and streams["b"] == _stream(tok, [docs[1]])
    assert counts == {"a": 2, "b": 1}
    assert evaluate.windows is sliding_windows


def test_trace_runs_the_packed_stream(tmp_path: Path) -> None:
    """What trace routes is exactly the packed stream (BOS included), window by window."""
    from moescope.tracing import trace_model
    from tests.tiny import tiny_model

    torch.manual_seed(0)
    model = tiny_model("qwen3_moe")
    tok = _tokenizer()
    docs = [Doc(f"document {i}: hello.", "a" if i % 2 else "b") for i in range(6)]
    trace_model(model, tok, docs, tmp_path / "t", seq_len=16, batch_size=2, save_routes=True, plots=False)
    routes = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "t" / "routes").glob("*.parquet")))
    routes = routes.sort_values(["window", "position"])
    assert routes["token_id"].tolist() == _stream(tok, docs)
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["tokens"] == len(_stream(tok, docs)) and "special tokens" in summary["packing"]


def test_library_reads_held_out_demo_by_default(tmp_path: Path) -> None:
    from moescope.tracing import run_trace

    res = run_trace("demo", "demo", tmp_path / "t", max_tokens=32, seq_len=16, plots=False)
    assert res.summary["split"] == "heldout"
    res = run_trace("demo", "demo", tmp_path / "t", split="all", max_tokens=32, seq_len=16, plots=False)
    assert res.summary["split"] is None
