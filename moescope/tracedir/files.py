"""The trace directory: its files, schemas, raw state, and the one loader.

What: everything that defines a trace directory (contract in ``DESIGN.md``) is declared
here once, and every reader goes through :func:`read_trace_dir`:

- file names (:data:`SUMMARY`, :data:`STATE`, :data:`EXPERT_LOAD`, ...) and CSV columns
  (:data:`EXPERT_LOAD_COLUMNS`, ...);
- :class:`TraceState`, the mergeable raw sums (``state.npz``), with its arrays
  (:data:`STATE_ARRAYS`) and settings (:data:`CAPACITY_FACTORS`, :data:`EP_DEGREES`,
  :data:`HIST_BINS`, :data:`FIXED_SCALE`), defined in :mod:`moescope.tracedir.state`
  (import them from there);
- the CSV tables derived from a state (:func:`expert_load`, :func:`coactivation`,
  :func:`domain_load`, :func:`capacity`) and the ``summary.json`` record
  (:func:`build_summary`);
- :func:`read_trace_dir`, the loader used by report, merge, prune and similarity: it
  accepts a directory only when ``summary.json`` is a complete moescope trace and
  ``state.npz`` matches it, and returns a :class:`TraceDir` whose tables are derived from
  the state on first use.

How: this module imports only numpy, pandas and moescope's leaf modules
(``errors``, ``outdir``, ``tracestate``), so
:mod:`moescope.stats.report`, :mod:`moescope.stats.plots` and :mod:`moescope.tracing` import it
downward. Writing a whole directory (tables, plots, summary, atomically) is
:func:`moescope.tracing.write_trace_dir`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moescope import __version__
from moescope.errors import TraceError
from moescope.outdir import write_json_atomic
from moescope.tracedir.state import (
    CAPACITY_FACTORS,
    TraceState,
    group_drops,
)

__all__ = [
    "CAPACITY",
    "CAPACITY_COLUMNS",
    "COACTIVATION",
    "COACTIVATION_COLUMNS",
    "DOMAIN_LOAD",
    "DOMAIN_LOAD_COLUMNS",
    "EXPERT_LOAD",
    "EXPERT_LOAD_COLUMNS",
    "KIND",
    "PLOTS",
    "ROUTES",
    "ROUTE_CHUNK",
    "ROUTE_GLOB",
    "STATE",
    "SUMMARY",
    "TraceDir",
    "build_summary",
    "capacity",
    "coactivation",
    "domain_load",
    "expert_load",
    "load_trace",
    "read_trace_dir",
    "write_summary",
    "write_tables",
]

_RETRACE = "rerun `moescope trace`"

#: ``kind`` recorded in ``summary.json`` (see :mod:`moescope.outdir`)
KIND = "trace"
SUMMARY = "summary.json"
STATE = "state.npz"
EXPERT_LOAD = "expert_load.csv"
COACTIVATION = "coactivation.csv"
DOMAIN_LOAD = "domain_load.csv"
CAPACITY = "capacity.csv"
PLOTS = "plots"
ROUTES = "routes"
#: route chunks are named by the global index of their first batch, so shards never collide
ROUTE_CHUNK = "part-{batch:07d}.parquet"
ROUTE_GLOB = "part-*.parquet"

EXPERT_LOAD_COLUMNS = ("layer", "expert", "count", "weight_sum", "out_norm_sum", "weighted_out_norm_sum")
COACTIVATION_COLUMNS = ("layer", "expert_a", "expert_b", "count")
DOMAIN_LOAD_COLUMNS = ("domain", "layer", "expert", "count", "weight_sum")
CAPACITY_COLUMNS = ("layer", "capacity_factor", "dropped", "assignments", "dropped_share")

# --------------------------------------------------------------------------- derived tables


def expert_load(state: TraceState) -> pd.DataFrame:
    """``expert_load.csv``: one row per (layer, expert), columns :data:`EXPERT_LOAD_COLUMNS`."""
    n_l, n_e = state.counts.shape
    return pd.DataFrame(
        {
            "layer": np.repeat(state.layers, n_e),
            "expert": np.tile(np.arange(n_e), n_l),
            "count": state.counts.reshape(-1),
            "weight_sum": state.floats("weight").reshape(-1),
            "out_norm_sum": state.floats("out_norm").reshape(-1),
            "weighted_out_norm_sum": state.floats("wout_norm").reshape(-1),
        },
        columns=list(EXPERT_LOAD_COLUMNS),
    )


def coactivation(state: TraceState) -> pd.DataFrame:
    """``coactivation.csv``: pairs ``expert_a < expert_b`` chosen by the same token (count > 0)."""
    li, a, b = np.nonzero(state.coact)
    return pd.DataFrame(
        {
            "layer": np.asarray(state.layers, dtype=np.int64)[li],
            "expert_a": a,
            "expert_b": b,
            "count": state.coact[li, a, b],
        },
        columns=list(COACTIVATION_COLUMNS),
    )


def domain_load(state: TraceState) -> pd.DataFrame:
    """``domain_load.csv``: one row per (domain, layer, expert), columns :data:`DOMAIN_LOAD_COLUMNS`."""
    n_d, n_l, n_e = state.dom_counts.shape
    return pd.DataFrame(
        {
            "domain": np.repeat(state.domains, n_l * n_e),
            "layer": np.tile(np.repeat(state.layers, n_e), n_d),
            "expert": np.tile(np.arange(n_e), n_d * n_l),
            "count": state.dom_counts.reshape(-1),
            "weight_sum": state.floats("dom_weight").reshape(-1),
        },
        columns=list(DOMAIN_LOAD_COLUMNS),
    )


def capacity(state: TraceState) -> pd.DataFrame:
    """``capacity.csv``: share of token-expert assignments dropped at each capacity factor, per layer.

    Drops are counted per capacity group of ``state.capacity_group`` consecutive tokens
    (:mod:`moescope.tracing.reduce`). Groups a shard saw only in part count at the size seen
    (a merge of every shard counts them whole).
    """
    rows = []
    assignments = state.counts.sum(axis=1)
    dropped_all = state.cap_dropped
    if state.cap_open:
        dropped_all = dropped_all + group_drops(
            np.stack([c for _t, c in state.cap_open.values()]),
            [t for t, _c in state.cap_open.values()],
            state.top_k,
            state.num_experts,
        )
    for i, layer in enumerate(state.layers):
        for j, cf in enumerate(CAPACITY_FACTORS):
            dropped = int(dropped_all[i, j])
            rows.append(
                {
                    "layer": layer,
                    "capacity_factor": cf,
                    "dropped": dropped,
                    "assignments": int(assignments[i]),
                    "dropped_share": dropped / assignments[i] if assignments[i] else float("nan"),
                }
            )
    return pd.DataFrame(rows, columns=list(CAPACITY_COLUMNS))


def write_tables(folder: Path, state: TraceState) -> list[str]:
    """Write ``state.npz`` and the CSV tables into ``folder``; returns the file names written."""
    state.save(folder / STATE)
    tables = [(EXPERT_LOAD, expert_load), (COACTIVATION, coactivation), (CAPACITY, capacity)]
    if state.domains:
        tables.append((DOMAIN_LOAD, domain_load))
    for name, make in tables:
        make(state).to_csv(folder / name, index=False)
    return [STATE, *(name for name, _ in tables)]


# --------------------------------------------------------------------------- summary


def build_summary(
    state: TraceState, *, layers: list[dict[str, Any]], timings: dict[str, Any], files: list[str]
) -> dict[str, Any]:
    """The ``summary.json`` record of a trace (the keys are a contract; see ``DESIGN.md``).

    Args:
        state: the raw sums (its ``meta`` describes the run).
        layers: one record per MoE layer (imbalance, dead experts; see :mod:`moescope.stats.report`).
        timings: recorded as is, plus ``load_seconds`` from the meta and ``tokens_per_second``.
        files: the files written, relative to the directory.
    """
    meta = state.meta
    keys_from_meta = ("model", "fingerprint", "corpus_fingerprint", "model_type", "corpus", "split")
    settings = (
        "packing",
        "seq_len",
        "batch_size",
        "max_tokens",
        "dtype",
        "checkpoint_dtype",
        "device",
        "hidden_size",
    )
    rate = state.tokens / timings["trace_seconds"] if timings.get("trace_seconds") else None
    return {
        "tool": "moescope",
        "kind": KIND,
        "complete": True,
        "moescope_version": meta.get("moescope_version", __version__),
        "run_id": meta.get("run_id"),
        "source": meta.get("source", "moescope"),
        "lacks": meta.get("lacks", []),
        **{key: meta.get(key) for key in keys_from_meta},
        "tokens": state.tokens,
        "windows": state.windows,
        "batches": state.batches,
        "documents": meta.get("corpus_stats", {}).get("documents_used"),
        "corpus_stats": meta.get("corpus_stats"),
        **{key: meta.get(key) for key in settings},
        # tokens per capacity group of the capacity what-if (null: version 1, per batch)
        "capacity_group": state.capacity_group or None,
        "state_version": state.version,
        "moe_layers": state.layers,
        "num_experts": state.num_experts,
        "top_k": state.top_k,
        "domains": state.domains,
        "shard": meta.get("shard"),
        # how the model ran: whole / stream (bytes read, passes) / device_map, torchrun ranks
        "execution": meta.get("execution"),
        "layers": layers,
        "timings": {
            **({"load_seconds": meta["load_seconds"]} if "load_seconds" in meta else {}),
            **timings,
            "tokens_per_second": rate,
        },
        "files": files,
    }


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` (last: its ``complete`` flag marks the directory finished)."""
    write_json_atomic(folder / SUMMARY, summary, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        f = float(value)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class TraceDir:
    """A complete trace directory, read by :func:`read_trace_dir`.

    The tables are derived from :attr:`state` on first use (they equal the CSV files).
    Columns the trace ``lacks`` (imported routing, or a model whose expert outputs could
    not be observed) are NaN, so consumers can refuse rather than score zeros.

    Attributes:
        path: the directory.
        state: the raw sums (``state.npz``).
        summary: ``summary.json``.
    """

    path: Path
    state: TraceState
    summary: dict[str, Any]

    @property
    def model(self) -> str | None:
        """The model reference the trace was recorded on."""
        value = self.summary.get("model")
        return str(value) if value is not None else None

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer."""
        return self.state.num_experts

    @property
    def top_k(self) -> int:
        """Experts per token."""
        return self.state.top_k

    @property
    def layers(self) -> list[int]:
        """MoE layer indices (decoder layer numbers, as in the checkpoint), sorted."""
        return sorted(self.state.layers)

    @property
    def lacks(self) -> list[str]:
        """What the trace could not record (``gate_weights``, ``out_norms``, ``domains``)."""
        return [str(v) for v in self.summary.get("lacks") or []]

    @cached_property
    def expert_load(self) -> pd.DataFrame:
        """``expert_load.csv`` as a DataFrame (:data:`EXPERT_LOAD_COLUMNS`)."""
        frame = expert_load(self.state)
        if "gate_weights" in self.lacks:
            frame["weight_sum"] = np.nan
        if "out_norms" in self.lacks:
            frame[["out_norm_sum", "weighted_out_norm_sum"]] = np.nan
        return frame

    @cached_property
    def domain_load(self) -> pd.DataFrame | None:
        """``domain_load.csv`` as a DataFrame, or ``None`` when the corpus had no domains."""
        if not self.state.domains:
            return None
        frame = domain_load(self.state)
        if "gate_weights" in self.lacks:
            frame["weight_sum"] = np.nan
        return frame

    @cached_property
    def coactivation(self) -> pd.DataFrame:
        """``coactivation.csv`` as a DataFrame (:data:`COACTIVATION_COLUMNS`)."""
        return coactivation(self.state)

    @cached_property
    def capacity(self) -> pd.DataFrame:
        """``capacity.csv`` as a DataFrame (:data:`CAPACITY_COLUMNS`)."""
        return capacity(self.state)


def read_trace_dir(trace_dir: str | Path) -> TraceDir:
    """Read a complete trace directory (the one loader: report, merge, prune, similarity).

    Args:
        trace_dir: a directory written by ``moescope trace`` or ``moescope merge``.

    Returns:
        A :class:`TraceDir`.

    Raises:
        TraceError: the directory is missing, is not a trace, is incomplete (interrupted),
            or its ``summary.json`` or ``state.npz`` is unreadable or inconsistent; the
            message names the file.
    """
    folder = Path(trace_dir).expanduser()
    if not folder.is_dir():
        raise TraceError(
            f"{folder}: no such trace directory; create one with `moescope trace MODEL CORPUS --out {folder}`."
        )
    summary = _read_summary(folder)
    state = TraceState.load(folder / STATE)
    _check_agrees(folder / SUMMARY, summary, state)
    return TraceDir(path=folder, state=state, summary=summary)


def load_trace(trace_dir: str | Path) -> tuple[TraceState, dict[str, Any]]:
    """``(state, summary)`` of a complete trace directory (:func:`read_trace_dir`, unpacked)."""
    trace = read_trace_dir(trace_dir)
    return trace.state, trace.summary


def _read_summary(folder: Path) -> dict[str, Any]:
    path = folder / SUMMARY
    if not path.exists():
        raise TraceError(f"{folder}: no {SUMMARY}, so the trace is incomplete (interrupted?); {_RETRACE}.")
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: malformed JSON ({exc}); {_RETRACE}.") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot read it ({exc.strerror or exc}).") from None
    if not isinstance(summary, dict):
        raise TraceError(f"{path}: expected a JSON object, found {type(summary).__name__}; {_RETRACE}.")
    kind = summary.get("kind", KIND)
    if kind != KIND:
        raise TraceError(f"{path}: this is a moescope {kind} output, not a trace; pass a trace directory.")
    if summary.get("complete") is not True:
        raise TraceError(f"{folder}: {SUMMARY} is not marked complete; {_RETRACE}.")
    return summary


def _check_agrees(path: Path, summary: dict[str, Any], state: TraceState) -> None:
    """The summary's model shape must be the state's (one was edited or copied over)."""
    recorded: Sequence[tuple[str, Any]] = (
        ("moe_layers", state.layers),
        ("num_experts", state.num_experts),
        ("top_k", state.top_k),
    )
    for key, want in recorded:
        if key in summary and summary[key] != want:
            raise TraceError(
                f"{path}: {key} is {summary[key]!r} but {STATE} says {want!r}; the files do not "
                f"belong together, {_RETRACE}."
            )
