"""Write a whole trace directory from a :class:`~moescope.tracedir.files.TraceState`.

What: :func:`write_trace_dir` writes every file a trace directory holds (contract in
``DESIGN.md``, names in :mod:`moescope.tracedir.files`): ``state.npz``, the CSV tables,
``plots/*.png`` (or ``.svg``/``.pdf``) and, last, ``summary.json`` with per-layer imbalance and dead experts.
Tracing, merging and importing routing all end here, so a directory is always derived
the same way from its sums.

How: the caller owns the destination (normally the temporary directory of
:func:`moescope.outdir.atomic_output`, renamed into place afterwards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moescope.stats import report as st
from moescope.tracedir.files import PLOTS, build_summary, write_summary, write_tables
from moescope.tracedir.state import TraceState


def layer_records(state: TraceState) -> list[dict[str, Any]]:
    """The per-layer records of ``summary.json``: imbalance, dead and near-dead experts, drops."""
    return [
        {
            "layer": int(r.layer),
            "imbalance_max_mean": r.imbalance_max_mean,
            "cv": r.cv,
            "entropy_norm": r.entropy_norm,
            "dead_experts": st.dead_experts(state, int(r.layer)),
            "near_dead_experts": st.dead_experts(state, int(r.layer), near=True),
            "router_dropped": int(r.router_dropped),
        }
        for r in st.layer_stats(state).itertuples()
    ]


def write_trace_dir(
    folder: Path,
    state: TraceState,
    *,
    timings: dict[str, Any],
    plots: bool = True,
    plot_format: str = "png",
) -> dict[str, Any]:
    """Write every derived file from ``state`` into ``folder``; ``summary.json`` goes last.

    Args:
        folder: destination (normally a temporary directory renamed afterwards).
        state: the raw sums (domains are put in canonical order first).
        timings: recorded in the summary (the only part not derived from ``state``).
        plots: also draw ``plots/*.<plot_format>``.
        plot_format: ``png``, ``svg`` or ``pdf`` (:data:`moescope.stats.plots.PLOT_FORMATS`).

    Returns:
        The summary written.
    """
    state.canonical()
    folder.mkdir(parents=True, exist_ok=True)
    files = write_tables(folder, state)
    if plots:
        from moescope.stats.plots import write_plots

        files += [f"{PLOTS}/{p.name}" for p in write_plots(state, folder / PLOTS, plot_format)]
    summary = build_summary(state, layers=layer_records(state), timings=timings, files=files)
    write_summary(folder, summary)
    return summary
