"""Token packing: one convention for the token windows of trace, eval and similarity.

What: how documents become the token windows a model runs on.

- **Split**: :func:`resolve_split` gives the built-in corpus's held-out text by default
  (when every spec is ``demo``/``demo:...`` and no split is asked for), ``all`` means
  every document. Library functions apply it, so the CLI and the Python API read the
  same documents.
- **Documents**: :func:`encode_document` tokenises a document with the tokenizer's own
  special tokens (a BOS token where the tokenizer adds one) and appends EOS unless the
  tokenizer already ended it with EOS. An empty text gives no tokens.
- **Stream**: documents are concatenated in corpus order; each token keeps its document
  index and domain. ``max_tokens`` truncates the stream.
- **Windows**: two ways to cut a stream, one per need.
  :func:`pack_windows` cuts it into consecutive ``seq_len`` windows, so every token is
  run exactly once (trace, similarity); a window may span a document boundary (attention
  is not masked across it, as in pretraining packing) and only the last window can be
  short (:func:`collate` pads it and masks the padding out).
  :func:`sliding_windows` slides a ``seq_len`` window so every token after the first is
  scored exactly once with context (eval); eval keeps one stream per domain
  (:func:`domain_streams`), so a domain's perplexity never conditions on another domain.

How: everything is a generator over documents, so memory does not grow with the corpus.
torch is imported only by the functions that build tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

#: the split that means every document of the built-in corpus
ALL_SPLITS = "all"

#: how trace windows are packed (recorded in ``summary.json`` as ``packing``)
PACKING = (
    "eos-joined stream: each document tokenised with the tokenizer's own special tokens, EOS appended "
    "unless already last, documents concatenated and cut into consecutive seq_len windows (a window may "
    "span documents; tokens keep their document index); the last window padded and masked"
)


class DocumentLike(Protocol):
    """What packing needs from a document (``moescope.corpus.read.Document``)."""

    @property
    def text(self) -> str: ...

    @property
    def domain(self) -> str | None: ...


def resolve_split(specs: str | Sequence[str], split: str | None) -> str | None:
    """The split to read: held-out text by default for the built-in corpus.

    Args:
        specs: corpus specs as given by the user.
        split: the split asked for: ``train``, ``heldout``, ``all`` or ``None`` (default).

    Returns:
        ``"heldout"`` when ``split`` is ``None`` and every spec names the built-in corpus;
        ``None`` (every document) for ``"all"``; otherwise ``split`` unchanged (files have
        no split and ignore it).
    """
    from moescope.corpus.read import is_builtin

    spec_list = [specs] if isinstance(specs, str) else list(specs)
    if split == ALL_SPLITS:
        return None
    if split is None and spec_list and all(is_builtin(s) for s in spec_list):
        return "heldout"
    return split


def encode_document(tokenizer: Any, text: str) -> list[int]:
    """Token ids of one document: the tokenizer's special tokens, then EOS unless already last.

    Args:
        tokenizer: a transformers tokenizer.
        text: the document.

    Returns:
        The ids (empty for an empty text).
    """
    if not text:
        return []
    ids = [int(i) for i in tokenizer(text)["input_ids"]]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(int(eos))
    return ids


def pad_token_id(tokenizer: Any) -> int:
    """The id that fills padded positions (pad, else EOS, else 0); padding is always masked."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            return int(value)
    return 0


# --------------------------------------------------------------------------- consecutive windows


@dataclass
class Window:
    """One window of the packed stream.

    Attributes:
        tokens: ``int64 [n]`` token ids (``n <= seq_len``; only the last window is shorter).
        docs: ``int64 [n]`` index of each token's document in the corpus.
        domains: ``int64 [n]`` domain index of each token (``-1``: no domain).
    """

    tokens: np.ndarray
    docs: np.ndarray
    domains: np.ndarray


@dataclass
class PackStats:
    """Counts filled while :func:`pack_windows` is consumed.

    Attributes:
        documents: documents that contributed tokens.
        tokens: stream tokens emitted in windows.
    """

    documents: int = 0
    tokens: int = 0


def pack_windows(
    documents: Iterable[DocumentLike],
    tokenizer: Any,
    seq_len: int,
    *,
    max_tokens: int | None = None,
    domain_index: Callable[[str], int] | None = None,
    stats: PackStats | None = None,
) -> Iterator[Window]:
    """Cut the stream of encoded documents into consecutive ``seq_len`` windows.

    Args:
        documents: objects with ``text`` and ``domain``, in corpus order.
        tokenizer: a transformers tokenizer.
        seq_len: tokens per window.
        max_tokens: truncate the stream to this many tokens.
        domain_index: maps a domain name to its index (default: order of first appearance).
        stats: filled with the documents used and the tokens emitted.

    Returns:
        An iterator of :class:`Window`.
    """
    stats = stats if stats is not None else PackStats()
    if domain_index is None:
        seen: dict[str, int] = {}
        domain_index = lambda name: seen.setdefault(name, len(seen))  # noqa: E731
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    buffered = 0
    for index, doc in enumerate(documents):
        ids = encode_document(tokenizer, doc.text)
        if not ids:
            continue  # empty documents are counted by the corpus reader, not packed
        if max_tokens is not None:
            ids = ids[: max(0, max_tokens - stats.tokens - buffered)]
            if not ids:
                break
        stats.documents += 1
        dom = domain_index(str(doc.domain)) if doc.domain is not None else -1
        arr = np.asarray(ids, dtype=np.int64)
        parts.append((arr, np.full(len(arr), index, dtype=np.int64), np.full(len(arr), dom, dtype=np.int64)))
        buffered += len(arr)
        if buffered >= seq_len:
            t, d, m = (np.concatenate([p[i] for p in parts]) for i in range(3))
            start = 0
            while buffered - start >= seq_len:
                end = start + seq_len
                yield Window(t[start:end], d[start:end], m[start:end])
                start = end
                stats.tokens += seq_len
            parts = [(t[start:], d[start:], m[start:])]
            buffered -= start
        if max_tokens is not None and stats.tokens + buffered >= max_tokens:
            break
    if buffered:
        stats.tokens += buffered
        yield Window(*(np.concatenate([p[i] for p in parts]) for i in range(3)))


def batched(windows: Iterable[Window], batch_size: int) -> Iterator[list[Window]]:
    """Group windows ``batch_size`` at a time (the last group may be smaller)."""
    batch: list[Window] = []
    for w in windows:
        batch.append(w)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class Batch:
    """Windows as padded tensors, ``[B, W]`` with ``W`` the longest window.

    Attributes:
        tokens: token ids (padding: :func:`pad_token_id`).
        mask: ``True`` on real tokens.
        docs: document index per token (``-1`` on padding).
        domains: domain index per token (``-1`` on padding or no domain).
    """

    tokens: Any
    mask: Any
    docs: Any
    domains: Any


def collate(windows: Sequence[Window], pad_id: int) -> Batch:
    """Stack windows into a :class:`Batch`, padding short rows on the right."""
    import torch

    width = max(len(w.tokens) for w in windows)
    shape = (len(windows), width)
    out = Batch(
        tokens=torch.full(shape, pad_id, dtype=torch.long),
        mask=torch.zeros(shape, dtype=torch.bool),
        docs=torch.full(shape, -1, dtype=torch.long),
        domains=torch.full(shape, -1, dtype=torch.long),
    )
    for r, w in enumerate(windows):
        n = len(w.tokens)
        out.tokens[r, :n] = torch.from_numpy(w.tokens)
        out.mask[r, :n] = True
        out.docs[r, :n] = torch.from_numpy(w.docs)
        out.domains[r, :n] = torch.from_numpy(w.domains)
    return out


@dataclass(frozen=True)
class _Text:
    text: str
    domain: str | None = None


def token_batches(
    tokenizer: Any,
    texts: Iterable[str],
    *,
    seq_len: int = 128,
    batch_size: int = 4,
    max_tokens: int = 8192,
) -> Iterator[Any]:
    """``[B, W]`` token-id tensors of consecutive windows, without padding (for sampling activations).

    Full windows come ``batch_size`` at a time; a short last window comes alone, so no
    row is ever cut or padded.

    Args:
        tokenizer: a transformers tokenizer.
        texts: document texts in corpus order.
        seq_len: tokens per window.
        batch_size: windows per tensor.
        max_tokens: truncate the stream to this many tokens.

    Returns:
        An iterator of ``torch.long`` tensors.
    """
    import torch

    docs = (_Text(t) for t in texts)
    pending: list[Window] = []
    for w in pack_windows(docs, tokenizer, seq_len, max_tokens=max_tokens):
        if len(w.tokens) < seq_len:
            if pending:
                yield torch.from_numpy(np.stack([p.tokens for p in pending]))
            yield torch.from_numpy(w.tokens[None])
            return
        pending.append(w)
        if len(pending) == batch_size:
            yield torch.from_numpy(np.stack([p.tokens for p in pending]))
            pending = []
    if pending:
        yield torch.from_numpy(np.stack([p.tokens for p in pending]))


# --------------------------------------------------------------------------- sliding windows


def domain_streams(
    documents: Iterable[DocumentLike], tokenizer: Any
) -> tuple[dict[str | None, list[int]], dict[str | None, int]]:
    """One token stream per domain (documents encoded and concatenated in corpus order).

    Returns:
        ``(streams, documents)``: domain (``None``: no domain) -> token ids, and -> documents read.
    """
    streams: dict[str | None, list[int]] = {}
    counts: dict[str | None, int] = {}
    for doc in documents:
        streams.setdefault(doc.domain, []).extend(encode_document(tokenizer, doc.text))
        counts[doc.domain] = counts.get(doc.domain, 0) + 1
    return streams, counts


def sliding_windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over a stream of ``n`` tokens as ``(begin, end, targets)``.

    Window ends advance by ``stride`` (at most ``seq_len - 1``, so even "disjoint"
    windows give their first target one token of context); each window scores its last
    ``targets`` tokens. Together the windows score tokens ``1 .. n-1`` exactly once.
    """
    step = max(1, min(stride, seq_len - 1))
    out: list[tuple[int, int, int]] = []
    prev_end = 1  # token 0 has no context and is never scored
    end = min(seq_len, n)
    while prev_end < n:
        begin = max(0, end - seq_len)
        out.append((begin, end, end - prev_end))
        prev_end = end
        end = min(end + step, n)
    return out


# --------------------------------------------------------------------------- windows inside the context

POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
#: the default window of ``eval`` and ``sweep`` when the model's context allows it
DEFAULT_SEQ_LEN = 512


def model_context(config: Any) -> int | None:
    """The positions ``config``'s model was trained on (its first position field), or None."""
    get_text = getattr(config, "get_text_config", None)
    cfg = get_text() if callable(get_text) else config
    for name in POSITION_FIELDS:
        limit = cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return limit
    return None


def default_seq_len(config: Any) -> int:
    """:data:`DEFAULT_SEQ_LEN`, or the model's context when that is shorter."""
    ctx = model_context(config)
    return min(DEFAULT_SEQ_LEN, ctx) if ctx is not None and ctx >= 2 else DEFAULT_SEQ_LEN


def resolve_windows(config: Any, seq_len: int | None, stride: int | None) -> tuple[int, int]:
    """``(seq_len, stride)`` with the defaults filled in: windows inside the model's context.

    Without ``seq_len`` the window is :data:`DEFAULT_SEQ_LEN` tokens, or the model's context
    when that is shorter (every scored position must be one the model was trained on: the
    demo, trained on 128-token sequences, scored 21.8-29.2 at positions 257-511 and 3.9-4.5
    inside its context); without ``stride``, half the window.

    Raises:
        ValueError: a window shorter than 2 tokens, or a step outside ``1..seq_len``.
    """
    if seq_len is None:
        seq_len = default_seq_len(config)
    step = stride if stride is not None else max(1, seq_len // 2)
    if seq_len < 2:
        raise ValueError(f"--seq-len {seq_len} is too short; use at least 2.")
    if not 1 <= step <= seq_len:
        raise ValueError(f"--stride {step} must be between 1 and --seq-len ({seq_len}).")
    return seq_len, step
