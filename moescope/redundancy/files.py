"""The files of a similarity report: ``pairs.csv``, ``layers.csv``, ``similarity.json``, heatmaps.

What: :func:`write_report` writes a :class:`moescope.redundancy.run.SimilarityReport` as an owned
output directory (built aside and swapped in by :func:`moescope.outdir.atomic_output`);
:func:`heatmap_figure` draws one layer's measures and :func:`plot_heatmaps` saves one figure
per layer (png, svg or pdf). :mod:`moescope.redundancy.run` computes the report and re-exports
these names.

How: this module imports :mod:`moescope.redundancy.run` only for type checking (that module
imports this one and re-exports its names).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moescope import __version__
from moescope.outdir import atomic_output, resolve_output, write_json_atomic

if TYPE_CHECKING:
    from moescope.redundancy.report import LayerSimilarity, SimilarityReport

__all__ = ["heatmap_figure", "plot_heatmaps", "write_report"]


def write_report(
    report: SimilarityReport,
    out: str | Path,
    *,
    plots: bool = True,
    inputs: Sequence[str | Path] = (),
    plot_format: str = "png",
) -> list[Path]:
    """Write ``pairs.csv``, ``layers.csv``, ``similarity.json`` and ``plots/*.png`` to ``out``.

    The directory is built aside and swapped in (:func:`moescope.outdir.atomic_output`): an
    existing ``out`` is replaced only when it is a complete similarity report of moescope's
    holding nothing else.

    Args:
        report: the computed report.
        out: the directory.
        plots: also draw heatmaps.
        inputs: paths read (model directory, trace, corpus); ``out`` may not contain them.
        plot_format: ``png``, ``svg`` or ``pdf`` (:data:`moescope.stats.plots.PLOT_FORMATS`).

    Returns:
        The files written (at their final paths).

    Raises:
        OutputError: ``out`` is refused.
    """
    with atomic_output(out, "similarity", inputs=inputs) as tmp:
        written = _write_report_files(report, tmp, plots=plots, plot_format=plot_format)
    dest = resolve_output(out)
    return [dest / p.relative_to(tmp) for p in written]


def _write_report_files(
    report: SimilarityReport, root: Path, *, plots: bool, plot_format: str = "png"
) -> list[Path]:
    written = []
    pairs = report.pairs()
    layers = report.layer_scores()
    for name, frame in (("pairs.csv", pairs), ("layers.csv", layers)):
        frame.to_csv(root / name, index=False)
        written.append(root / name)
    meta = {
        "tool": "moescope",
        "kind": "similarity",
        "complete": True,
        "moescope_version": __version__,
        "model": report.model,
        "measures": report.measures,
        "samples": report.samples,
        "trace": report.trace,
        "layers": layers.to_dict(orient="records"),
        "matrices": {
            str(ls.layer): {m: np.round(mat, 6).tolist() for m, mat in ls.matrices.items()}
            for ls in report.layers
        },
    }
    if plots:
        written.extend(plot_heatmaps(report, root / "plots", plot_format))
    write_json_atomic(root / "similarity.json", meta)  # the marker, last
    written.append(root / "similarity.json")
    return written


def heatmap_figure(report: SimilarityReport, ls: LayerSimilarity) -> Any:
    """The matplotlib figure of one layer: a heatmap per measure plus the combined redundancy."""
    from moescope.stats.plots import pyplot

    plt = pyplot()
    order = [*report.measures, *(m for m in ls.matrices if m not in report.measures)]  # MEASURES order
    panels = [(m, ls.matrices[m]) for m in order]
    panels.append(("redundancy", ls.redundancy()))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, (name, mat) in zip(axes[0], panels, strict=True):
        shown = mat.copy()
        np.fill_diagonal(shown, np.nan)
        im = ax.imshow(shown, cmap="viridis", vmin=min(0.0, float(np.nanmin(shown))), vmax=1.0)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{report.model} layer {ls.layer}: expert similarity", fontsize=10)
    fig.tight_layout()
    return fig


def plot_heatmaps(report: SimilarityReport, out: Path, fmt: str = "png") -> list[Path]:
    """One figure per layer (:func:`heatmap_figure`) as ``similarity_layerNNN.<fmt>`` (png, svg or pdf)."""
    from moescope.stats.plots import check_plot_format, save_figure

    fmt = check_plot_format(fmt)
    out.mkdir(parents=True, exist_ok=True)
    return [
        save_figure(
            heatmap_figure(report, ls), out / f"similarity_layer{ls.layer:03d}.{fmt}", dpi=90, tight=False
        )
        for ls in report.layers
    ]
