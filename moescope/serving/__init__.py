"""Serving what-ifs from real routing: expert caches, batch coverage, prefetch, fit and speed.

What (issue #18), each a function over a trace's per-token routes (``--save-routes``) or a
checkpoint's accounting, returning dataclasses:

- :func:`load_routes` (:mod:`.routes`): a trace's routes in token order;
- :func:`simulate_cache` (:mod:`.cache`): LRU, LFU, Belady and a held-out static pin, per
  layer and cache size: hit rate and expert bytes loaded per token;
- :func:`batch_coverage` (:mod:`.coverage`): distinct experts per decode step of B tokens
  beside the independent-routing value;
- :func:`predictability` (:mod:`.predict`): how well layer l's experts predict layer l+1's;
- :func:`fit` (:mod:`.fit`): placement on GPU / RAM / disk and a roofline decode bound;
- :func:`compare_traces` (:mod:`.compare`): two traces' load shift, JSD and rank changes.

How: pure numpy over the routes; the byte figures come from :mod:`moescope.accounting.params`.
"""

from __future__ import annotations

from moescope.serving.cache import POLICIES, CacheResult, simulate_cache
from moescope.serving.coverage import Coverage, batch_coverage, independent_coverage
from moescope.serving.predict import Predictability, predictability
from moescope.serving.routes import Routes, load_routes, routes_from_arrays

__all__ = [
    "POLICIES",
    "CacheResult",
    "Coverage",
    "Predictability",
    "Routes",
    "batch_coverage",
    "independent_coverage",
    "load_routes",
    "predictability",
    "routes_from_arrays",
    "simulate_cache",
]
