"""Perplexity of a causal LM on a corpus, overall and per domain, by sliding window.

How: tokens come from :mod:`moescope.corpus.packing`, the convention trace and similarity use:
each document is tokenized with the tokenizer's own special tokens and EOS appended
unless already last; documents are grouped by domain and each group's documents are
concatenated into one stream (so a domain's text is never conditioned on another's). A
window of ``seq_len`` tokens slides by ``stride`` (capped at ``seq_len - 1``); each window
scores only the tokens the previous window did not, so every token after the first of a
stream is predicted exactly once, with at least ``seq_len - stride`` tokens of context
(:func:`moescope.corpus.packing.sliding_windows`). Windows of equal length are batched. The
negative log-likelihood is summed in float32; perplexity is ``exp(total NLL / scored
tokens)``, and overall perplexity pools every domain's tokens. ``max_tokens`` caps the
scored tokens, split evenly across domains so a cap does not silently drop the last
domains. The built-in corpus is read from its held-out split unless told otherwise
(:func:`moescope.corpus.packing.resolve_split`). A ``seq_len`` beyond the model's context (its
``max_position_embeddings``, or a sliding window every layer uses) is warned about, not
refused: :func:`context_warnings`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from moescope.corpus.packing import (
    POSITION_FIELDS,
    DocumentLike,
    domain_streams,
    resolve_split,
    resolve_windows,
    sliding_windows,
)
from moescope.errors import CorpusError

#: sliding windows ``(begin, end, targets)``; see :func:`moescope.corpus.packing.sliding_windows`
windows = sliding_windows
#: the held-out default for the built-in corpus; see :func:`moescope.corpus.packing.resolve_split`
builtin_split = resolve_split

__all__ = [
    "DocumentLike",
    "DomainPerplexity",
    "EvalResult",
    "builtin_split",
    "context_warnings",
    "evaluate",
    "perplexity",
    "windows",
]


@dataclass(frozen=True)
class DomainPerplexity:
    """Perplexity of one domain.

    Attributes:
        perplexity: ``exp(nll / tokens)``.
        nll: summed negative log-likelihood (nats).
        tokens: scored tokens.
        documents: documents read.
    """

    perplexity: float
    nll: float
    tokens: int
    documents: int


@dataclass(frozen=True)
class EvalResult:
    """Perplexity overall and per domain.

    Attributes:
        perplexity: over every scored token.
        loss: mean NLL per token (nats).
        tokens: scored tokens.
        seq_len: window length.
        stride: window step.
        domains: domain -> :class:`DomainPerplexity`; empty when the corpus has no domains.
        model: model reference, when known.
        corpus: corpus specs, when known.
    """

    perplexity: float
    loss: float
    tokens: int
    seq_len: int
    stride: int
    domains: dict[str, DomainPerplexity] = field(default_factory=dict)
    model: str | None = None
    corpus: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON object: ``perplexity``, ``loss``, ``tokens``, ``domains`` (domain -> perplexity), ..."""
        out: dict[str, Any] = {
            "model": self.model,
            "corpus": self.corpus,
            "perplexity": self.perplexity,
            "loss": self.loss,
            "tokens": self.tokens,
            "seq_len": self.seq_len,
            "stride": self.stride,
        }
        if self.domains:
            out["domains"] = {d: r.perplexity for d, r in self.domains.items()}
            out["domain_tokens"] = {d: r.tokens for d, r in self.domains.items()}
        return out


def perplexity(
    model: Any,
    tokenizer: Any,
    documents: Iterable[DocumentLike],
    *,
    seq_len: int = 512,
    stride: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
    hidden_budget: int | None = None,
) -> EvalResult:
    """Sliding-window perplexity of ``model`` on ``documents``.

    Args:
        model: a transformers causal LM in eval mode.
        tokenizer: its tokenizer.
        documents: objects with ``text`` and ``domain`` (``None`` for no domain).
        seq_len: tokens per window (the context the model sees at most).
        stride: window step; ``stride == seq_len`` means disjoint windows.
        max_tokens: cap on scored tokens, split evenly across domains.
        batch_size: windows per forward pass.
        progress: called as ``progress(windows_done, windows_total)``.
        hidden_budget: a streamed model keeps at most this many bytes of hidden states.

    Returns:
        An :class:`EvalResult`.

    Raises:
        CorpusError: no documents, or nothing to score.
        ValueError: ``seq_len < 2`` or ``stride`` out of ``1..seq_len``.
    """
    if seq_len < 2:
        raise ValueError(f"--seq-len {seq_len} is too short; use at least 2.")
    if not 1 <= stride <= seq_len:
        raise ValueError(f"--stride {stride} must be between 1 and --seq-len ({seq_len}).")
    streams, doc_counts = domain_streams(documents, tokenizer)
    if not streams:
        raise CorpusError("the corpus has no documents; pass a non-empty corpus (or another --split).")
    if max_tokens is not None:
        share = max(1, max_tokens // len(streams))
        streams = {d: s[: share + 1] for d, s in streams.items()}
    jobs = [
        (dom, stream[begin:end], targets)
        for dom, stream in streams.items()
        for begin, end, targets in sliding_windows(len(stream), seq_len, stride)
    ]
    if not jobs:
        raise CorpusError("the corpus is too short to score (fewer than 2 tokens).")
    nll, count = _score(model, jobs, list(streams), batch_size, progress, hidden_budget)
    total_nll = sum(nll.values())
    total = sum(count.values())
    domains = {}
    if any(d is not None for d in streams):
        for d in streams:
            key = d if d is not None else "(none)"
            domains[key] = DomainPerplexity(_ppl(nll[d], count[d]), nll[d], count[d], doc_counts[d])
    return EvalResult(_ppl(total_nll, total), total_nll / total, total, seq_len, stride, domains)


def _score(
    model: Any,
    jobs: list[tuple[str | None, list[int], int]],
    keys: list[str | None],
    batch_size: int,
    progress: Callable[[int, int], None] | None,
    hidden_budget: int | None = None,
) -> tuple[dict[str | None, float], dict[str | None, int]]:
    """Summed NLL and scored tokens per domain; windows of equal length share a forward pass.

    ``model`` may be a :class:`moescope.execution.stream.StreamedModel`: the same batches then run
    layer-major and their logits arrive at the end, in the same order.
    """
    import torch

    from moescope.execution.stream import StreamedModel

    nll: dict[str | None, float] = dict.fromkeys(keys, 0.0)
    count: dict[str | None, int] = dict.fromkeys(keys, 0)
    groups = _groups(jobs, batch_size)
    streamed = isinstance(model, StreamedModel)
    device = model.device if streamed else next(model.parameters()).device
    inputs = [torch.tensor([jobs[j][1] for j in g], dtype=torch.long, device=device) for g in groups]
    done = [0]

    def consume(g: int, logits: Any) -> None:
        ids, batch = inputs[g], groups[g]
        length = ids.shape[1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, j in enumerate(batch):
            dom, _, targets = jobs[j]
            pred = logprobs[row, length - targets - 1 : length - 1]
            gold = ids[row, length - targets :]
            nll[dom] += float(-pred.gather(-1, gold[:, None]).sum())
            count[dom] += targets
        done[0] += len(batch)
        if progress:
            progress(done[0], len(jobs))

    if getattr(model, "_moescope_head", None) == "base":
        from moescope.errors import CheckpointError

        kind = getattr(getattr(model, "config", None), "model_type", "?")
        raise CheckpointError(
            f"model_type {kind!r} has no language-model head in transformers (a text sub-model), so it "
            "gives no perplexity; evaluate the full model it belongs to."
        )
    with torch.inference_mode():
        if streamed:
            model.run([{"input_ids": ids} for ids in inputs], logits=consume, max_hidden_bytes=hidden_budget)
        else:
            if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
                from moescope.execution.load import TeacherForced

                # the loss of the decoder teacher-forced on the same text (as trace runs it)
                forced = TeacherForced(model)
                for g, ids in enumerate(inputs):
                    consume(g, forced.logits(ids))
            else:
                for g, ids in enumerate(inputs):
                    consume(g, model(input_ids=ids).logits)
    return nll, count


def _groups(jobs: list[tuple[str | None, list[int], int]], batch_size: int) -> list[list[int]]:
    """Job indices, longest windows first, up to ``batch_size`` of equal length per group."""
    order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][1]))
    groups: list[list[int]] = []
    i = 0
    while i < len(order):
        length = len(jobs[order[i]][1])
        group = [
            order[j] for j in range(i, min(i + batch_size, len(order))) if len(jobs[order[j]][1]) == length
        ]
        groups.append(group)
        i += len(group)
    return groups


def _ppl(nll: float, tokens: int) -> float:
    if tokens == 0:
        return float("nan")
    loss = nll / tokens
    return math.exp(loss) if loss < 700 else float("inf")


def context_warnings(config: Any, seq_len: int, model: str = "the model") -> list[str]:
    """Why ``seq_len`` is more context than ``config``'s model handles as trained (empty: fine).

    Args:
        config: a transformers config (the text config of a multimodal one is used).
        seq_len: window length.
        model: the model's name, for the message.

    Returns:
        Warning lines: ``seq_len`` beyond the trained positions (perplexity will be inflated),
        or beyond a sliding window that every attention layer uses (context is cut to it).
    """
    get_text = getattr(config, "get_text_config", None)
    cfg = get_text() if callable(get_text) else config
    out: list[str] = []
    for name in POSITION_FIELDS:
        limit = getattr(cfg, name, None)
        if isinstance(limit, int) and limit > 0:
            if seq_len > limit:
                out.append(
                    f"--seq-len {seq_len} exceeds {model}'s context ({name} = {limit}); positions past it "
                    f"were never trained, so perplexity will be inflated. Use --seq-len {limit} or less."
                )
            break
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and layer_types:
        every_layer = all("sliding" in str(t) for t in layer_types)
    else:
        every_layer = getattr(cfg, "use_sliding_window", True) is not False
    if isinstance(window, int) and 0 < window < seq_len and every_layer and not out:
        out.append(
            f"--seq-len {seq_len} exceeds {model}'s sliding window ({window}): each token attends to at most "
            f"{window} earlier tokens, so windows longer than that add no context."
        )
    return out


def evaluate(
    model_ref: str,
    corpus: str | Sequence[str],
    *,
    split: str | None = None,
    seq_len: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = 50_000,
    batch_size: int = 4,
    dtype: str = "auto",
    device: str = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    max_memory: str | None = None,
    stream: bool | None = None,
    device_map: str | None = None,
    on_plan: Callable[[str], None] | None = None,
) -> EvalResult:
    """Load a model and a corpus and measure perplexity (the API behind ``moescope eval``).

    Args:
        model_ref: ``demo``, a checkpoint directory or a hub id.
        corpus: corpus specs (see ``moescope.corpus.read.read_corpus``).
        split: corpus split (``train``, ``heldout``, ``all``); ``heldout`` by default for
            the built-in corpus (:func:`moescope.corpus.packing.resolve_split`).
        seq_len: window length; None: 512, or the model's context when shorter
            (:func:`resolve_windows`).
        stride: window step; None: half the window.
        max_tokens: cap on scored tokens (None: the whole corpus).
        batch_size: windows per forward.
        dtype: model dtype.
        device: torch device.
        revision: hub revision.
        trust_remote_code: allow the checkpoint's own modelling code.
        progress: window progress callback.
        on_warning: receives each warning line (see :func:`context_warnings`) before the
            scoring starts; by default they are issued with :func:`warnings.warn`.
        max_memory: memory budget; the model is streamed layer by layer when it does not fit.
        stream: True streams, False loads whole, None decides by size.
        device_map: ``auto``: accelerate's placement across GPUs, CPU and disk.
        on_plan: receives the line saying how the model runs and why.

    Returns:
        An :class:`EvalResult` with ``model`` and ``corpus`` filled in.
    """
    corpus = [corpus] if isinstance(corpus, str) else list(corpus)  # one spec: not its letters
    from moescope.corpus.read import read_corpus
    from moescope.execution.plan import HIDDEN_SHARE, open_model

    plan, model, tokenizer = open_model(
        model_ref,
        revision=revision,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        max_memory=max_memory,
        stream=stream,
        device_map=device_map,
        on_plan=on_plan,
    )
    try:
        seq_len, stride = resolve_windows(model.config, seq_len, stride)
        for line in context_warnings(model.config, seq_len, model_ref):
            if on_warning is not None:
                on_warning(line)
            else:
                warnings.warn(line, UserWarning, stacklevel=2)
        docs = read_corpus(list(corpus), split=resolve_split(corpus, split))
        result = perplexity(
            model,
            tokenizer,
            docs,
            seq_len=seq_len,
            stride=stride,
            max_tokens=max_tokens,
            batch_size=batch_size,
            progress=progress,
            hidden_budget=int(plan.budget * HIDDEN_SHARE) if plan.mode == "stream" else None,
        )
    finally:
        if plan.mode == "stream":
            model.close()  # on error too: release the resident layer and the open shard files
    return EvalResult(
        result.perplexity,
        result.loss,
        result.tokens,
        result.seq_len,
        result.stride,
        result.domains,
        model_ref,
        list(corpus),
    )
