"""Plots of a trace: per-layer load bars, layer × expert heatmap, co-activation, domains, capacity.

What: :func:`write_plots` draws the figures of a :class:`moescope.tracedir.files.TraceState`
into a folder as PNG (default), SVG or PDF (:data:`PLOT_FORMATS`, ``--plot-format``) and
returns their paths; :func:`figures` yields the same figures for other writers (the HTML
report inlines them with :func:`figure_svg`). Each figure has a title that says what it
shows, labelled axes and a colour-bar label, so it reads without the data. A figure whose
data the trace lacks (``lacks`` in its meta, e.g. imported routing without co-activation)
is left out rather than drawn from zeros.

How: matplotlib with the non-interactive Agg backend (no display needed), imported inside
the functions. Large models get a readable subset: at most 12 layers in the bar grid and 4
in the co-activation grid, spread evenly across depth. One function per figure. SVG and
PDF carry no creation date and SVG element ids are salted with the figure's name, so the
same trace gives the same bytes and several SVGs can share one HTML page; SVG files draw
their text as outlines (they look the same without the fonts). This module
imports only :mod:`moescope.stats.report` and :mod:`moescope.tracedir.files`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope.stats import report as st
from moescope.tracedir.state import CAPACITY_FACTORS, HIST_BINS, TraceState

#: file formats of ``--plot-format`` (matplotlib writes each without extra dependencies)
PLOT_FORMATS = ("png", "svg", "pdf")
#: dots per inch of PNG figures (SVG and PDF are vector; their embedded heatmaps are pixel-exact)
PNG_DPI = 110
_NO_DATE = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}


def check_plot_format(value: str) -> str:
    """``png``, ``svg`` or ``pdf`` (any case), or ``ValueError`` naming the valid ones."""
    fmt = str(value).strip().lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise ValueError(f"unknown plot format {value!r}; use {', '.join(PLOT_FORMATS)}.")
    return fmt


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, *, dpi: int = PNG_DPI, tight: bool = True) -> Path:
    """Save ``fig`` in the format named by ``path``'s suffix (no dates: reproducible bytes), then close it."""
    import matplotlib

    fmt = check_plot_format(path.suffix)
    with matplotlib.rc_context({"svg.hashsalt": path.stem}):
        fig.savefig(
            path, format=fmt, dpi=dpi, bbox_inches="tight" if tight else None, metadata=_NO_DATE.get(fmt)
        )
    pyplot().close(fig)
    return path


def figure_svg(fig: Any, name: str) -> str:
    """``fig`` as an SVG element to inline in HTML, then closed.

    No XML prolog, ids salted with ``name`` (unique on a page of several figures), and text
    kept as ``<text>`` (a third smaller than glyph outlines, and searchable in the page).
    """
    import io

    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": name, "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata=_NO_DATE["svg"])
    pyplot().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _pick(n: int, most: int) -> list[int]:
    """Up to ``most`` indices spread evenly over ``range(n)``, first and last included."""
    if n <= most:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, most)})


def _subtitle(state: TraceState) -> str:
    model = state.meta.get("model", "model")
    return f"{model} · {state.tokens:,} tokens · top-{state.top_k} of {state.num_experts} experts"


def _load_bars(plt: Any, state: TraceState) -> Any:
    """Per-layer load bars against uniform."""
    n_l, n_e = state.counts.shape
    share = st.load_share(state.counts)
    uniform = 1.0 / n_e
    idx = _pick(n_l, 12)
    cols = min(4, len(idx))
    rows = (len(idx) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax, i in zip(axes.flat, idx, strict=False):
        ax.bar(np.arange(n_e), share[i] * 100, color="tab:blue", width=0.85)
        ax.axhline(uniform * 100, color="tab:red", lw=1, ls="--", label="uniform")
        ax.set_title(f"layer {state.layers[i]}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("share of assignments (%)")
    for ax in list(axes.flat)[len(idx) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Expert load per layer (dashed: uniform)\n{_subtitle(state)}", fontsize=10)
    fig.tight_layout()
    return fig


def _load_heatmap(plt: Any, state: TraceState) -> Any:
    """Layer × expert load relative to uniform."""
    n_l, n_e = state.counts.shape
    share = st.load_share(state.counts)
    uniform = 1.0 / n_e
    fig, ax = plt.subplots(figsize=(max(5, 0.12 * n_e + 3), max(2.5, 0.25 * n_l + 1.5)))
    im = ax.imshow(share / uniform, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(n_l))
    ax.set_yticklabels([str(x) for x in state.layers], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"Expert load relative to uniform (1.0 = even)\n{_subtitle(state)}", fontsize=10)
    fig.colorbar(im, ax=ax, label="load / uniform load")
    return fig


def _coactivation(plt: Any, state: TraceState) -> Any:
    """Co-activation observed / expected for a few layers."""
    ratio = st.coactivation_ratio(state)
    idx = _pick(len(state.layers), 4)
    fig, axes = plt.subplots(1, len(idx), figsize=(3.8 * len(idx), 3.4), squeeze=False)
    for ax, i in zip(axes.flat, idx, strict=True):
        full = np.fmax(ratio[i], ratio[i].T)  # symmetric view
        im = ax.imshow(full, cmap="magma", interpolation="nearest", vmin=0)
        ax.set_title(f"layer {state.layers[i]}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax, label="observed / expected", fraction=0.046)
    fig.suptitle(
        f"Co-activation: pair count / count expected by chance (blank: < 5 pairs)\n{_subtitle(state)}",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def _domain_heatmap(plt: Any, state: TraceState) -> Any | None:
    """Domain × expert load at the layer whose domains differ most (``None``: no domains)."""
    if not state.domains or state.dom_counts.sum() == 0:
        return None
    n_l, n_e = state.counts.shape
    jsd = [st.mean_pairwise_jsd(state, i) for i in range(n_l)]
    li = int(np.nanargmax(jsd)) if np.isfinite(jsd).any() else n_l // 2
    d_share = st.load_share(state.dom_counts[:, li])
    fig, ax = plt.subplots(figsize=(max(5, 0.12 * n_e + 3), max(2.2, 0.35 * len(state.domains) + 1.5)))
    im = ax.imshow(d_share / (1.0 / n_e), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(state.domains)))
    ax.set_yticklabels(state.domains, fontsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("domain")
    ax.set_title(
        f"Expert load per domain, layer {state.layers[li]} (most domain-specific layer)\n{_subtitle(state)}",
        fontsize=10,
    )
    fig.colorbar(im, ax=ax, label="load / uniform load")
    return fig


def _capacity(plt: Any, state: TraceState) -> Any:
    """Share of assignments dropped against the capacity factor."""
    assign = state.counts.sum(axis=1, keepdims=True)
    dropped = np.where(assign > 0, state.cap_dropped / np.maximum(assign, 1), np.nan) * 100
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i in _pick(len(state.layers), 8):
        ax.plot(CAPACITY_FACTORS, dropped[i], marker="o", lw=1, label=f"layer {state.layers[i]}")
    ax.plot(CAPACITY_FACTORS, np.nanmean(dropped, axis=0), color="black", lw=2.5, label="mean, all layers")
    ax.set_xlabel("capacity factor C (capacity = C · group · k / E per capacity group)")
    ax.set_ylabel("assignments dropped (%)")
    ax.set_xticks(CAPACITY_FACTORS)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"Token dropping under a capacity limit\n{_subtitle(state)}", fontsize=10)
    return fig


def _confidence(plt: Any, state: TraceState) -> Any:
    """Histogram of the top-1 share (largest gate weight / the token's gate-weight sum) per layer."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    edges = np.arange(HIST_BINS + 1) / HIST_BINS
    centres = (edges[:-1] + edges[1:]) / 2
    for i in _pick(len(state.layers), 8):
        hist = state.top1_hist[i].astype(np.float64)
        share = hist / hist.sum() * 100 if hist.sum() else hist
        ax.plot(centres, share, marker=".", lw=1, label=f"layer {state.layers[i]}")
    ax.axvline(1.0 / state.top_k, color="gray", lw=1, ls="--", label=f"1/k = {1 / state.top_k:.2f}")
    ax.set_xlabel("top-1 share of the token's gate weight")
    ax.set_ylabel("tokens (%)")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"Router confidence (dashed: an even split over k)\n{_subtitle(state)}", fontsize=10)
    return fig


#: figure name (the file name without its extension) -> figure function, in drawing order
FIGURES: dict[str, Callable[[Any, TraceState], Any]] = {
    "load_bars": _load_bars,
    "load_heatmap": _load_heatmap,
    "coactivation": _coactivation,
    "domain_heatmap": _domain_heatmap,
    "capacity": _capacity,
}
#: figures drawn only on request (the HTML report), not written into a trace directory
EXTRA_FIGURES: dict[str, Callable[[Any, TraceState], Any]] = {"confidence": _confidence}
#: figure name -> ``lacks`` entries (``summary.json``) any one of which leaves it out
FIGURE_NEEDS: dict[str, tuple[str, ...]] = {
    "coactivation": ("coactivation", "per_token"),
    "domain_heatmap": ("domains",),
    "capacity": ("capacity", "per_token", "batches"),
    "confidence": ("gate_weights", "per_token"),
}


def figures(state: TraceState, names: Sequence[str] | None = None) -> Iterator[tuple[str, Any]]:
    """``(name, matplotlib figure)`` for each figure the trace has data for; the caller closes them.

    Args:
        state: trace sums (``state.meta["lacks"]`` leaves figures out, see :data:`FIGURE_NEEDS`).
        names: figures to draw, from :data:`FIGURES` and :data:`EXTRA_FIGURES` (default: :data:`FIGURES`).
    """
    plt = pyplot()
    lacks = set(state.meta.get("lacks") or [])
    draw_by_name = {**FIGURES, **EXTRA_FIGURES}
    for name in names if names is not None else FIGURES:
        if lacks.intersection(FIGURE_NEEDS.get(name, ())):
            continue
        fig = draw_by_name[name](plt, state)
        if fig is not None:
            yield name, fig


def write_plots(state: TraceState, folder: Path, fmt: str = "png") -> list[Path]:
    """Draw every plot for ``state`` into ``folder``.

    Args:
        state: trace sums.
        folder: created if missing.
        fmt: ``png``, ``svg`` or ``pdf`` (:data:`PLOT_FORMATS`).

    Returns:
        Paths of the files written (``<name>.<fmt>``).

    Raises:
        ValueError: an unknown ``fmt``.
    """
    fmt = check_plot_format(fmt)
    folder.mkdir(parents=True, exist_ok=True)
    return [save_figure(fig, folder / f"{name}.{fmt}") for name, fig in figures(state)]
