"""The sweep's figure: perplexity versus FLOPs per token, one point per setting, native starred.

:func:`write_plot` draws with matplotlib's Agg backend and writes a PNG through a temporary
file renamed over the destination; an existing file is replaced only when an earlier sweep
wrote it (its PNG metadata carries :data:`PLOT_MARK`), so moescope never overwrites a file
it did not write.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from moescope.outdir import check_png_destination

if TYPE_CHECKING:
    from moescope.evaluation.sweep import SweepResult

#: text chunk that marks a plot as written by ``moescope sweep`` (so it may be replaced)
PLOT_MARK = "moescope sweep"


def check_plot_path(path: Path) -> None:
    """A PNG path moescope may write: new, or a plot an earlier sweep wrote (:func:`moescope.outdir.check_png_destination`)."""
    check_png_destination(path, PLOT_MARK, "sweep")


def write_plot(result: SweepResult, path: str | Path) -> Path:
    """Perplexity versus FLOPs per token, one point per setting, the native setting starred.

    Written to a temporary file beside ``path`` and renamed over it; an existing file is
    replaced only if an earlier ``moescope sweep`` wrote it (its PNG metadata says so).

    Raises:
        OutputError: not a ``.png`` path, a missing directory, or a file moescope did not write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    check_plot_path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {
        "top-k": ("tab:blue", "o", "-", lambda r: r.native or (isinstance(r.top_k, int) and r.top_p is None)),
        "top-p": ("tab:orange", "s", "-", lambda r: isinstance(r.top_p, float)),
        "per layer": (
            "tab:gray",
            "D",
            "none",
            lambda r: isinstance(r.top_k, dict) or isinstance(r.top_p, dict),
        ),
    }
    for label, (color, marker, line, member) in series.items():
        pts = sorted((r.flops_per_token, r.perplexity, r.setting) for r in result.records if member(r))
        if not pts:
            continue
        xs, ys, _names = zip(*pts, strict=True)
        ax.plot([x / 1e6 for x in xs], ys, marker=marker, color=color, label=label, lw=1, ls=line)
        for x, y, n in pts:
            ax.annotate(n, (x / 1e6, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    nat = result.native
    ax.plot(
        [nat.flops_per_token / 1e6],
        [nat.perplexity],
        marker="*",
        ms=16,
        color="tab:red",
        ls="none",
        label=f"native (k={result.native_top_k})",
    )
    ax.set_xlabel(f"forward FLOPs per token (millions; attention at {result.context} keys)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(
        f"Perplexity vs compute as routing changes\n{result.model} · {result.records[0].tokens:,} tokens · "
        f"{result.num_experts} experts, native top-{result.native_top_k}",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    part = path.parent / f".{path.name}.part-{os.getpid()}"
    try:
        fig.savefig(part, dpi=120, format="png", metadata={"Software": PLOT_MARK})
        os.replace(part, path)
    finally:
        plt.close(fig)
        part.unlink(missing_ok=True)
    return path
