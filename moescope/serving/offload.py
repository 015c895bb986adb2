"""``moescope offload`` as one call: caches, batch coverage and predictability of a trace.

:func:`offload_report` loads a trace's routes once, sizes its experts with the model's
accounting (:func:`moescope.serving.accounting.model_bytes`), turns a memory budget into a
cache size, and runs :func:`~moescope.serving.simulate_cache`,
:func:`~moescope.serving.batch_coverage` and :func:`~moescope.serving.predictability`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moescope.errors import MoescopeError
from moescope.serving.accounting import ModelBytes, model_bytes
from moescope.serving.cache import POLICIES, CacheResult, cache_sizes_for_budget, simulate_cache
from moescope.serving.coverage import BATCH_SIZES, Coverage, batch_coverage
from moescope.serving.predict import Predictability, predictability
from moescope.serving.routes import load_routes

__all__ = ["OffloadReport", "offload_report"]


@dataclass(frozen=True)
class OffloadReport:
    """Everything ``moescope offload`` prints (``to_dict`` is its ``--json --all`` object)."""

    trace: str
    model: str | None
    tokens: int
    num_experts: int
    top_k: int
    bytes: ModelBytes | None
    cache: list[CacheResult]
    coverage: list[Coverage]
    predictability: list[Predictability]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready object."""
        return {
            "trace": self.trace,
            "model": self.model,
            "tokens": self.tokens,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "dtype": self.bytes.dtype if self.bytes else None,
            "expert_bytes": self.bytes.to_dict()["expert_bytes"] if self.bytes else None,
            "cache": [r.to_dict() for r in self.cache],
            "coverage": [c.to_dict() for c in self.coverage],
            "predictability": [p.to_dict() for p in self.predictability],
            "notes": self.notes,
        }


def offload_report(
    trace: str | Path,
    *,
    sizes: Sequence[int] | None = None,
    budget: float | None = None,
    policies: Sequence[str] = POLICIES,
    batches: Sequence[int] = BATCH_SIZES,
    model: str | None = None,
    dtype: str = "stored",
    max_tokens: int | None = None,
    size_experts: bool = True,
) -> OffloadReport:
    """Cache hit rates, batch coverage and cross-layer predictability of a trace.

    Args:
        trace: a trace directory with routes (``moescope trace ... --save-routes``).
        sizes: cache sizes in experts per layer (default: see :func:`~moescope.serving.cache.default_cache_sizes`).
        budget: instead of ``sizes``, bytes of fast memory for experts, all MoE layers together.
        policies: cache policies (:data:`~moescope.serving.cache.POLICIES`).
        batches: batch sizes for the coverage table.
        model: the model that sizes the experts (default: the one the trace was recorded on).
        dtype: weight format of the experts (``stored``, ``bf16``, ``fp8``, ``int4``).
        max_tokens: use only the first this many tokens of the trace.
        size_experts: look up the experts' bytes (False: the bytes columns stay None).

    Raises:
        TraceError: no routes, or not a trace.
        MoescopeError: ``budget`` and ``sizes`` together, a budget without a model to size
            experts with, or a model of another shape than the trace.
    """
    if budget is not None and sizes is not None:
        raise MoescopeError("pass a cache size list or a budget, not both.")
    routes = load_routes(trace, max_tokens=max_tokens)
    notes: list[str] = []
    ref = model or routes.model
    mb: ModelBytes | None = None
    if ref is not None and (size_experts or budget is not None):
        try:
            mb = model_bytes(ref, dtype=dtype)
        except MoescopeError as exc:
            if budget is not None:
                raise
            notes.append(f"expert bytes unknown ({exc}); bytes columns left empty, pass --model")
    if mb is not None and (mb.num_experts != routes.num_experts or mb.moe_layers != routes.layers):
        raise MoescopeError(
            f"{ref} has {mb.num_experts} experts on layers {mb.moe_layers} but the trace routes "
            f"{routes.num_experts} on {routes.layers}; pass the --model the trace was recorded on."
        )
    if budget is not None:
        if mb is None:
            raise MoescopeError("a budget needs the experts' size: pass --model (the trace names no model).")
        unit = mb.one_expert_per_layer / len(mb.moe_layers)
        sizes = [cache_sizes_for_budget(budget, unit, len(mb.moe_layers), routes.num_experts)]
        notes.append(f"budget {budget:,.0f} bytes holds {sizes[0]} experts per layer ({mb.dtype})")
    eb = mb.expert_bytes if mb is not None else None
    return OffloadReport(
        trace=str(trace),
        model=ref,
        tokens=routes.tokens,
        num_experts=routes.num_experts,
        top_k=routes.top_k,
        bytes=mb,
        cache=simulate_cache(routes, sizes, policies, eb),
        coverage=batch_coverage(routes, batches, eb),
        predictability=predictability(routes),
        notes=notes,
    )
