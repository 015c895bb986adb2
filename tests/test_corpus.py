"""Corpus readers: file formats, directories, stdin, the built-in demo corpus and its splits."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moescope.corpus.read import CorpusStats, Document, is_builtin, read_corpus
from moescope.demo import corpus as demo_corpus
from moescope.errors import CorpusError

_NUMBERS_SHA256 = "1f17f7fd223bcf7cbf5f36f6b034ff47755483c3f352b5b5a1b5bf456d0f4ee2"


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_txt_is_one_document(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("hello\nworld\n", encoding="utf-8")
    stats = CorpusStats()
    docs = list(read_corpus(str(f), stats=stats))
    assert docs == [Document(text="hello\nworld\n", domain=None, doc_id=str(f))]
    assert stats == CorpusStats(documents=1, empty_documents=0, non_utf8_documents=0, bytes=12)


def test_jsonl_domains_ids_and_empty_skipped(tmp_path: Path) -> None:
    f = _write_jsonl(
        tmp_path / "c.jsonl",
        [{"text": "one", "domain": "a"}, {"text": "  "}, {"text": "three", "domain": None}],
    )
    stats = CorpusStats()
    docs = list(read_corpus(str(f), stats=stats))
    assert [(d.text, d.domain, d.doc_id) for d in docs] == [
        ("one", "a", f"{f}:1"),
        ("three", None, f"{f}:3"),
    ]
    assert stats.documents == 2 and stats.empty_documents == 1


def test_jsonl_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.jsonl:3: malformed JSON"):
        list(read_corpus(str(f)))
    g = _write_jsonl(tmp_path / "notext.jsonl", [{"body": "x"}])
    with pytest.raises(CorpusError, match=r"notext\.jsonl:1: no \"text\" field"):
        list(read_corpus(str(g)))


def test_non_utf8_is_replaced_and_counted(tmp_path: Path) -> None:
    f = tmp_path / "latin.txt"
    f.write_bytes("café".encode("latin-1"))
    stats = CorpusStats()
    (doc,) = read_corpus(str(f), stats=stats)
    assert doc.text == "caf\ufffd"
    assert stats.non_utf8_documents == 1


def test_parquet_with_and_without_domain(tmp_path: Path) -> None:
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["x", "", "z"], "domain": ["d1", "d1", "d2"]}), f)
    stats = CorpusStats()
    docs = list(read_corpus(str(f), stats=stats))
    assert [(d.text, d.domain, d.doc_id) for d in docs] == [("x", "d1", f"{f}:0"), ("z", "d2", f"{f}:2")]
    assert stats.empty_documents == 1
    g = tmp_path / "nodomain.parquet"
    pq.write_table(pa.table({"text": ["only"]}), g)
    assert [d.domain for d in read_corpus(str(g))] == [None]
    h = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"body": ["x"]}), h)
    with pytest.raises(CorpusError, match="no 'text' column"):
        list(read_corpus(str(h)))


def test_directory_is_sorted_and_recursive(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z", encoding="utf-8")
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    _write_jsonl(tmp_path / "b" / "m.jsonl", [{"text": "m"}])
    (tmp_path / "ignored.csv").write_text("x,y", encoding="utf-8")
    assert [d.text for d in read_corpus(str(tmp_path))] == ["a", "m", "z"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="no .txt, .jsonl or .parquet"):
        list(read_corpus(str(empty)))


def test_several_specs_keep_their_order(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text("A", encoding="utf-8")
    b.write_text("B", encoding="utf-8")
    assert [d.text for d in read_corpus([str(b), str(a)])] == ["B", "A"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"text": "j1", "domain": "q"}\n{"text": "j2"}\n', [("j1", "q"), ("j2", None)]),
        (b"plain text\n{not json}\n", [("plain text\n{not json}\n", None)]),
    ],
)
def test_stdin_jsonl_or_text(
    monkeypatch: pytest.MonkeyPatch, data: bytes, expected: list[tuple[str, str | None]]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert [(d.text, d.domain) for d in read_corpus("-")] == expected


@pytest.mark.parametrize("spec", ["nope.txt", "file.csv", "demo:poetry", "demo:code:dev"])
def test_unknown_specs_name_the_fix(tmp_path: Path, spec: str) -> None:
    if spec == "file.csv":
        (tmp_path / spec).write_text("a,b", encoding="utf-8")
    with pytest.raises(CorpusError) as info:
        read_corpus(str(tmp_path / spec) if not spec.startswith("demo") else spec)
    msg = str(info.value)
    assert "demo" in msg and spec.split(":")[-1].split(".")[0] in msg


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(CorpusError, match="unknown split 'test'"):
        read_corpus("demo", split="test")


def test_is_builtin() -> None:
    for spec in ["demo", "demo:code", "demo:prose", "demo:numbers", "demo:heldout", "demo:code:train"]:
        assert is_builtin(spec), spec
    for spec in ["demo.txt", "demo:poetry", "demo:train:code", "demos", "-", "x/demo", "demo:code:x"]:
        assert not is_builtin(spec), spec


# --- the built-in corpus -------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_docs() -> list[Document]:
    return list(read_corpus("demo"))


def test_demo_has_three_domains_of_sensible_size(demo_docs: list[Document]) -> None:
    by_domain = Counter(d.domain for d in demo_docs)
    assert set(by_domain) == {"code", "prose", "numbers"}
    assert by_domain["numbers"] == demo_corpus.NUMBERS_DOCS
    assert 50 <= by_domain["code"] <= demo_corpus.CODE_MAX_FILES
    assert by_domain["prose"] >= 50
    size = sum(len(d.text.encode()) for d in demo_docs)
    assert 500_000 < size < 4_000_000  # "a few MB at most"
    assert max(len(d.text) for d in demo_docs if d.domain == "code") <= demo_corpus.CODE_MAX_CHARS
    assert all(d.doc_id.startswith(f"demo:{d.domain}:") for d in demo_docs)
    assert len({d.doc_id for d in demo_docs}) == len(demo_docs)


def test_demo_domains_have_the_expected_content(demo_docs: list[Document]) -> None:
    code = [d for d in demo_docs if d.domain == "code"]
    prose = [d for d in demo_docs if d.domain == "prose"]
    numbers = [d for d in demo_docs if d.domain == "numbers"]
    assert sum("def " in d.text for d in code) > 0.8 * len(code)
    assert any(d.doc_id == "demo:prose:if" for d in prose)
    assert all(d.text[:1] in "i{[" for d in numbers)  # CSV header "id,...", JSON lines, JSON array
    digits = sum(c.isdigit() for d in numbers for c in d.text) / sum(len(d.text) for d in numbers)
    assert digits > 0.2
    prose_digits = sum(c.isdigit() for d in prose for c in d.text) / sum(len(d.text) for d in prose)
    assert prose_digits < 0.05


def test_demo_split_is_a_partition_by_stable_hash(demo_docs: list[Document]) -> None:
    train = list(read_corpus("demo", split="train"))
    heldout = list(read_corpus("demo", split="heldout"))
    assert len(train) + len(heldout) == len(demo_docs)
    assert not {d.doc_id for d in train} & {d.doc_id for d in heldout}
    for dom in ("code", "prose", "numbers"):
        n_held = sum(d.domain == dom for d in heldout)
        n_all = sum(d.domain == dom for d in demo_docs)
        assert 0.05 * n_all < n_held < 0.3 * n_all, dom
    # SHA-256 based, so the assignment is a fixed fact, not a per-process accident.
    assert demo_corpus.split_of("demo:numbers:0000") == demo_corpus.split_of("demo:numbers:0000")
    assert [demo_corpus.split_of(f"demo:numbers:{i:04d}") for i in range(8)] == [
        "heldout" if demo_corpus.stable_fraction(f"demo:numbers:{i:04d}") < 0.15 else "train"
        for i in range(8)
    ]
    assert demo_corpus.stable_fraction("demo:prose:if") == pytest.approx(
        int.from_bytes(hashlib.sha256(b"demo:prose:if").digest()[:8], "big") / 2**64
    )


def test_demo_domain_and_split_specs(demo_docs: list[Document]) -> None:
    code_held = list(read_corpus("demo:code", split="heldout"))
    assert code_held and all(d.domain == "code" for d in code_held)
    assert code_held == list(read_corpus("demo:code:heldout"))
    assert code_held == [
        d for d in demo_docs if d.domain == "code" and demo_corpus.split_of(d.doc_id) == "heldout"
    ]
    # the split named in the spec wins over the keyword
    assert list(read_corpus("demo:numbers:train", split="heldout")) == list(read_corpus("demo:numbers:train"))


def test_demo_is_deterministic(demo_docs: list[Document]) -> None:
    demo_corpus.stdlib_files.cache_clear()
    again = list(read_corpus("demo"))
    assert again == demo_docs
    # Pin the generator: the first numbers document is the same on every machine.
    first = next(read_corpus("demo:numbers"))
    assert first.doc_id.startswith("demo:numbers:")
    assert first.text.startswith("id,date,city,item,quantity,unit_price,total\n")
    lines = first.text.splitlines()
    assert all(len(line.split(",")) == 7 for line in lines)
    qty, price, total = lines[1].split(",")[4:]
    assert float(total) == pytest.approx(int(qty) * float(price), abs=0.01)
    # The generator is a hand-written SplitMix64, so the whole domain is a golden value.
    text = "".join(d.text for d in read_corpus("demo:numbers"))
    assert hashlib.sha256(text.encode()).hexdigest() == _NUMBERS_SHA256
