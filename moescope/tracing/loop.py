"""One trace pass's state: what runs (:class:`Target`) and the pass's settings and counters (:class:`Loop`).

Shared by the in-memory pass (:mod:`moescope.tracing.run`) and the layer-streamed one
(:mod:`moescope.tracing.streamed`), so neither imports the other for its types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moescope.corpus.packing import PackStats
from moescope.tracedir.state import TraceState
from moescope.tracing.routes import RoutesWriter

__all__ = ["Loop", "Target"]


@dataclass
class Target:
    """What the trace runs: the module to call, its MoE sites, and the routing shape."""

    runner: Any
    sites: list[Any]
    layers: list[int]
    num_experts: int
    top_k: int
    device: Any


@dataclass
class Loop:
    """Settings and counters of one pass over the corpus."""

    target: Target
    state: TraceState
    shard: tuple[int, int]
    pad_id: int
    model_ref: str
    routes: RoutesWriter | None = None
    progress: Callable[[int, int | None], None] | None = None
    forward_s: float = 0.0
    traced: int = 0
    hidden_budget: int | None = None
    pack: PackStats = field(default_factory=PackStats)
