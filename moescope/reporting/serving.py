"""The HTML report's serving section: expert caches, batch coverage and prefetch of a trace.

What: :func:`serving_section` gives ``report --html`` one section, only for traces with
per-token routes (``--save-routes``): the cache hit rate of each policy at each cache size
(mean over MoE layers, with a figure), distinct experts per decode step beside independent
routing, and cross-layer predictability, each with its definition beside it. Bytes are left to
``moescope offload``; the page states how many tokens the section replayed.

How: :func:`moescope.serving.offload.offload_report` on the first :data:`HTML_TOKENS`
tokens of the stream (Belady and LFU replay every use in Python: the full demo takes about
40 s, the report page should take seconds), batch sizes up to 64.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from moescope.serving.cache import POLICIES

__all__ = ["HTML_TOKENS", "serving_section"]

#: tokens of the stream the page's serving section replays
HTML_TOKENS = 20000

_DEFS = {
    "cache hit rate": "per MoE layer, each token's k experts are requested in order from a cache of C experts; "
    "a miss loads the expert. lru evicts the least recently used, lfu the least used since the start (ties "
    "lru), belady the one needed farthest in the future (the offline optimum), static pins the C most used "
    "experts of one half of the documents and is scored on the other half.",
    "batch coverage": "distinct experts per layer in one decode step of B tokens: B documents side by side "
    "(concurrent) or B consecutive tokens of one document, beside independent routing with the layer's "
    "marginals, sum over experts of 1-(1-q_e)^B.",
    "predictability": "from a token's top-1 expert at a layer, the k most frequent successors at the next MoE "
    "layer (fitted on one half of the documents, scored on the other): top-1 hit and top-k recall, beside "
    "predicting the next layer's most used experts.",
}


def _aside() -> str:
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in _DEFS.items())
    return f'<aside class="defs"><dl>{items}</dl></aside>'


def _figure(cache: list[Any], title: str) -> str:
    from moescope.stats.plots import figure_svg, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for policy in POLICIES:
        sizes = sorted({r.cache_experts for r in cache if r.policy == policy})
        if not sizes:
            continue
        means = [
            sum(r.hit_rate for r in cache if r.policy == policy and r.cache_experts == c)
            / sum(1 for r in cache if r.policy == policy and r.cache_experts == c)
            for c in sizes
        ]
        ax.plot(sizes, means, marker="o", ms=3, lw=1, label=policy)
    ax.set_xlabel("experts cached per layer (C)")
    ax.set_ylabel("hit rate (mean over layers)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return f"<figure>{figure_svg(fig, 'serving_cache')}<figcaption>{escape(title)}</figcaption></figure>"


def serving_section(ctx: Any, trace_path: str) -> tuple[str, str, str] | None:
    """``(id, title, html)`` of the serving section, or None when the trace has no routes."""
    from moescope.reporting import sections as rp
    from moescope.serving.offload import offload_report
    from moescope.tracedir.files import ROUTE_GLOB, ROUTES

    folder = Path(trace_path) / ROUTES
    if not trace_path or not folder.is_dir() or not any(folder.glob(ROUTE_GLOB)):
        return None
    rep = offload_report(
        trace_path, batches=(1, 2, 4, 8, 16, 32, 64), max_tokens=HTML_TOKENS, size_experts=False
    )
    sizes = sorted({r.cache_experts for r in rep.cache})
    rows = []
    for p in POLICIES:
        cells = []
        for c in sizes:
            sel = [r.hit_rate for r in rep.cache if r.policy == p and r.cache_experts == c]
            cells.append(rp.fmt(sum(sel) / len(sel)) if sel else "–")
        rows.append([p, *cells])
    cov: dict[int, list[Any]] = {}
    for row in rep.coverage:
        cov.setdefault(row.batch, []).append(row)

    def mean(vals: list[Any]) -> str:
        return "–" if any(v is None for v in vals) else rp.fmt(sum(vals) / len(vals), ".2f")

    cov_rows = [
        [
            b,
            mean([c.concurrent for c in cs]),
            mean([c.consecutive for c in cs]),
            mean([c.independent for c in cs]),
        ]
        for b, cs in cov.items()
    ]
    pred_rows = [
        [
            f"{p.layer}→{p.next_layer}",
            rp.fmt(p.top1_hit),
            rp.fmt(p.top1_base),
            rp.fmt(p.topk_recall),
            rp.fmt(p.topk_base),
        ]
        for p in rep.predictability
    ]
    title = f"Expert-cache hit rate, first {rep.tokens:,} tokens of the trace"
    main = (
        rp.para(
            f"Replayed on the first {rep.tokens:,} tokens of the trace's routes (moescope offload "
            f"{escape(trace_path)} replays them all and gives bytes loaded per token)."
        )
        + rp.table(["policy", *(f"C={c}" for c in sizes)], rows, caption="hit rate, mean over MoE layers")
        + _figure(rep.cache, title)
        + rp.table(
            ["batch", "concurrent documents", "consecutive tokens", "independent"],
            cov_rows,
            caption=f"distinct experts per layer and decode step (of {rep.num_experts}), mean over layers",
        )
        + (
            rp.table(
                ["layers", "top-1 hit", "(marginal)", f"top-{rep.top_k} recall", "(marginal)"],
                pred_rows,
                caption="next layer's experts from this layer's top-1",
            )
            if pred_rows
            else ""
        )
    )
    return rp.section("serving", "Serving: expert caches, batch coverage, prefetch", main, _aside())
