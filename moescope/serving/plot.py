"""The offload figure: hit rate against cache size, one line per policy, one panel per layer.

:func:`write_cache_plot` draws with matplotlib's Agg backend and writes a PNG through a
temporary file renamed over the destination; an existing file is replaced only when an
earlier ``moescope offload`` wrote it (its PNG metadata carries :data:`PLOT_MARK`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from moescope.outdir import check_png_destination
from moescope.serving.cache import POLICIES, CacheResult

#: text chunk that marks a plot as written by ``moescope offload``
PLOT_MARK = "moescope offload"


def check_plot_path(path: Path) -> None:
    """A PNG path moescope may write: new, or a plot an earlier ``offload`` wrote (:func:`moescope.outdir.check_png_destination`)."""
    check_png_destination(path, PLOT_MARK, "offload")


def write_cache_plot(results: Sequence[CacheResult], path: str | Path, title: str = "") -> Path:
    """Hit rate vs cache size per policy, one panel per MoE layer (at most 8 panels: evenly spaced)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    check_plot_path(path)
    layers = sorted({r.layer for r in results})
    if len(layers) > 8:
        step = len(layers) / 8
        layers = [layers[int(i * step)] for i in range(8)]
    cols = min(4, len(layers))
    rows = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False, sharey=True)
    for ax, layer in zip(axes.flat, layers, strict=False):
        for policy in POLICIES:
            pts = sorted(
                (r.cache_experts, r.hit_rate) for r in results if r.layer == layer and r.policy == policy
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, lw=1, label=policy)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("experts cached per layer", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(layers) :]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("hit rate")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or "Expert-cache hit rate", fontsize=10)
    fig.tight_layout()
    part = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        fig.savefig(part, dpi=110, format="png", metadata={"Software": PLOT_MARK})
        os.replace(part, path)
    finally:
        plt.close(fig)
        part.unlink(missing_ok=True)
    return path
