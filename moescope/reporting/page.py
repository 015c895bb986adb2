"""One self-contained HTML page of a trace's report (``moescope report DIR --html FILE``).

What: :func:`write_html_report` reads a trace directory (and, when given, a similarity
directory and a prune manifest), renders the page with :func:`render_html` and writes it
atomically. The page holds the summary (model, corpus, tokens, source, what the trace
lacks, how the model ran), every table ``moescope report`` prints (the per-layer table,
dead experts, capacity, expert parallelism, co-activated pairs, domains; the long ones
folded in ``<details>``), every plot of the trace plus router confidence, the definition
of each statistic beside its table (:data:`moescope.stats.definitions.DEFINITIONS`), and the
redundant expert pairs and pruning plan. A statistic the trace ``lacks`` (``summary.json``;
:data:`moescope.stats.definitions.NEEDS`) reads "not available: <why>", never a zero.

How: no request leaves the page. CSS is inline, the figures are inline SVG (matplotlib's
SVG backend; heatmaps are PNG data inside the SVG), there is no script, and a
Content-Security-Policy forbids anything else. Every text from the inputs goes through
:func:`html.escape`. The file is written beside its destination and renamed over it; an
existing file is replaced only when it is a moescope HTML report (the ``generator`` meta
tag :data:`GENERATOR` in its first bytes), and a directory or an input (or a path inside
an input directory) is refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from moescope import __version__
from moescope.errors import MoescopeError, OutputError
from moescope.outdir import write_text_atomic
from moescope.reporting import sections as rp
from moescope.stats.definitions import unavailable
from moescope.stats.report import Report, build_report
from moescope.tracedir.files import TraceDir, read_trace_dir
from moescope.tracedir.state import TraceState

#: the ``<meta name="generator">`` content prefix that marks a file this module wrote
GENERATOR = "moescope"
_MARK = f'<meta name="generator" content="{GENERATOR} '


@dataclass
class HtmlReport:
    """What :func:`write_html_report` wrote.

    Attributes:
        path: the HTML file.
        bytes: its size.
        seconds: time to read the inputs, render and write.
        figures: names of the figures inlined.
        unavailable: statistic -> why it is not available (from the trace's ``lacks``).
        warnings: inputs that do not belong together (another model, another trace).
    """

    path: Path
    bytes: int
    seconds: float
    figures: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "path": str(self.path)}


# --------------------------------------------------------------------------- destination


def check_html_destination(path: str | Path | None, inputs: Sequence[str | Path | None] = ()) -> Path:
    """The resolved HTML path, or :class:`OutputError` when moescope must not write there.

    Refused: an empty path, a directory, an input or a path inside an input directory
    (a file added to a trace directory would make it foreign to moescope), and an existing
    file that is not a moescope HTML report.
    """
    raw = "" if path is None else str(path)
    if not raw.strip():
        raise OutputError("--html is empty (an unset shell variable?); pass a file name such as report.html.")
    dest = Path(raw).expanduser().resolve()
    if dest.is_dir():
        raise OutputError(f"{dest} is a directory; pass a file name such as {dest / 'report.html'}.")
    blocked = next((p for p in dest.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise OutputError(
            f"{blocked} is a file, not a directory; pass an --html path whose folders are folders."
        )
    for item in inputs:
        if item is None:
            continue
        src = Path(item).expanduser().resolve()
        if dest == src or src in dest.parents:
            raise OutputError(
                f"{dest} is {'an input' if dest == src else f'inside the input {src}'}; write the "
                "report outside it, e.g. --html report.html."
            )
    if dest.exists() or dest.is_symlink():
        if not dest.is_file() or not is_moescope_html(dest):
            raise OutputError(
                f"{dest} exists and is not a moescope HTML report; moescope replaces only its own "
                "reports: pass a new file name or move that file away."
            )
    return dest


def is_moescope_html(path: Path) -> bool:
    """Whether ``path`` starts like a page this module wrote (its ``generator`` meta tag)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return _MARK.encode() in head


# --------------------------------------------------------------------------- extra inputs


def _read_marker(path: Path, name: str, kind: str, hint: str) -> dict[str, Any]:
    """A moescope output's marker JSON (``similarity.json``, ``prune_manifest.json``), checked."""
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise MoescopeError(f"{path}: no {name}; {hint}.")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise MoescopeError(f"{file}: unreadable ({exc}); {hint}.") from None
    if not isinstance(data, dict) or data.get("kind") != kind or data.get("complete") is not True:
        raise MoescopeError(f"{file}: not a complete moescope {kind} output; {hint}.")
    return data


def read_similarity(path: str | Path) -> Any:
    """A :class:`moescope.redundancy.run.SimilarityReport` rebuilt from ``DIR/similarity.json``."""
    from moescope.redundancy.report import LayerSimilarity, SimilarityReport

    hint = "pass a directory written by `moescope similarity MODEL --out DIR`"
    meta = _read_marker(Path(path).expanduser(), "similarity.json", "similarity", hint)
    try:
        layers = [
            LayerSimilarity(
                int(layer), len(next(iter(mats.values()))), {m: np.asarray(v, float) for m, v in mats.items()}
            )
            for layer, mats in sorted(meta["matrices"].items(), key=lambda kv: int(kv[0]))
        ]
    except (KeyError, TypeError, ValueError, StopIteration, AttributeError):
        raise MoescopeError(f"{path}: similarity.json has no readable matrices; {hint}.") from None
    return SimilarityReport(str(meta.get("model")), layers, int(meta.get("samples") or 0), meta.get("trace"))


def read_prune_manifest(path: str | Path) -> dict[str, Any]:
    """``prune_manifest.json`` (or a pruned directory holding it), checked to be complete."""
    hint = "pass the prune_manifest.json written by `moescope prune ... --out DIR`"
    data = _read_marker(Path(path).expanduser(), "prune_manifest.json", "prune", hint)
    layers = data.get("layers")
    if not isinstance(layers, dict) or not all(
        str(k).isdigit() and isinstance(v, dict) for k, v in layers.items()
    ):
        raise MoescopeError(f"{path}: the manifest has no per-layer plan; {hint}.")
    return data


# --------------------------------------------------------------------------- rendering


def render_html(
    rep: Report,
    state: TraceState,
    *,
    trace_path: str = "",
    sim: Any | None = None,
    manifest: dict[str, Any] | None = None,
    warnings: Sequence[str] = (),
) -> tuple[str, list[str]]:
    """The page (a string) and the names of the figures it holds."""
    summary = rep.summary or {}
    lacks = [str(x) for x in summary.get("lacks") or []]
    gone = unavailable(lacks, bool(state.domains))
    ctx = rp.Context(rep=rep, state=state, gone=gone, lacks=lacks)
    parts = [
        rp.summary_section(ctx, trace_path),
        rp.layers_section(ctx),
        rp.confidence_section(ctx),
        rp.capacity_section(ctx),
        rp.expert_parallel_section(ctx),
        rp.coactivation_section(ctx),
        rp.domains_section(ctx),
    ]
    from moescope.reporting.serving import serving_section  # only traces with routes/ get it

    serving = serving_section(ctx, trace_path)
    if serving is not None:
        parts.append(serving)
    if sim is not None:
        parts.append(rp.similarity_section(ctx, sim))
    if manifest is not None:
        parts.append(rp.prune_section(ctx, manifest))
    model = str(summary.get("model") or "model")
    nav = "".join(f'<a href="#{escape(sid)}">{escape(title)}</a>' for sid, title, _ in parts)
    warn = "".join(f'<p class="warn">{escape(w)}</p>' for w in warnings)
    body = "\n".join(html for _, _, html in parts)
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'{_MARK}{escape(__version__)} report">\n'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:; font-src data:\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>moescope report: {escape(model)}</title>\n<style>{rp.PAGE_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>moescope report: {escape(model)}</h1><nav>{nav}</nav></header>\n<main>\n{warn}"
        f"{body}\n</main>\n<footer>Written by moescope {escape(__version__)} from "
        f"{escape(trace_path)}. Self-contained: no scripts, no external requests.</footer>\n"
        "</body>\n</html>\n"
    )
    return page, ctx.figures


def write_html_report(
    trace_dir: str | Path | TraceDir,
    html_path: str | Path,
    *,
    similarity: str | Path | None = None,
    prune_manifest: str | Path | None = None,
    dtype_bytes: int | None = None,
    report: Report | None = None,
) -> HtmlReport:
    """Read a trace (and a similarity directory, a prune manifest) and write one HTML page.

    Args:
        trace_dir: a complete trace directory (or one already read with :func:`read_trace_dir`).
        html_path: the page to write (replaced only when it is a moescope HTML report).
        similarity: a directory written by ``moescope similarity --out``: redundant pairp.
        prune_manifest: ``prune_manifest.json`` (or its directory): the pruning plan.
        dtype_bytes: bytes per activation element for the all-to-all estimate.
        report: the trace's :func:`~moescope.stats.report.build_report`, when the caller has it already
            (``moescope report`` prints the same report); computed here otherwise.

    Returns:
        An :class:`HtmlReport` (path, size, seconds, figures, what was unavailable).

    Raises:
        OutputError: ``html_path`` is refused (see :func:`check_html_destination`).
        TraceError, MoescopeError: an input is missing or not the moescope output it should be.
    """
    start = time.perf_counter()
    trace_path = trace_dir.path if isinstance(trace_dir, TraceDir) else trace_dir
    dest = check_html_destination(html_path, [trace_path, similarity, prune_manifest])
    trace = trace_dir if isinstance(trace_dir, TraceDir) else read_trace_dir(trace_dir)
    rep = report if report is not None else build_report(trace, dtype_bytes=dtype_bytes)
    sim = read_similarity(similarity) if similarity is not None else None
    manifest = read_prune_manifest(prune_manifest) if prune_manifest is not None else None
    warnings = _mismatches(trace.summary, sim, manifest)
    page, figs = render_html(
        rep, trace.state, trace_path=str(trace_path), sim=sim, manifest=manifest, warnings=warnings
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    check_html_destination(html_path, [trace_path, similarity, prune_manifest])  # again, just before
    write_text_atomic(dest, page)
    lacks = [str(x) for x in trace.summary.get("lacks") or []]
    return HtmlReport(
        path=dest,
        bytes=dest.stat().st_size,
        seconds=time.perf_counter() - start,
        figures=figs,
        unavailable=unavailable(lacks, bool(trace.state.domains)),
        warnings=warnings,
    )


def _mismatches(summary: dict[str, Any], sim: Any | None, manifest: dict[str, Any] | None) -> list[str]:
    """Warnings when the similarity or the pruning plan was made from another model or trace."""
    out = []
    model = summary.get("model")
    if sim is not None and model and sim.model != model:
        out.append(f"The similarity report is of {sim.model}, the trace of {model}.")
    if manifest is not None:
        fp, mfp = summary.get("fingerprint"), manifest.get("trace_fingerprint")
        if fp and mfp and fp != mfp:
            out.append("The pruning plan was scored on a trace of another checkpoint (fingerprints differ).")
        elif manifest.get("trace_tokens") not in (None, summary.get("tokens")):
            out.append(
                f"The pruning plan was scored on a trace of {manifest['trace_tokens']:,} tokens; "
                f"this one has {summary.get('tokens', 0):,}."
            )
    return out


__all__ = [
    "GENERATOR",
    "HtmlReport",
    "check_html_destination",
    "is_moescope_html",
    "read_prune_manifest",
    "read_similarity",
    "render_html",
    "write_html_report",
    "write_text_atomic",
]
