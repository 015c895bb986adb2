"""`moescope report`: routing statistics of a trace directory.

Calls :func:`moescope.stats.report.build_report` and prints rich tables (per-layer imbalance,
confidence, reuse and co-activation; capacity drops; expert-parallel load and traffic;
most co-activated pairs; domain specialisation) or, with ``--json``, one object holding
every table as a list of records, or, with ``--csv``, the per-layer table (the ``layers``
records of ``--json``). Output goes through :class:`moescope.cli._output.Output`.
``--html FILE`` also writes the whole report as one self-contained page
(:func:`moescope.reporting.page.write_html_report`), with ``--similarity`` and
``--prune-manifest`` adding the redundant pairs and the pruning plan.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from moescope.cli._errors import friendly
from moescope.cli._output import CsvOpt, JsonOpt, Output, QuietOpt, human

if TYPE_CHECKING:
    from moescope.reporting.page import HtmlReport
    from moescope.stats.report import Report
    from moescope.tracedir.files import TraceDir

EXAMPLES = """
Examples:

  moescope report traces/demo
  moescope report traces/demo --json | jq '.capacity[] | select(.capacity_factor == 1.25)'
  moescope report traces/run --dtype-bytes 1      # all-to-all estimate for FP8 dispatch
  moescope report traces/demo --csv > layers.csv   # the per-layer table as CSV
  moescope report traces/demo --html report.html   # one self-contained page: tables, plots, definitions
  moescope similarity demo --no-outputs --out sim/ -q && moescope report traces/demo --html report.html --similarity sim/ --prune-manifest pruned/prune_manifest.json

Capacity: per capacity group (--capacity-group consecutive tokens of the trace, summary.json
capacity_group), an expert takes at most ceil(C * group * k / E) assignments.

Co-activation: a pair's count over the count expected if every token drew k distinct experts at the layer's observed frequencies (random routing scores 1.0).

Expert parallelism: D devices with E/D experts each (contiguous, or balanced by greedy LPT fitted on one half of the corpus's documents and scored on the other); a token-expert assignment crosses devices with probability (D-1)/D and moves hidden_size * dtype bytes each way (dispatch + combine), in the checkpoint's dtype unless --dtype-bytes says otherwise.

Statistics the trace lacks the data for (imported routing: summary.json lacks) are left out and named on stderr, never shown as zeros.

HTML: --html FILE writes every table, plot and definition into one page that opens offline (inline SVG and CSS, no scripts, no external requests); --similarity DIR adds the redundant expert pairs of `moescope similarity`, --prune-manifest FILE the plan of `moescope prune`. FILE is replaced only when it is a moescope HTML report.

Output: rich tables (per layer, capacity, expert parallelism, top pairs, domains). --json prints one object: model, corpus, tokens, num_experts, top_k, moe_layers, dead_experts (layer -> dead, near_dead) and every table as an array of records: layers, capacity, expert_parallel, coactivation_top (only pairs significant after the Benjamini-Hochberg correction, with z, p_value, q_value and ratio_lower), domains, confidence_histogram. --csv prints the per-layer table only (the "layers" records of --json, one row per MoE layer: layer, tokens, imbalance_max_mean, cv, entropy_norm, effective_experts, gini, dead, near_dead, mean_top1_weight, reuse_rate, reuse_chance, reuse_ratio, coact_max_ratio, coact_significant, domain_jsd, router_dropped; empty cells where a value is undefined); use --json for the other tables.
"""


def _f(value: Any, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def report_cmd(
    trace: Annotated[
        Path, typer.Argument(help="Trace directory written by `moescope trace` or `moescope merge`.")
    ],
    dtype_bytes: Annotated[
        int | None,
        typer.Option(
            "--dtype-bytes",
            help="Bytes per activation element for all-to-all (default: the checkpoint's dtype).",
        ),
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option("--html", help="Also write the report as one self-contained HTML page to this file."),
    ] = None,
    similarity: Annotated[
        Path | None,
        typer.Option(
            "--similarity", help="With --html: a `moescope similarity` directory (redundant pairs)."
        ),
    ] = None,
    prune_manifest: Annotated[
        Path | None,
        typer.Option("--prune-manifest", help="With --html: a prune_manifest.json (the pruning plan)."),
    ] = None,
    json_out: JsonOpt = False,
    csv_out: CsvOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Routing statistics of a trace: imbalance, dead experts, confidence, co-activation, what-ifs."""
    from moescope.stats.report import build_report

    out = Output.from_flags(json_out, csv_out, quiet)
    if dtype_bytes is not None and dtype_bytes < 1:
        raise typer.BadParameter("--dtype-bytes must be at least 1.")
    if html is None and (similarity is not None or prune_manifest is not None):
        raise typer.BadParameter("--similarity and --prune-manifest go into the page: add --html FILE.")
    from moescope.tracedir.files import read_trace_dir

    traced = read_trace_dir(trace)  # read once, for the tables and the page
    rep = build_report(traced, dtype_bytes=dtype_bytes)
    page = _write_html(out, traced, html, similarity, prune_manifest, rep) if html else None
    if out.fmt == "json":
        out.json(rep.to_dict())
        return
    if out.fmt == "csv":
        out.csv(rep.to_dict()["layers"], list(rep.layers.columns))
        return
    _print_layers(out, rep)
    _print_capacity(out, rep)
    _print_expert_parallel(out, rep)
    _print_pairs(out, rep)
    _print_domains(out, rep)
    for stat, why in rep.unavailable.items():
        out.note(f"not available: {stat} ({why})")
    for stat, how in rep.notes.items():
        out.note(f"{stat}: {how}")
    out.note("--json prints every table, including the confidence histogram and per-layer EP rows.")
    if page is not None:
        out.note(
            f"wrote {html} ({human(page.bytes, 'B')}, {len(page.figures)} figures, {page.seconds:.1f} s)"
        )


def _write_html(
    out: Output,
    trace: TraceDir,
    html: Path,
    similarity: Path | None,
    manifest: Path | None,
    rep: Report,
) -> HtmlReport:
    """Write the page before printing (a refused destination fails before any table is shown)."""
    from moescope.reporting.page import write_html_report

    page = write_html_report(trace, html, similarity=similarity, prune_manifest=manifest, report=rep)
    for warning in page.warnings:
        out.warn(warning)
    return page


def _print_layers(out: Output, rep: Report) -> None:
    s = rep.summary
    title = f"{s.get('model')}: {s.get('tokens', 0):,} tokens, top-{s.get('top_k')} of {s.get('num_experts')} experts"
    # cv and the raw max co-activation ratio are in --json/--csv; the table keeps to 100
    # columns with the count-independent "eff. E" beside entropy and the significant pairs
    out.table(
        [
            [
                int(r.layer), _f(r.imbalance_max_mean), _f(r.entropy_norm, ".3f"), _f(r.effective_experts, ".1f"),
                f"{r.dead}/{r.near_dead}", _f(r.mean_top1_weight, ".3f"), _f(r.reuse_ratio),
                "-" if math.isnan(r.coact_max_ratio) else str(r.coact_significant), _f(r.domain_jsd, ".3f"),
            ]
            for r in rep.layers.itertuples()
        ],
        ["layer", "max/mean", "entropy", "eff. E", "dead/near", "top-1 w", "reuse/chance", "sig. pairs",
         "dom. JSD"],
        title=title,
    )  # fmt: skip


def _print_capacity(out: Output, rep: Report) -> None:
    if rep.capacity.empty:
        return
    cap = rep.capacity.pivot(index="layer", columns="capacity_factor", values="dropped_share")
    out.table(
        [
            [int(layer), *(f"{100 * v:.1f}%" for v in row)]
            for layer, row in zip(cap.index, cap.values, strict=True)
        ],
        ["layer", *(f"C={c:g}" for c in cap.columns)],
        title="Assignments dropped at capacity factor C (per capacity group)",
    )


def _print_expert_parallel(out: Output, rep: Report) -> None:
    ep = rep.expert_parallel
    if ep.empty:
        return
    agg = ep.groupby(["degree", "placement"], sort=True).agg(
        imbalance=("imbalance", "mean"),
        worst=("imbalance", "max"),
        batch=("batch_imbalance", "mean"),
        bytes_=("bytes_per_token", "sum"),
        dedup=("bytes_per_token_dedup", lambda x: x.sum(min_count=1)),  # NaN (balanced) stays NaN
    )
    out.table(
        [
            [f"EP={d}", p, _f(r.imbalance), _f(r.worst), _f(r.batch), human(r.bytes_, "B"),
             human(r.dedup, "B") if math.isfinite(r.dedup) else "-"]
            for (d, p), r in zip(agg.index, agg.itertuples(), strict=True)
        ],
        ["degree", "placement", "imbalance (mean)", "worst layer", "per batch", "a2a/token", "dedup a2a/token"],
        title="Expert parallelism: device load max/mean over layers; all-to-all bytes per token, all layers",
    )  # fmt: skip


def _print_pairs(out: Output, rep: Report) -> None:
    from moescope.stats.report import MIN_EXPECTED, SIGNIFICANCE

    if "coactivation" in rep.unavailable:
        return
    test = (
        f"Benjamini-Hochberg q <= {SIGNIFICANCE:g} over every pair expected {MIN_EXPECTED:g}+ times, "
        f"ranked by the {1 - SIGNIFICANCE:.0%} lower bound of the ratio"
    )
    if rep.coactivation_top.empty:
        out.info(f"No pair is chosen together significantly above chance ({test}).")
        return
    top = rep.coactivation_top.sort_values("ratio_lower", ascending=False).head(10)
    out.table(
        [
            [
                int(r.layer),
                f"{r.expert_a}+{r.expert_b}",
                r.count,
                _f(r.expected, ".1f"),
                _f(r.ratio),
                _f(r.ratio_lower),
                f"{r.q_value:.1e}" if r.q_value >= 1e-300 else "<1e-300",  # 0.0: below float range
            ]
            for r in top.itertuples()
        ],  # fmt: skip
        ["layer", "pair", "count", "expected", "ratio", "ratio low", "q"],
        title=f"Pairs chosen together above chance ({test})",
    )


def _print_domains(out: Output, rep: Report) -> None:
    if rep.domains.empty:
        return
    dom = rep.domains.groupby("domain").agg(jsd=("jsd_vs_rest", "mean"), assignments=("assignments", "sum"))
    out.table(
        [
            [name, r.assignments, _f(r.jsd, ".3f")]
            for name, r in zip(dom.index, dom.itertuples(), strict=True)
        ],
        ["domain", "assignments", "JSD vs other domains (mean over layers)"],
        title="Domain specialisation",
    )


def register(app: typer.Typer) -> None:
    """Add ``report`` to the app."""
    app.command("report", epilog=EXAMPLES)(friendly(report_cmd))
