"""Batch coverage: how many distinct experts a decode step of B tokens touches per layer.

What: :func:`batch_coverage` gives, per MoE layer and batch size B, the mean number of
distinct experts the B tokens of one step route to, for two ways of drawing a batch:

- ``concurrent``: B documents decoded side by side, one token each per step. Documents are
  grouped in document order into batches of B (a remainder of fewer than B is left out);
  a group runs for as many steps as its shortest document, so every step has B tokens.
- ``consecutive``: B consecutive tokens of one document (a prefill chunk, or a verification
  step of speculative decoding); chunks never cross documents, a remainder is left out.

beside ``independent``, the value if tokens routed independently with the layer's marginals:
``sum_e 1 - (1 - q_e)^B`` with ``q_e`` the share of tokens that chose expert ``e`` at that
layer (:func:`independent_coverage`, exact by linearity of expectation). Expert weight bytes
read per step are ``distinct × expert_bytes`` per layer.

How: a step's distinct experts are counted with one ``bincount`` over ``step * E + expert``;
``touch`` (per expert, the share of steps that touched it) is kept too, because a placement
(which experts sit in GPU memory) is costed by summing it over the experts placed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from moescope.serving.routes import Routes

__all__ = [
    "BATCH_SIZES",
    "MODES",
    "Coverage",
    "batch_coverage",
    "concurrent_steps",
    "consecutive_steps",
    "independent_coverage",
    "touch_from_steps",
]

#: the default batch sizes: 1, 2, 4, ... 512
BATCH_SIZES = tuple(2**i for i in range(10))
MODES = ("concurrent", "consecutive")


@dataclass(frozen=True)
class Coverage:
    """One (layer, batch size) of :func:`batch_coverage`; ``--json`` keys = field names.

    Attributes:
        layer: MoE layer.
        batch: tokens per step (B).
        concurrent: mean distinct experts per step, B documents side by side (None: fewer
            than B documents).
        concurrent_steps: steps measured for ``concurrent``.
        consecutive: mean distinct experts per step, B consecutive tokens (None: no document
            has B tokens).
        consecutive_steps: steps measured for ``consecutive``.
        independent: the same under independent routing with the layer's marginals.
        num_experts: E, for scale.
        bytes_per_step: ``concurrent`` (else ``consecutive``) × expert bytes, or None.
        touch: per expert, the share of measured steps that touched it (same source as
            ``bytes_per_step``; the independence value where neither was measured).
    """

    layer: int
    batch: int
    concurrent: float | None
    concurrent_steps: int
    consecutive: float | None
    consecutive_steps: int
    independent: float
    num_experts: int
    bytes_per_step: float | None = None
    touch: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, touch: bool = False) -> dict[str, Any]:
        """JSON-ready record (``touch`` only when asked: E numbers per row)."""
        d = asdict(self)
        if not touch:
            d.pop("touch")
        return d


def independent_coverage(q: np.ndarray, batch: int) -> float:
    """Expected distinct experts of ``batch`` tokens routed independently: ``sum_e 1-(1-q_e)^B``.

    Args:
        q: per expert, the share of tokens that chose it (sums to k).
        batch: tokens per step.
    """
    q = np.clip(np.asarray(q, dtype=np.float64), 0.0, 1.0)
    return float((1.0 - (1.0 - q) ** batch).sum())


def _doc_spans(doc: np.ndarray) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of one document in the stream (documents are contiguous)."""
    if doc.size == 0:
        return []
    cut = np.flatnonzero(np.diff(doc) != 0) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [doc.size]])
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def concurrent_steps(doc: np.ndarray, batch: int) -> np.ndarray:
    """``[steps, batch]`` token indices of the concurrent batches (see the module docstring)."""
    spans = _doc_spans(np.asarray(doc))
    steps = []
    for g in range(len(spans) // batch):
        group = spans[g * batch : (g + 1) * batch]
        length = min(e - s for s, e in group)
        starts = np.array([s for s, _e in group], dtype=np.int64)
        steps.append(starts[None, :] + np.arange(length, dtype=np.int64)[:, None])
    return np.concatenate(steps) if steps else np.empty((0, batch), dtype=np.int64)


def consecutive_steps(doc: np.ndarray, batch: int) -> np.ndarray:
    """``[steps, batch]`` token indices of the consecutive chunks (see the module docstring)."""
    chunks = []
    for s, e in _doc_spans(np.asarray(doc)):
        n = (e - s) // batch
        if n:
            chunks.append(np.arange(s, s + n * batch, dtype=np.int64).reshape(n, batch))
    return np.concatenate(chunks) if chunks else np.empty((0, batch), dtype=np.int64)


def touch_from_steps(ids: np.ndarray, steps: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Per step the distinct experts touched, and per expert the share of steps touching it.

    Args:
        ids: ``[tokens, k]`` expert ids of one layer (``-1``: empty slot).
        steps: ``[steps, B]`` token indices.
        num_experts: E.
    """
    n_steps = steps.shape[0]
    if n_steps == 0:
        return np.empty(0), np.full(num_experts, np.nan)
    distinct = np.empty(n_steps, dtype=np.int64)
    touched = np.zeros(num_experts, dtype=np.int64)
    chunk = max(1, (1 << 22) // max(num_experts, steps.shape[1] * ids.shape[1]))  # bounded memory
    for lo in range(0, n_steps, chunk):
        part = steps[lo : lo + chunk]
        m = part.shape[0]
        chosen = ids[part].reshape(m, -1).astype(np.int64)  # [steps, B*k]
        code = np.arange(m)[:, None] * num_experts + chosen
        hit = np.bincount(code[chosen >= 0], minlength=m * num_experts).reshape(m, num_experts) > 0
        distinct[lo : lo + m] = hit.sum(axis=1)
        touched += hit.sum(axis=0)
    return distinct, touched / n_steps


def batch_coverage(
    routes: Routes,
    batches: Sequence[int] = BATCH_SIZES,
    expert_bytes: dict[int, float] | float | None = None,
) -> list[Coverage]:
    """Mean distinct experts per layer and step for each batch size (see the module docstring).

    Args:
        routes: a trace's routes (:func:`moescope.serving.load_routes`).
        batches: batch sizes B (tokens per step).
        expert_bytes: bytes of one expert (per layer, or one figure), for ``bytes_per_step``.

    Returns:
        One :class:`Coverage` per (layer, B).
    """
    e_n = routes.num_experts
    out: list[Coverage] = []
    plans = {b: (concurrent_steps(routes.doc, b), consecutive_steps(routes.doc, b)) for b in batches}
    for layer in routes.layers:
        ids = routes.layer(layer).astype(np.int64)
        q = np.bincount(ids[ids >= 0], minlength=e_n) / max(routes.tokens, 1)
        eb = expert_bytes.get(layer) if isinstance(expert_bytes, dict) else expert_bytes
        for b in batches:
            conc_steps, cons_steps = plans[b]
            conc, conc_touch = touch_from_steps(ids, conc_steps, e_n)
            cons, cons_touch = touch_from_steps(ids, cons_steps, e_n)
            indep = independent_coverage(q, b)
            conc_mean = float(conc.mean()) if conc.size else None
            cons_mean = float(cons.mean()) if cons.size else None
            if conc_mean is not None:
                measured, touch = conc_mean, conc_touch
            elif cons_mean is not None:
                measured, touch = cons_mean, cons_touch
            else:
                measured, touch = indep, 1.0 - (1.0 - q) ** b
            out.append(
                Coverage(
                    layer=layer,
                    batch=b,
                    concurrent=conc_mean,
                    concurrent_steps=int(conc.size),
                    consecutive=cons_mean,
                    consecutive_steps=int(cons.size),
                    independent=indep,
                    num_experts=e_n,
                    bytes_per_step=None if eb is None else measured * eb,
                    touch=[float(v) for v in touch],
                )
            )
    return out
