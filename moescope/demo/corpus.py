"""The built-in ``demo`` corpus: three domains assembled at run time from the interpreter.

What: documents in three domains, built from what every Python installation has, so the
repository ships no text:

- ``code``: source files of the standard library (``sysconfig.get_path("stdlib")``);
- ``prose``: the pydoc topic texts (``pydoc_data.topics.topics``);
- ``numbers``: CSV tables and JSON records from a seeded, version-independent generator.

How: every choice is deterministic. Stdlib files are walked, filtered (no tests, GUI or
vendored packages, at least :data:`CODE_MIN_BYTES`), ranked by a SHA-1 of their relative
path, the first :data:`CODE_MAX_FILES` kept and then sorted by path; ranking by hash
rather than taking "every n-th" means a file missing on one machine does not shift the
rest. Each document is cut at a line boundary to a size cap, so the whole corpus is about
2.5 MB. The ``train``/``heldout`` split is a SHA-256 of the document id (never Python's
randomised ``hash()``): :data:`HELDOUT_FRACTION` of the ids go to ``heldout``. The
numbers generator is a SplitMix64 written out here, so its output does not depend on
the ``random`` module's implementation.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

DOMAINS: tuple[str, ...] = ("code", "prose", "numbers")
SPLITS: tuple[str, ...] = ("train", "heldout")

#: share of document ids that the stable hash sends to ``heldout``
HELDOUT_FRACTION = 0.15
#: stdlib files smaller than this are skipped (mostly one-line ``__init__`` files)
CODE_MIN_BYTES = 2_000
#: at most this many stdlib files are used
CODE_MAX_FILES = 160
#: each code document is cut (at a line boundary) to at most this many characters
CODE_MAX_CHARS = 8_000
#: each pydoc topic is cut (at a line boundary) to at most this many characters
PROSE_MAX_CHARS = 16_000
#: number of generated ``numbers`` documents
NUMBERS_DOCS = 300
#: seed of the ``numbers`` generator
NUMBERS_SEED = 20240601

# Directories of the stdlib that are tests, GUI toolkits, vendored wheels, the pydoc topics
# themselves (they are the prose domain) or data tables rather than code.
_EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "site-packages",
        "dist-packages",
        "ensurepip",
        "lib2to3",
        "__pycache__",
        "pydoc_data",
        "encodings",
        "distutils",
        "venv",
    }
)


def stable_fraction(key: str) -> float:
    """Map a string to [0, 1) with SHA-256: the same on every machine and every run."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(doc_id: str) -> str:
    """The split (``train`` or ``heldout``) a demo document id belongs to."""
    return "heldout" if stable_fraction(doc_id) < HELDOUT_FRACTION else "train"


def _cut(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters, at the last line break before it."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    nl = head.rfind("\n")
    return head[: nl + 1] if nl > 0 else head


@lru_cache(maxsize=1)
def stdlib_files() -> tuple[str, ...]:
    """Relative paths (posix style) of the standard-library files the ``code`` domain uses."""
    root = Path(sysconfig.get_path("stdlib"))
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith(("config-", "."))
        )
        for name in filenames:
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            path = Path(dirpath) / name
            try:
                if path.stat().st_size < CODE_MIN_BYTES:
                    continue
            except OSError:
                continue
            found.append(path.relative_to(root).as_posix())
    ranked = sorted(found, key=lambda rel: hashlib.sha1(rel.encode("utf-8")).hexdigest())
    return tuple(sorted(ranked[:CODE_MAX_FILES]))


def _code_documents() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_path("stdlib"))
    for rel in stdlib_files():
        raw = (root / rel).read_bytes()
        yield f"demo:code:{rel}", _cut(raw.decode("utf-8", errors="replace"), CODE_MAX_CHARS)


def _prose_documents() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"demo:prose:{name}", _cut(str(topics[name]), PROSE_MAX_CHARS)


class _SplitMix64:
    """A tiny 64-bit generator whose output is fixed by its seed on every Python version."""

    _MASK = (1 << 64) - 1

    def __init__(self, seed: int) -> None:
        self.state = seed & self._MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & self._MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self._MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self._MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * (self.next() >> 11) / float(1 << 53)

    def choice(self, items: tuple[str, ...]) -> str:
        return items[self.below(len(items))]


_CITIES = ("Oslo", "Lima", "Kyoto", "Accra", "Quito", "Perth", "Turin", "Dakar", "Hanoi", "Bergen")
_ITEMS = ("bolt", "nut", "washer", "gear", "spring", "valve", "hinge", "rivet", "clamp", "pulley")
_STATUS = ("ok", "late", "failed", "pending", "shipped")


def _date(rng: _SplitMix64) -> str:
    return f"20{10 + rng.below(15):02d}-{1 + rng.below(12):02d}-{1 + rng.below(28):02d}"


def _numbers_document(rng: _SplitMix64, index: int) -> str:
    """One generated document: a CSV table, a JSON Lines log or a JSON array of records."""
    kind = index % 3
    rows = 8 + rng.below(25)
    if kind == 0:
        lines = ["id,date,city,item,quantity,unit_price,total"]
        for i in range(rows):
            qty = 1 + rng.below(500)
            price = round(rng.uniform(0.05, 250.0), 2)
            lines.append(
                f"{index * 1000 + i},{_date(rng)},{rng.choice(_CITIES)},{rng.choice(_ITEMS)},"
                f"{qty},{price:.2f},{qty * price:.2f}"
            )
        return "\n".join(lines) + "\n"
    if kind == 1:
        out = []
        for i in range(rows):
            rec = {
                "seq": i,
                "sensor": f"s{rng.below(64):02d}",
                "t": round(rng.uniform(-30.0, 45.0), 3),
                "rh": round(rng.uniform(0.0, 100.0), 1),
                "status": rng.choice(_STATUS),
            }
            out.append(json.dumps(rec))
        return "\n".join(out) + "\n"
    recs = [
        {
            "order": index * 100 + i,
            "date": _date(rng),
            "lines": [
                {"item": rng.choice(_ITEMS), "qty": 1 + rng.below(40)} for _ in range(1 + rng.below(3))
            ],
            "paid": bool(rng.below(2)),
        }
        for i in range(rows // 3 + 2)
    ]
    return json.dumps(recs, indent=1) + "\n"


def _numbers_documents() -> Iterator[tuple[str, str]]:
    rng = _SplitMix64(NUMBERS_SEED)
    for i in range(NUMBERS_DOCS):
        yield f"demo:numbers:{i:04d}", _numbers_document(rng, i)


_READERS = {"code": _code_documents, "prose": _prose_documents, "numbers": _numbers_documents}


def iter_demo(domain: str | None = None, split: str | None = None) -> Iterator[tuple[str, str, str]]:
    """Yield ``(domain, doc_id, text)`` of the demo corpus, in a fixed order.

    Args:
        domain: one of :data:`DOMAINS`, or ``None`` for all three (in that order).
        split: ``train``, ``heldout`` or ``None`` for both.

    Returns:
        An iterator of ``(domain, doc_id, text)``; within a domain documents are sorted by id.

    Raises:
        ValueError: for an unknown domain or split (the corpus reader turns it into a
            ``CorpusError``).
    """
    if domain is not None and domain not in DOMAINS:
        raise ValueError(f"unknown demo domain {domain!r}; use one of {', '.join(DOMAINS)}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    for name in DOMAINS if domain is None else (domain,):
        for doc_id, text in _READERS[name]():
            if split is None or split_of(doc_id) == split:
                yield name, doc_id, text
