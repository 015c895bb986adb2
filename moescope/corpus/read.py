"""Read a corpus into documents, for ``moescope trace`` and ``moescope eval``.

What: :func:`read_corpus` turns one or more corpus specs into a stream of
:class:`Document` (text, domain, stable id), filling a :class:`CorpusStats` on the way.
A spec is

- a ``.txt`` file: one document, no domain;
- a ``.jsonl`` file: one JSON object per line with a string field ``text`` and an
  optional string ``domain`` (blank lines are ignored; a malformed line is an error
  that names the file and line);
- a ``.parquet`` file: column ``text``, optional column ``domain`` (read with pyarrow,
  batch by batch);
- a directory: every ``.txt``/``.jsonl``/``.parquet`` file under it, recursively, in
  sorted path order;
- ``-``: standard input, read as JSON Lines when its first non-blank character is ``{``,
  otherwise as one text document;
- the built-in corpus ``demo``, or one domain of it (``demo:code``, ``demo:prose``,
  ``demo:numbers``), built at run time from the interpreter (see
  :mod:`moescope.demo.corpus`). ``split`` (``train`` / ``heldout`` / ``None`` for both)
  selects its deterministic split; a spec may also name the split itself, as in
  ``demo:heldout`` or ``demo:code:train`` (the spec wins over ``split``).

How: everything is a generator, so memory does not grow with the corpus. Documents whose
text is empty or whitespace only are skipped and counted; bytes that are not UTF-8 are
decoded with ``errors="replace"`` and the document is counted, not rejected. The order
of documents is deterministic: specs in the order given, files sorted, rows in order.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moescope.demo.corpus import DOMAINS as DEMO_DOMAINS
from moescope.demo.corpus import SPLITS, iter_demo
from moescope.errors import CorpusError

#: name of the built-in corpus
BUILTIN = "demo"
#: file suffixes a corpus directory is searched for
SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".parquet")

_FIX = "pass a .txt/.jsonl/.parquet file, a directory, '-' or 'demo'"


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    Attributes:
        text: the document's text (never empty).
        domain: its domain, or ``None`` when the corpus has no domains.
        doc_id: a stable id, e.g. ``demo:code:json/decoder.py`` or ``file.jsonl:17``.
    """

    text: str
    domain: str | None
    doc_id: str


@dataclass
class CorpusStats:
    """Counts filled while a corpus is read (reported by trace in ``summary.json``).

    Attributes:
        documents: documents yielded.
        empty_documents: documents skipped because their text was empty or blank.
        non_utf8_documents: documents with bytes that are not UTF-8 (decoded with
            replacement characters and yielded).
        bytes: UTF-8 bytes of the yielded texts.
    """

    documents: int = 0
    empty_documents: int = 0
    non_utf8_documents: int = 0
    bytes: int = 0


def _parse_builtin(spec: str) -> tuple[str | None, str | None] | None:
    """``(domain, split)`` named by a built-in spec, or ``None`` when ``spec`` is not one."""
    parts = spec.split(":")
    if parts[0] != BUILTIN or len(parts) > 3:
        return None
    domain: str | None = None
    split: str | None = None
    for part in parts[1:]:
        if part in DEMO_DOMAINS and domain is None and split is None:
            domain = part
        elif part in SPLITS and split is None:
            split = part
        else:
            return None
    return domain, split


def is_builtin(spec: str) -> bool:
    """Whether ``spec`` names the built-in corpus (``demo``, ``demo:code``, ``demo:code:heldout``...).

    Args:
        spec: a corpus spec as given on the command line.

    Returns:
        ``True`` for ``demo`` optionally followed by ``:domain`` and/or ``:split``.
    """
    return _parse_builtin(spec) is not None


def _decode(raw: bytes) -> tuple[str, bool]:
    """Decode UTF-8 (a leading BOM dropped); the flag says whether bytes had to be replaced."""
    try:
        return raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8-sig", errors="replace"), True


def _emit(doc: Document, bad_utf8: bool, stats: CorpusStats) -> Document | None:
    """Count a document; return it unless it is empty."""
    if bad_utf8:
        stats.non_utf8_documents += 1
    if not doc.text.strip():
        stats.empty_documents += 1
        return None
    stats.documents += 1
    stats.bytes += len(doc.text.encode("utf-8", errors="replace"))
    return doc


def _domain_value(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, (int, float, bool)):
        return str(value)
    raise CorpusError(
        f"{where}: field 'domain' must be a string, got {type(value).__name__}; fix the record."
    )


def _jsonl_lines(lines: Iterable[bytes], name: str, stats: CorpusStats) -> Iterator[Document]:
    for lineno, raw in enumerate(lines, start=1):
        line, bad = _decode(raw)
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(
                f"{where}: malformed JSON ({exc.msg}); each line of a .jsonl corpus must be "
                'one object like {"text": "...", "domain": "..."}.'
            ) from exc
        if not isinstance(rec, dict) or "text" not in rec:
            raise CorpusError(
                f'{where}: no "text" field; each line of a .jsonl corpus must be one object '
                'like {"text": "...", "domain": "..."}.'
            )
        text = rec["text"]
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise CorpusError(f"{where}: field 'text' must be a string, got {type(text).__name__}.")
        doc = Document(text=text, domain=_domain_value(rec.get("domain"), where), doc_id=where)
        out = _emit(doc, bad, stats)
        if out is not None:
            yield out


def _read_txt(path: Path, stats: CorpusStats) -> Iterator[Document]:
    text, bad = _decode(_read_bytes(path))
    out = _emit(Document(text=text, domain=None, doc_id=str(path)), bad, stats)
    if out is not None:
        yield out


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror}); check the path and permissions.") from exc


def _read_jsonl(path: Path, stats: CorpusStats) -> Iterator[Document]:
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror}); check the path and permissions.") from exc
    with fh:
        yield from _jsonl_lines(fh, str(path), stats)


def _read_parquet(path: Path, stats: CorpusStats) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError...
        raise CorpusError(
            f"{path}: not a readable Parquet file ({exc}); pass a valid .parquet file."
        ) from exc
    names = pf.schema_arrow.names
    if "text" not in names:
        raise CorpusError(
            f"{path}: no 'text' column (columns: {', '.join(names)}); a .parquet corpus needs a "
            "string column 'text' and optionally 'domain'."
        )
    columns = ["text"] + (["domain"] if "domain" in names else [])
    row = 0
    for batch in pf.iter_batches(columns=columns, batch_size=1024):
        texts = batch.column("text").to_pylist()
        domains = batch.column("domain").to_pylist() if "domain" in columns else [None] * len(texts)
        for text, domain in zip(texts, domains, strict=True):
            where = f"{path}:{row}"
            row += 1
            bad = False
            if isinstance(text, bytes):
                text, bad = _decode(text)
            elif text is None:
                text = ""
            elif not isinstance(text, str):
                raise CorpusError(f"{where}: column 'text' must hold strings, got {type(text).__name__}.")
            doc = Document(text=text, domain=_domain_value(domain, where), doc_id=where)
            out = _emit(doc, bad, stats)
            if out is not None:
                yield out


def _read_stdin(stats: CorpusStats) -> Iterator[Document]:
    data = sys.stdin.buffer.read()
    if data.lstrip()[:1] == b"{":
        yield from _jsonl_lines(io.BytesIO(data), "<stdin>", stats)
        return
    text, bad = _decode(data)
    out = _emit(Document(text=text, domain=None, doc_id="<stdin>"), bad, stats)
    if out is not None:
        yield out


_FILE_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def _read_dir(path: Path, stats: CorpusStats) -> Iterator[Document]:
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _FILE_READERS),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise CorpusError(f"{path}: the directory holds no .txt, .jsonl or .parquet files; {_FIX}.")
    for file in files:
        yield from _FILE_READERS[file.suffix.lower()](file, stats)


def _read_builtin(spec: str, split: str | None, stats: CorpusStats) -> Iterator[Document]:
    parsed = _parse_builtin(spec)
    assert parsed is not None  # checked by the caller
    domain, spec_split = parsed
    for dom, doc_id, text in iter_demo(domain, spec_split or split):
        out = _emit(Document(text=text, domain=dom, doc_id=doc_id), False, stats)
        if out is not None:
            yield out


def _check_spec(spec: str) -> None:
    """Fail before any reading when a spec cannot be read (so errors come early)."""
    if spec == "-" or is_builtin(spec):
        return
    if spec.startswith(BUILTIN + ":"):
        raise CorpusError(
            f"{spec}: unknown part of the built-in corpus; use demo, demo:DOMAIN with DOMAIN one of "
            f"{', '.join(DEMO_DOMAINS)}, optionally followed by :train or :heldout."
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        return
    if not path.exists():
        raise CorpusError(f"{spec}: no such file or directory; {_FIX}.")
    if path.suffix.lower() not in _FILE_READERS:
        raise CorpusError(f"{spec}: unsupported corpus file type {path.suffix or '(none)'!r}; {_FIX}.")


def read_corpus(
    specs: str | Sequence[str],
    *,
    split: str | None = None,
    stats: CorpusStats | None = None,
) -> Iterator[Document]:
    """Read documents from one or more corpus specs, in a deterministic order.

    Args:
        specs: a spec or a sequence of specs: a ``.txt``/``.jsonl``/``.parquet`` file, a
            directory of those, ``-`` for stdin, or ``demo`` / ``demo:DOMAIN`` (optionally
            ``:train`` / ``:heldout``).
        split: split of the built-in corpus: ``train``, ``heldout`` or ``None`` for all
            documents. Ignored for files (they have no split).
        stats: filled while the iterator is consumed (documents, empty documents,
            non-UTF-8 documents, bytes).

    Returns:
        An iterator of :class:`Document`; empty documents are skipped (and counted).

    Raises:
        CorpusError: an unknown spec, a missing or unreadable file, a malformed JSONL line
            (naming file and line), a Parquet file without a ``text`` column, or an
            unknown split. Spec errors (unknown spec, missing file, bad split) are
            raised by the call itself, before any document is read.
    """
    spec_list = [specs] if isinstance(specs, str) else list(specs)
    if split is not None and split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} (or none for all).")
    if not spec_list:
        raise CorpusError(f"no corpus given; {_FIX}.")
    if spec_list.count("-") > 1:
        raise CorpusError("stdin ('-') can be read only once; pass '-' a single time.")
    for spec in spec_list:
        _check_spec(spec)
    return _generate(spec_list, split, stats if stats is not None else CorpusStats())


def _generate(spec_list: list[str], split: str | None, stats: CorpusStats) -> Iterator[Document]:
    for spec in spec_list:
        if is_builtin(spec):
            yield from _read_builtin(spec, split, stats)
        elif spec == "-":
            yield from _read_stdin(stats)
        else:
            path = Path(spec).expanduser()
            if path.is_dir():
                yield from _read_dir(path, stats)
            else:
                yield from _FILE_READERS[path.suffix.lower()](path, stats)
