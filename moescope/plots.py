"""Plots of a trace: per-layer load bars, layer × expert heatmap, co-activation, domains, capacity.

What: :func:`write_plots` draws PNGs from a :class:`moescope.tracedir.TraceState` into a
folder and returns their paths. Each figure has a title that says what it shows, labelled
axes and a colour-bar label, so it reads without the data.

How: matplotlib with the non-interactive Agg backend (no display needed), imported inside
the function. Large models get a readable subset: at most 12 layers in the bar grid and 4
in the co-activation grid, spread evenly across depth. One function per figure; this
module imports only :mod:`moescope.stats` and :mod:`moescope.tracedir`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moescope import stats as st
from moescope.tracedir import CAPACITY_FACTORS, TraceState


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
    ax.set_xlabel("capacity factor C (capacity = C · tokens · k / E per batch)")
    ax.set_ylabel("assignments dropped (%)")
    ax.set_xticks(CAPACITY_FACTORS)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"Token dropping under a capacity limit\n{_subtitle(state)}", fontsize=10)
    return fig


#: file name -> figure function, in drawing order
FIGURES: dict[str, Callable[[Any, TraceState], Any]] = {
    "load_bars.png": _load_bars,
    "load_heatmap.png": _load_heatmap,
    "coactivation.png": _coactivation,
    "domain_heatmap.png": _domain_heatmap,
    "capacity.png": _capacity,
}


def write_plots(state: TraceState, folder: Path) -> list[Path]:
    """Draw every plot for ``state`` into ``folder``.

    Args:
        state: trace sums.
        folder: created if missing.

    Returns:
        Paths of the PNGs written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, draw in FIGURES.items():
        fig = draw(plt, state)
        if fig is None:
            continue
        path = folder / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
