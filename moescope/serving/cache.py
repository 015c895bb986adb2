"""Expert-cache simulation: which share of expert uses an offloading server finds resident.

What: for one MoE layer's expert uses in token order and a cache of ``C`` experts (the
experts of that layer held in fast memory), the hits of four policies:

- ``lru``: evict the least recently used expert (:func:`lru_hits`, all sizes in one pass);
- ``lfu``: evict the resident expert used least often since the start of the stream (counts
  are kept for every expert, resident or not: "perfect" LFU), ties to the least recently used
  (:func:`lfu_hits`);
- ``belady``: evict the resident expert whose next use is farthest in the future (never used
  again counts as infinitely far): the offline optimum for demand caching, a bound no online
  policy beats (:func:`belady_hits`);
- ``static``: pin the ``C`` experts used most often and never evict; the pinned set is chosen
  on one half of the documents (document parity, as the trace's expert-parallel what-if
  splits the corpus) and scored on the other, both ways, so every use is scored out of
  sample (:func:`static_hits`). An expert not pinned is fetched for each use.

How: every token's ``k`` experts are requested in slot order (top-1 first), one at a time;
a miss loads the expert (evicting first when the cache is full), so with ``C < k`` a token
may evict one of its own experts. ``hit_rate = hits / uses`` and ``bytes_per_token = misses
* expert_bytes / tokens`` (the expert weight bytes loaded into the cache per token and
layer). LRU is a stack algorithm: a use hits a cache of size ``C`` exactly when fewer than
``C`` distinct experts were used since that expert's previous use (its stack distance),
so one pass gives every size. The cache starts empty and is never flushed between documents
(one server, one stream).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moescope.errors import MoescopeError
from moescope.serving.routes import Routes

__all__ = [
    "POLICIES",
    "CacheResult",
    "belady_hits",
    "cache_sizes_for_budget",
    "default_cache_sizes",
    "lfu_hits",
    "lru_hits",
    "simulate_cache",
    "static_hits",
]

#: the policies of :func:`simulate_cache`, in table order
POLICIES = ("lru", "lfu", "belady", "static")


@dataclass(frozen=True)
class CacheResult:
    """One (layer, policy, cache size) of :func:`simulate_cache`; ``--json`` keys = field names.

    Attributes:
        layer: MoE layer (decoder layer index).
        policy: ``lru``, ``lfu``, ``belady`` or ``static``.
        cache_experts: experts of this layer resident (C).
        hit_rate: hits / uses.
        bytes_per_token: expert weight bytes loaded per token at this layer (misses ×
            expert bytes / tokens), or None when the expert size is unknown.
        hits: uses found resident.
        uses: expert uses (tokens × k, empty slots left out).
        tokens: tokens in the stream.
        expert_bytes: bytes of one expert of this layer, or None.
    """

    layer: int
    policy: str
    cache_experts: int
    hit_rate: float
    bytes_per_token: float | None
    hits: int
    uses: int
    tokens: int
    expert_bytes: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        return asdict(self)


def _uses(ids: np.ndarray) -> np.ndarray:
    """Expert uses in request order (token by token, slot by slot), empty slots dropped."""
    flat = np.asarray(ids).reshape(-1).astype(np.int64)
    return flat[flat >= 0]


def lru_hits(ids: np.ndarray, sizes: Sequence[int]) -> list[int]:
    """Hits of an LRU cache of each size (one pass: stack distances).

    Args:
        ids: ``[tokens, k]`` expert ids in token order (``-1``: empty slot), or a flat sequence.
        sizes: cache sizes (experts resident).
    """
    uses = _uses(ids)
    stack: list[int] = []  # most recent first
    hist: dict[int, int] = {}
    for e in uses.tolist():
        try:
            d = stack.index(e)
        except ValueError:
            stack.insert(0, e)
            continue
        hist[d] = hist.get(d, 0) + 1
        del stack[d]
        stack.insert(0, e)
    return [sum(n for d, n in hist.items() if d < c) for c in sizes]


def lfu_hits(ids: np.ndarray, size: int) -> int:
    """Hits of a perfect-LFU cache of ``size`` experts (ties: least recently used goes)."""
    uses = _uses(ids)
    if size <= 0:
        return 0
    count: dict[int, int] = {}
    last: dict[int, int] = {}
    resident: set[int] = set()
    hits = 0
    for t, e in enumerate(uses.tolist()):
        count[e] = count.get(e, 0) + 1
        if e in resident:
            hits += 1
        else:
            if len(resident) >= size:
                victim = min(resident, key=lambda r: (count[r], last[r]))
                resident.discard(victim)
            resident.add(e)
        last[e] = t
    return hits


def _next_use(uses: np.ndarray) -> np.ndarray:
    """For each use, the index of the same expert's next use (``len(uses)`` when none)."""
    n = len(uses)
    nxt = np.full(n, n, dtype=np.int64)
    order = np.argsort(uses, kind="stable")  # grouped by expert, in time order
    same = uses[order[1:]] == uses[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


def belady_hits(ids: np.ndarray, size: int) -> int:
    """Hits of Belady's offline-optimal cache of ``size`` experts (evict the farthest next use)."""
    uses = _uses(ids)
    if size <= 0:
        return 0
    nxt = _next_use(uses).tolist()
    resident: dict[int, int] = {}  # expert -> index of its next use
    hits = 0
    for t, e in enumerate(uses.tolist()):
        if e in resident:
            hits += 1
        elif len(resident) >= size:
            victim = max(resident, key=resident.__getitem__)
            del resident[victim]
        resident[e] = nxt[t]
    return hits


def static_hits(ids: np.ndarray, half: np.ndarray, size: int, num_experts: int) -> tuple[int, int]:
    """Hits and scored uses of pinning the ``size`` most used experts, cross-fitted by half.

    The experts pinned for the tokens of half ``h`` are the most used in the other half
    (ties to the lower expert id). When one half is empty there is nothing to fit on:
    ``(0, 0)``.
    """
    ids = np.asarray(ids)
    half = np.asarray(half)
    hits = scored = 0
    for h in (0, 1):
        fit, score = ids[half != h].reshape(-1), ids[half == h].reshape(-1)
        fit, score = fit[fit >= 0], score[score >= 0]
        if fit.size == 0 or score.size == 0:
            return 0, 0
        counts = np.bincount(fit, minlength=num_experts)
        pinned = np.argsort(-counts, kind="stable")[:size]
        hits += int(np.isin(score, pinned).sum())
        scored += int(score.size)
    return hits, scored


def default_cache_sizes(num_experts: int, top_k: int) -> list[int]:
    """Every size from 1 to E-1 for small E; else k, powers of two up to E/2, and 3E/4."""
    if num_experts <= 16:
        return list(range(1, num_experts))
    sizes = {top_k, (3 * num_experts) // 4}
    c = 1
    while c <= num_experts // 2:
        sizes.add(c)
        c *= 2
    return sorted(s for s in sizes if 0 < s < num_experts)


def cache_sizes_for_budget(
    budget_bytes: float, expert_bytes: float, moe_layers: int, num_experts: int
) -> int:
    """Experts per layer that a budget holds when every MoE layer caches as many (at most E).

    Raises:
        MoescopeError: the budget does not hold one expert per layer.
    """
    per_layer = int(budget_bytes // (expert_bytes * moe_layers))
    if per_layer < 1:
        raise MoescopeError(
            f"a budget of {budget_bytes:,.0f} bytes holds no expert per layer ({moe_layers} MoE layers × "
            f"{expert_bytes:,.0f} bytes per expert); raise --budget or pass --cache."
        )
    return min(per_layer, num_experts)


def simulate_cache(
    routes: Routes,
    sizes: Iterable[int] | None = None,
    policies: Sequence[str] = POLICIES,
    expert_bytes: dict[int, float] | float | None = None,
) -> list[CacheResult]:
    """Hit rates and bytes loaded per token of each policy, cache size and MoE layer.

    Args:
        routes: a trace's routes (:func:`moescope.serving.load_routes`).
        sizes: cache sizes in experts per layer (default :func:`default_cache_sizes`);
            sizes of E or more are all hits and are left out.
        policies: any of :data:`POLICIES`.
        expert_bytes: bytes of one expert (per layer, or one figure for all), for
            ``bytes_per_token``; None leaves it None.

    Returns:
        One :class:`CacheResult` per (layer, policy, size), in that order.

    Raises:
        MoescopeError: an unknown policy or a size below 1.
    """
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise MoescopeError(f"unknown cache policy {unknown[0]!r}; use {', '.join(POLICIES)}.")
    e_n = routes.num_experts
    chosen = default_cache_sizes(e_n, routes.top_k) if sizes is None else sorted(set(sizes))
    if any(c < 1 for c in chosen):
        raise MoescopeError(f"cache sizes must be at least 1 expert, got {min(chosen)}.")
    chosen = [c for c in chosen if c < e_n]
    half = routes.half()
    out: list[CacheResult] = []
    for layer in routes.layers:
        ids = routes.layer(layer)
        uses = int((ids >= 0).sum())
        eb = expert_bytes.get(layer) if isinstance(expert_bytes, dict) else expert_bytes
        lru = dict(zip(chosen, lru_hits(ids, chosen), strict=True)) if "lru" in policies else {}
        for policy in policies:
            for c in chosen:
                scored = uses
                if policy == "lru":
                    hits = lru[c]
                elif policy == "lfu":
                    hits = lfu_hits(ids, c)
                elif policy == "belady":
                    hits = belady_hits(ids, c)
                else:
                    hits, scored = static_hits(ids, half, c, e_n)
                rate = hits / scored if scored else float("nan")
                per_token = None
                if eb is not None and scored:
                    # misses per scored token × bytes (static scores every token too, when both halves exist)
                    per_token = (1 - rate) * uses / routes.tokens * eb
                out.append(CacheResult(layer, policy, c, rate, per_token, hits, scored, routes.tokens, eb))
    return out
