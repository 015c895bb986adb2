"""A small demo trace with routes over many short documents, shared by the serving tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

#: short documents, so concurrent batches of up to 8 documents exist
DOCS = 16
DOC_CHARS = 200


def demo_routes_trace(root: Path) -> Path:
    """Trace the demo model with ``--save-routes`` over :data:`DOCS` short held-out documents."""
    import moescope
    from moescope.corpus.read import read_corpus

    lines = []
    for doc in read_corpus("demo", split="heldout"):
        lines.append({"text": doc.text[:DOC_CHARS], "domain": doc.domain})
        if len(lines) == DOCS:
            break
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = root / "trace"
    moescope.trace("demo", str(corpus), str(out), save_routes=True, seq_len=128)
    return out


@pytest.fixture(scope="session")
def demo_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`demo_routes_trace`, traced once per session."""
    return demo_routes_trace(tmp_path_factory.mktemp("serving_trace"))
