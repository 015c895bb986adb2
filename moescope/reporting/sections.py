"""The parts of the HTML report page: definitions, what a trace lacks, and one builder per section.

What: the ``*_section`` functions each return ``(id, title, html)`` for one section of
:func:`moescope.reporting.page.render_html`: its table(s), its figure(s) and, beside them, the
definitions of its statistics (:data:`moescope.stats.definitions.DEFINITIONS`).

How: small string builders. Every text that comes from an input goes through
:func:`html.escape` in :func:`table`, :func:`kv_table` or :func:`para`; the one thing
inlined as is is matplotlib's SVG output (:func:`moescope.stats.plots.figure_svg`). An item the
trace cannot support is rendered as "not available: <why>", never as zeros.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

import numpy as np

from moescope.stats.definitions import DEFINITIONS, WHY
from moescope.stats.report import MIN_EXPECTED, MIN_PAIR_COUNT, SIGNIFICANCE, Report
from moescope.tracedir.state import TraceState

#: per-layer column -> header (``tokens``, the same in every row, is in the summary)
LAYER_COLUMNS: dict[str, str] = {
    "layer": "layer",
    "imbalance_max_mean": "max/mean",
    "cv": "cv",
    "entropy_norm": "entropy",
    "effective_experts": "effective experts",
    "gini": "Gini",
    "dead": "dead",
    "near_dead": "near-dead",
    "mean_top1_weight": "top-1 weight",
    "reuse_rate": "reuse",
    "reuse_chance": "reuse by chance",
    "reuse_ratio": "reuse/chance",
    "coact_max_ratio": "max co-act",
    "coact_significant": "significant pairs",
    "domain_jsd": "domain JSD",
    "router_dropped": "router dropped",
}

PAGE_CSS = """
:root{--ink:#1d2330;--mute:#5b6475;--line:#d9dee7;--band:#f4f6fa;--accent:#2f5d9e;--na:#8a5a00}
*{box-sizing:border-box}body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"DejaVu Sans",sans-serif;color:var(--ink);background:#fff}
header{background:var(--ink);color:#fff;padding:14px 28px}header h1{margin:0 0 6px;font-size:21px}
nav a{color:#cfe0ff;margin-right:14px;text-decoration:none;font-size:13px}
main{max-width:1280px;margin:0 auto;padding:8px 28px 30px}
section{border-bottom:1px solid var(--line);padding:10px 0 18px}h2{font-size:18px;margin:12px 0 8px;
color:var(--accent)}h3{font-size:15px;margin:14px 0 6px}
.cols{display:flex;gap:26px;align-items:flex-start;flex-wrap:wrap}.main{flex:1 1 640px;min-width:0}
aside.defs{flex:0 1 270px;background:var(--band);border-left:3px solid var(--accent);padding:8px 14px;
font-size:13px}aside.defs dt{font-weight:600;margin-top:6px}aside.defs dd{margin:0 0 4px}
table{border-collapse:collapse;margin:4px 0 10px;font-size:13px}th,td{padding:3px 7px;
border-bottom:1px solid var(--line);text-align:left;vertical-align:top}th{background:var(--band)}
td.n{text-align:right;font-variant-numeric:tabular-nums}.na{color:var(--na);font-style:italic}
table.kv th{min-width:120px}table.kv td,table.kv td.n{text-align:left;min-width:150px}
.scroll{overflow-x:auto}.cards{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0 14px}
.card{border:1px solid var(--line);border-radius:6px;padding:6px 14px;min-width:120px;background:#fff}
.card b{display:block;font-size:20px;color:var(--accent)}.card span{font-size:12px;color:var(--mute)}
figure{margin:10px 0}figure svg{max-width:100%;height:auto}
figcaption{color:var(--mute);font-size:12px}details{margin:6px 0}summary{cursor:pointer;color:var(--accent)}
.warn{background:#fff4e0;border-left:3px solid var(--na);padding:6px 12px}
footer{color:var(--mute);font-size:12px;text-align:center;padding:16px}
"""

_NUMBER = re.compile(r"^[-+−]?[\d,.]+(e[-+]?\d+)?\s*(%|[kMGT]?i?B)?$")


def fmt(value: Any, spec: str = ".3f") -> str:
    """A cell's text: ``–`` for missing or NaN, thousands separators, lists and dicts joined."""
    if value is None or (isinstance(value, (float, np.floating)) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return format(float(value), spec)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {fmt(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value) or "none"
    return str(value)


def na(why: str) -> str:
    """The text shown in place of a statistic the trace cannot support."""
    return f"not available: {why}"


def _cell(text: str, tag: str = "td") -> str:
    if text.startswith("not available"):
        return f'<{tag} class="na">{escape(text)}</{tag}>'
    cls = ' class="n"' if tag == "td" and _NUMBER.match(text) else ""
    return f"<{tag}{cls}>{escape(text)}</{tag}>"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, caption: str = "") -> str:
    """An HTML table; every header and cell is escaped (cells not already text go through :func:`fmt`)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(_cell(c if isinstance(c, str) else fmt(c)) for c in row) + "</tr>" for row in rows
    )
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return (
        f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    )


def kv_table(items: Iterable[tuple[str, Any]], per_row: int = 1) -> str:
    """A key/value table, ``per_row`` pairs to a row (escaped)."""
    cells = [f"<th>{escape(k)}</th>{_cell(v if isinstance(v, str) else fmt(v))}" for k, v in items]
    rows = "".join("<tr>" + "".join(cells[i : i + per_row]) + "</tr>" for i in range(0, len(cells), per_row))
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def cards(items: Iterable[tuple[str, str]]) -> str:
    """Headline figures: a big value over a short label each (escaped)."""
    inner = "".join(f'<div class="card"><b>{escape(v)}</b><span>{escape(k)}</span></div>' for k, v in items)
    return f'<div class="cards">{inner}</div>'


def para(text: str, cls: str = "") -> str:
    """A paragraph of escaped text."""
    return f"<p{f' class={chr(34)}{cls}{chr(34)}' if cls else ''}>{escape(text)}</p>"


def details(label: str, inner: str) -> str:
    """A folded block (no script needed to open it)."""
    return f"<details><summary>{escape(label)}</summary>{inner}</details>"


def defs(keys: Sequence[str], gone: dict[str, str] | None = None) -> str:
    """The definitions of ``keys`` beside a table; ``gone`` maps a key to why it is not available."""
    items = []
    for key in keys:
        text = DEFINITIONS[key]
        note = f' <span class="na">{escape(na(gone[key]))}.</span>' if gone and key in gone else ""
        items.append(f"<dt>{escape(key)}</dt><dd>{escape(text)}{note}</dd>")
    return f'<aside class="defs"><dl>{"".join(items)}</dl></aside>'


def section(sid: str, title: str, main: str, aside: str = "") -> tuple[str, str, str]:
    """``(id, title, html)`` of one section: the content with its definitions beside it."""
    html = (
        f'<section id="{escape(sid)}"><h2>{escape(title)}</h2>'
        f'<div class="cols"><div class="main">{main}</div>{aside}</div></section>'
    )
    return sid, title, html


@dataclass
class Context:
    """What every section reads: the report, the raw sums, what is unavailable, figures drawn."""

    rep: Report
    state: TraceState
    gone: dict[str, str]
    lacks: list[str]
    figures: list[str] = field(default_factory=list)

    def figure(self, name: str, caption: str) -> str:
        """The trace figure ``name`` (:mod:`moescope.stats.plots`) inline, or why it is not available."""
        from moescope.stats.plots import figure_svg, figures

        if name in self.gone:
            return para(na(self.gone[name]), "na")
        drawn = list(figures(self.state, [name]))
        if not drawn:
            return para(na("the trace has no data for this figure"), "na")
        self.figures.append(name)
        return f"<figure>{figure_svg(drawn[0][1], name)}<figcaption>{escape(caption)}</figcaption></figure>"

    def value(self, column: str, value: Any, spec: str = ".3f") -> str:
        """A statistic's cell, or "not available" when the trace lacks its data."""
        return "not available" if column in self.gone else fmt(value, spec)


# --------------------------------------------------------------------------- sections


def summary_section(ctx: Context, trace_path: str) -> tuple[str, str, str]:
    """Model, corpus, tokens, source, what the trace lacks, how the model ran, timings."""
    s = ctx.rep.summary or {}
    lacks = "; ".join(f"{x} ({WHY.get(x, 'not recorded')})" for x in ctx.lacks) or "nothing"
    timings = s.get("timings") or {}
    items: list[tuple[str, Any]] = [
        ("model", s.get("model")),
        ("model type", s.get("model_type")),
        ("fingerprint", s.get("fingerprint")),
        ("source", s.get("source", "moescope")),
        ("lacks", lacks),
        ("corpus", s.get("corpus")),
        ("split", s.get("split")),
        ("tokens", s.get("tokens")),
        ("documents", s.get("documents")),
        ("windows / batches", f"{fmt(s.get('windows'))} / {fmt(s.get('batches'))}"),
        ("domains", s.get("domains")),
        ("MoE layers", s.get("moe_layers")),
        ("experts per layer / top-k", f"{fmt(s.get('num_experts'))} / {fmt(s.get('top_k'))}"),
        ("hidden size", s.get("hidden_size")),
        ("seq_len / batch_size", f"{fmt(s.get('seq_len'))} / {fmt(s.get('batch_size'))}"),
        ("dtype / device", f"{fmt(s.get('dtype'))} / {fmt(s.get('device'))}"),
        ("execution", _execution(s.get("execution"))),
        ("shard", s.get("shard")),
        ("packing", s.get("packing")),
        ("trace seconds", timings.get("trace_seconds")),
        ("tokens per second", timings.get("tokens_per_second")),
        ("run id", s.get("run_id")),
        ("moescope version", s.get("moescope_version")),
        ("trace directory", trace_path),
    ]
    shown = [(k, v) for k, v in items if v is not None]
    return section("summary", "Summary", headline(ctx) + kv_table(shown, per_row=2))


def _execution(value: Any) -> Any:
    """``summary.json`` ``execution`` with byte counts in KiB/MiB/GiB."""
    if not isinstance(value, dict):
        return value
    return {k: _bytes(float(v)) if k in ("budget", "model_bytes", "bytes_read") and isinstance(v, (int, float))
            else v for k, v in value.items()}  # fmt: skip


def headline(ctx: Context) -> str:
    """The numbers to read first: size of the trace, worst imbalance, dead experts, top pair."""
    s, layers = ctx.rep.summary or {}, ctx.rep.layers
    items = [
        ("tokens traced", fmt(s.get("tokens"))),
        ("MoE layers", fmt(len(s.get("moe_layers") or []))),
        ("experts / top-k", f"{fmt(s.get('num_experts'))} / {fmt(s.get('top_k'))}"),
    ]
    imb = layers.get("imbalance_max_mean")
    if imb is not None and imb.notna().any():
        worst = layers.loc[imb.idxmax()]
        items.append(
            (f"worst max/mean (layer {int(worst['layer'])})", fmt(worst["imbalance_max_mean"], ".2f"))
        )
    if {"dead", "near_dead"} <= set(layers.columns):
        items.append(("dead / near-dead experts", f"{layers['dead'].sum()} / {layers['near_dead'].sum()}"))
    top = ctx.rep.coactivation_top
    if "coactivation" not in ctx.gone and not top.empty:
        b = top.loc[top["ratio_lower"].idxmax()]
        pair = f"{int(b['expert_a'])}+{int(b['expert_b'])}, layer {int(b['layer'])}"
        items.append(("most co-activated pair vs chance", f"{fmt(b['ratio'], '.2f')}× ({pair})"))
    return cards(items)


def layers_section(ctx: Context) -> tuple[str, str, str]:
    """The per-layer table, dead experts, load bars and the layer × expert heatmap."""
    layers = ctx.rep.layers
    cols = [c for c in LAYER_COLUMNS if c in layers.columns]
    cols += [c for c in layers.columns if c not in LAYER_COLUMNS and c != "tokens"]
    rows = [
        [ctx.value(c, rec[c], ".2f" if c in ("imbalance_max_mean", "reuse_ratio") else ".3f") for c in cols]
        for rec in layers.to_dict(orient="records")
    ]
    dead = getattr(ctx.rep, "dead", {}) or {}
    dead_rows = [[layer, d.get("dead", []), d.get("near_dead", [])] for layer, d in sorted(dead.items())]
    main = (
        table([LAYER_COLUMNS.get(str(c), str(c)) for c in cols], rows)
        + "<h3>Dead and near-dead experts</h3>"
        + table(["layer", "dead experts", "near-dead experts"], dead_rows)
        + ctx.figure("load_bars", "Share of assignments per expert, per layer; dashed: uniform.")
        + ctx.figure("load_heatmap", "Load of each expert relative to uniform, every MoE layer.")
    )
    gone = {
        "top-1 weight": ctx.gone.get("mean_top1_weight", ""),
        "reuse/chance": ctx.gone.get("reuse_ratio", ""),
        "co-activation": ctx.gone.get("coact_max_ratio", ""),
        "domain JSD": ctx.gone.get("domain_jsd", ""),
    }
    keys = [
        "max/mean",
        "cv",
        "entropy",
        "effective experts",
        "dead / near-dead",
        "top-1 weight",
        "reuse/chance",
    ]
    keys += ["co-activation", "domain JSD", "router dropped"]
    return section("layers", "Load per layer", main, defs(keys, {k: v for k, v in gone.items() if v}))


def confidence_section(ctx: Context) -> tuple[str, str, str]:
    """Router confidence: the top-1 share histogram per layer."""
    main = ctx.figure("confidence", "Share of tokens per bin of the top-1 share, per layer.")
    if "confidence" not in ctx.gone and not ctx.rep.confidence.empty:
        hist = ctx.rep.confidence.pivot(index="layer", columns="bin_lo", values="tokens")
        rows = [
            [int(layer), *(int(v) for v in row)] for layer, row in zip(hist.index, hist.values, strict=True)
        ]
        main += details(
            "Histogram (tokens per bin)", table(["layer", *(f"≥{c:.2f}" for c in hist.columns)], rows)
        )
    return section("confidence", "Router confidence", main, defs(["top-1 weight", "confidence"], ctx.gone))


def capacity_section(ctx: Context) -> tuple[str, str, str]:
    """Assignments dropped at each capacity factor, per layer."""
    if "capacity" in ctx.gone or ctx.rep.capacity.empty:
        main = para(na(ctx.gone.get("capacity", "no capacity counts in the trace")), "na")
    else:
        cap = ctx.rep.capacity.pivot(index="layer", columns="capacity_factor", values="dropped_share")
        rows = [
            [int(layer), *(fmt(100 * v, ".1f") + "%" if math.isfinite(v) else "–" for v in row)]
            for layer, row in zip(cap.index, cap.values, strict=True)
        ]
        main = table(["layer", *(f"C={c:g}" for c in cap.columns)], rows) + ctx.figure(
            "capacity", "Share of assignments dropped against the capacity factor C."
        )
    return section("capacity", "Token dropping at a capacity factor", main, defs(["capacity"], ctx.gone))


def expert_parallel_section(ctx: Context) -> tuple[str, str, str]:
    """Device load imbalance and all-to-all bytes per token for each EP degree and placement."""
    ep = ctx.rep.expert_parallel
    if ep.empty:
        return section("ep", "Expert parallelism", para("No degree divides the expert count."))
    agg = ep.groupby(["degree", "placement"], sort=True).agg(
        imbalance=("imbalance", "mean"),
        worst=("imbalance", "max"),
        batch=("batch_imbalance", "mean"),
        bytes_=("bytes_per_token", "sum"),
        dedup=("bytes_per_token_dedup", lambda x: x.sum(min_count=1)),
    )
    rows = [
        [f"EP={d}", p, fmt(r.imbalance, ".2f"), fmt(r.worst, ".2f"), ctx.value("batch_imbalance", r.batch, ".2f"),
         _bytes(r.bytes_), "not available" if "bytes_per_token_dedup" in ctx.gone else _bytes(r.dedup)]
        for (d, p), r in zip(agg.index, agg.itertuples(), strict=True)
    ]  # fmt: skip
    headers = ["degree", "placement", "imbalance (mean)", "worst layer", "per batch", "a2a/token"]
    main = table([*headers, "dedup a2a/token"], rows, caption="Device load max/mean over layers; all-to-all "
                 "bytes per token, all layers")  # fmt: skip
    per_layer = [[ctx.value(c, v, ".3f") for c, v in rec.items()] for rec in ep.to_dict(orient="records")]
    main += details("Every layer", table(list(ep.columns), per_layer))
    gone = {"expert parallelism": ctx.gone["batch_imbalance"]} if "batch_imbalance" in ctx.gone else {}
    return section("ep", "Expert parallelism", main, defs(["expert parallelism", "all-to-all"], gone))


def _bytes(value: float) -> str:
    if not math.isfinite(value):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} GiB"  # pragma: no cover


def coactivation_section(ctx: Context) -> tuple[str, str, str]:
    """The pairs chosen together most above chance, and the co-activation heatmaps."""
    top = ctx.rep.coactivation_top
    if "coactivation" in ctx.gone:
        main = para(na(ctx.gone["coactivation"]), "na")
    elif top.empty:
        main = para(
            f"No pair is chosen together significantly above chance (Benjamini-Hochberg q ≤ {SIGNIFICANCE:g} "
            f"over every pair expected {MIN_EXPECTED:g} times or more, pairs seen {MIN_PAIR_COUNT}+ times)."
        )
    else:
        best = top.sort_values("ratio_lower", ascending=False).head(10)
        cols = ["layer", "pair", "count", "expected", "ratio", "ratio lower bound", "q"]
        rows = [[int(r.layer), f"{r.expert_a}+{r.expert_b}", int(r.count), fmt(r.expected, ".1f"),
                 fmt(r.ratio, ".2f"), fmt(r.ratio_lower, ".2f"), f"{r.q_value:.1e}"]
                for r in best.itertuples()]  # fmt: skip
        every = [[int(r.layer), f"{r.expert_a}+{r.expert_b}", int(r.count), fmt(r.expected, ".1f"),
                  fmt(r.ratio, ".2f"), fmt(r.ratio_lower, ".2f"), f"{r.q_value:.1e}"]
                 for r in top.itertuples()]  # fmt: skip
        main = (
            table(cols, rows, caption="Pairs chosen together significantly above chance")
            + details("Top pairs of every layer", table(cols, every))
            + ctx.figure("coactivation", "Pair count / count expected by chance (blank: too few pairs).")
        )
    return section("coactivation", "Co-activation", main, defs(["co-activation"], ctx.gone))


def domains_section(ctx: Context) -> tuple[str, str, str]:
    """Domain specialisation: JSD per domain and the per-domain load heatmap."""
    dom = ctx.rep.domains
    if "domains" in ctx.gone:
        main = para(na(ctx.gone["domains"]), "na")
    elif dom.empty:
        main = para(na("no domain had routed tokens"), "na")
    else:
        agg = dom.groupby("domain").agg(jsd=("jsd_vs_rest", "mean"), assignments=("assignments", "sum"))
        rows = [
            [str(n), int(r.assignments), fmt(r.jsd)] for n, r in zip(agg.index, agg.itertuples(), strict=True)
        ]
        every = [[str(r.domain), int(r.layer), int(r.assignments), fmt(r.jsd_vs_rest), int(r.top_expert),
                  fmt(100 * r.top_expert_share, ".1f") + "%"] for r in dom.itertuples()]  # fmt: skip
        main = (
            table(["domain", "assignments", "JSD vs other domains (mean over layers)"], rows)
            + details(
                "Every layer",
                table(["domain", "layer", "assignments", "JSD vs rest", "top expert", "its share"], every),
            )
            + ctx.figure("domain_heatmap", "Expert load per domain at the most domain-specific layer.")
        )
    return section(
        "domains", "Domain specialisation", main, defs(["JSD vs other domains", "domain JSD"], ctx.gone)
    )


def similarity_section(ctx: Context, sim: Any, most: int = 8) -> tuple[str, str, str]:
    """Redundant expert pairs from a similarity report: per-layer scores, top pairs, heatmaps."""
    from moescope.redundancy.files import heatmap_figure
    from moescope.stats.plots import figure_svg

    measures = list(sim.measures)
    scores = [
        [int(r["layer"]), fmt(r["redundancy"]), str(r["top_pair"]), fmt(r["top_pair_redundancy"])]
        + [fmt(r.get(f"mean_{m}")) for m in measures]
        for r in sim.layer_scores().to_dict(orient="records")
    ]
    pairs = sim.pairs()

    def pair_rows(ranks: int) -> list[list[Any]]:
        return [
            [
                int(r["layer"]),
                int(r["rank"]),
                f"{int(r['expert_a'])}-{int(r['expert_b'])}",
                fmt(r["redundancy"]),
            ]
            + [fmt(r[m]) for m in measures]
            for r in pairs[pairs["rank"] <= ranks].to_dict(orient="records")
        ]

    headers = ["layer", "rank", "pair", "redundancy", *measures]
    main = para(f"Model {sim.model}; outputs measured on {sim.samples:,} sampled tokens per layer.")
    main += table(
        ["layer", "redundancy score", "top pair", "its redundancy", *(f"mean {m}" for m in measures)],
        scores,
        caption="Per layer",
    )
    main += table(headers, pair_rows(3), caption="Most redundant pairs")
    main += details("Ten most redundant pairs of every layer", table(headers, pair_rows(10)))
    idx = sorted({int(round(x)) for x in np.linspace(0, len(sim.layers) - 1, min(most, len(sim.layers)))})
    for i in idx:
        ls = sim.layers[i]
        name = f"similarity_layer{ls.layer:03d}"
        ctx.figures.append(name)
        svg = figure_svg(heatmap_figure(sim, ls), name)
        main += f"<figure>{svg}<figcaption>Expert similarity, layer {ls.layer}.</figcaption></figure>"
    if len(idx) < len(sim.layers):
        main += para(f"Heatmaps of {len(idx)} of {len(sim.layers)} layers, spread over depth.")
    return section("similarity", "Redundant experts", main, defs(["redundancy"]))


def prune_section(ctx: Context, manifest: dict[str, Any]) -> tuple[str, str, str]:
    """The pruning plan of a ``prune_manifest.json``: settings and, per layer, kept and dropped experts."""
    m = manifest
    items = [
        ("model", m.get("model")),
        ("criterion", m.get("criterion")),
        ("experts per layer", f"{fmt(m.get('num_experts_before'))} → {fmt(m.get('num_experts_after'))}"),
        ("top-k", m.get("top_k")),
        ("balance domains", m.get("balance_domains")),
        ("seed", m.get("seed")),
        ("scored on trace", m.get("source_trace")),
        ("trace tokens", m.get("trace_tokens")),
        ("verification", m.get("verification")),
    ]
    rows = []
    for layer, rec in sorted(m["layers"].items(), key=lambda kv: int(kv[0])):
        scores = rec.get("scores") or []
        dropped = rec.get("dropped") or []
        rows.append([
            int(layer), rec.get("kept", []), dropped,
            _share(rec.get("dropped_count_share")), _share(rec.get("dropped_weight_share")),
            ", ".join(fmt(scores[e], ".3g") for e in dropped if isinstance(e, int) and e < len(scores)) or "–",
        ])  # fmt: skip
    headers = ["layer", "kept", "dropped", "tokens to dropped", "gate weight to dropped", "dropped scores"]
    main = kv_table([(k, v) for k, v in items if v is not None]) + table(headers, rows)
    return section("prune", "Pruning plan", main, defs(["pruning plan"]))


def _share(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.1f}%"


__all__ = [
    "LAYER_COLUMNS",
    "PAGE_CSS",
    "Context",
    "defs",
    "details",
    "fmt",
    "kv_table",
    "na",
    "section",
    "table",
]
