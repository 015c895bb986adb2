"""The notebook API: one function per command, each returning a dataclass with ``.to_dict()``.

What: ``import moescope`` exposes ``params``, ``trace``, ``load_trace``, ``report``,
``similarity``, ``prune``, ``evaluate``, ``import_routes`` and ``sweep`` (the table
:data:`moescope.API` says where each lives). Most are the library functions the CLI
calls, unchanged (``params`` is :func:`moescope.accounting.params.count_params`, ``report`` is
:func:`moescope.stats.report.build_report`). This module holds the thin wrappers for the others,
which change nothing but the call and the result's shape:

- :func:`trace` runs :func:`moescope.tracing.run_trace` with its options spelled out and
  returns a :class:`TraceRun` (``.to_dict()``, ``.load()``);
- :func:`load_trace` reads a trace directory (:func:`moescope.tracedir.files.read_trace_dir`)
  as a :class:`Trace`: ``expert_load``, ``coactivation``, ``domain_load``, ``capacity``
  DataFrames, ``summary``, ``.to_dict()``, ``.report()``;
- :func:`similarity` runs :func:`moescope.redundancy.run.similarity` writing nothing unless
  ``out`` is given, and returns a :class:`Similarity` (``pairs()``, ``layer_scores()``);
- :func:`prune` runs :func:`moescope.pruning.prune` and returns one :class:`PruneRun`
  (plan, result, ``table`` DataFrame) instead of a tuple; a dry run needs no ``out``;
- :func:`evaluate` and :func:`sweep` accept one corpus spec as a string.

How: the result classes subclass the library's dataclasses (so every field and method is
still there) and add ``to_dict``, which turns paths, numpy values, DataFrames and nested
dataclasses into JSON-ready values (:func:`jsonable`). Nothing here prints; progress is
the caller's callback, as for the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
import pandas as pd

from moescope.errors import PruneError
from moescope.evaluation.perplexity import EvalResult
from moescope.pruning.plan import PrunePlan
from moescope.pruning.write import PruneResult
from moescope.redundancy.report import SimilarityReport
from moescope.stats.report import Report, build_report
from moescope.tracedir.files import TraceDir, read_trace_dir
from moescope.tracing.run import TraceResult

if TYPE_CHECKING:
    from moescope.evaluation.sweep import SweepResult

__all__ = [
    "PruneRun",
    "Similarity",
    "Trace",
    "TraceRun",
    "evaluate",
    "jsonable",
    "load_trace",
    "prune",
    "similarity",
    "sweep",
    "trace",
]

T = TypeVar("T")


def jsonable(value: Any) -> Any:
    """``value`` as JSON-ready data: dataclasses and dicts as objects (keys as strings),
    paths as strings, numpy values as numbers and lists, DataFrames as lists of records,
    NaN and infinities as ``None``."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, pd.DataFrame):
        return [jsonable(r) for r in value.to_dict(orient="records")]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _upgrade(obj: Any, cls: type[T]) -> T:
    """``obj`` (a dataclass instance) as an instance of its subclass ``cls``, fields copied."""
    return cls(**{f.name: getattr(obj, f.name) for f in fields(obj) if f.init})


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Trace(TraceDir):
    """A trace directory loaded for analysis (:class:`moescope.tracedir.files.TraceDir`).

    DataFrames (derived from ``state.npz``, equal to the CSV files): ``expert_load``,
    ``coactivation``, ``domain_load`` (None without domains), ``capacity``. Also ``summary``
    (``summary.json``), ``layers``, ``num_experts``, ``top_k``, ``model``, ``lacks``.
    """

    def to_dict(self) -> dict[str, Any]:
        """``summary.json`` with the directory's ``path``."""
        return {"path": str(self.path), **jsonable(self.summary)}

    def report(self, *, dtype_bytes: int | None = None) -> Report:
        """Every statistic of this trace (:func:`moescope.stats.report.build_report`)."""
        return build_report(self.path, dtype_bytes=dtype_bytes)


@dataclass
class TraceRun(TraceResult):
    """What :func:`trace` wrote (:class:`moescope.tracing.TraceResult`): ``out_dir``,
    ``tokens``, ``seconds``, ``tokens_per_second``, ``layers``, ``num_experts``, ``top_k``,
    ``summary``."""

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (``summary`` is the ``summary.json`` written)."""
        return dict(jsonable(self))

    def load(self) -> Trace:
        """The trace directory written, loaded (:func:`load_trace`)."""
        return load_trace(self.out_dir)


@dataclass
class Similarity(SimilarityReport):
    """Expert similarity per layer (:class:`moescope.redundancy.run.SimilarityReport`):
    ``pairs()`` and ``layer_scores()`` DataFrames, ``layers[i].matrices`` arrays."""

    def to_dict(self) -> dict[str, Any]:
        """``model``, ``samples``, ``trace``, ``measures``, ``layers`` (per-layer scores) and
        ``pairs`` (every pair, most redundant first within each layer: ``--json``'s records)."""
        return {
            "model": self.model,
            "samples": self.samples,
            "trace": None if self.trace is None else str(self.trace),
            "measures": self.measures,
            "layers": jsonable(self.layer_scores()),
            "pairs": jsonable(self.pairs()),
        }


@dataclass(frozen=True)
class PruneRun:
    """A pruning plan and, unless it was a dry run, what was written.

    Attributes:
        plan: which experts each layer keeps, and every expert's score.
        result: the written checkpoint (None for a dry run).
    """

    plan: PrunePlan
    result: PruneResult | None

    @property
    def table(self) -> pd.DataFrame:
        """One row per (layer, expert): ``layer, expert, score, rank, action, new_expert``."""
        return pd.DataFrame(self.plan.records())

    @property
    def kept(self) -> dict[int, list[int]]:
        """Layer -> kept expert ids (old numbering)."""
        return self.plan.kept

    def to_dict(self) -> dict[str, Any]:
        """The object ``moescope prune --json`` prints: the plan, and what was written (null
        fields for a dry run)."""
        return cast(dict[str, Any], jsonable(self.plan.summary(self.result)))


# --------------------------------------------------------------------------- functions


def load_trace(trace_dir: str | Path) -> Trace:
    """Read a complete trace directory (written by ``trace``, ``merge`` or ``import``).

    Raises:
        TraceError: missing, incomplete or inconsistent directory (the message says which file).
    """
    return _upgrade(read_trace_dir(trace_dir), Trace)


def trace(
    model: str,
    corpus: str | Sequence[str],
    out: str | Path,
    *,
    max_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    save_routes: bool = False,
    plots: bool = True,
    split: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
    max_memory: str | None = None,
    stream: bool | None = None,
    device_map: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    **options: Any,
) -> TraceRun:
    """Trace ``model``'s routing over ``corpus`` into the trace directory ``out``.

    The options are ``moescope trace``'s (:func:`moescope.tracing.run_trace` documents each;
    ``**options`` passes the rest, e.g. ``plot_format``, ``shard``).

    Example:
        >>> run = trace("demo", "demo", "traces/demo", max_tokens=2000)  # doctest: +SKIP
        >>> run.load().expert_load.groupby("layer")["count"].sum()  # doctest: +SKIP
    """
    from moescope.tracing import run_trace

    result = run_trace(
        model,
        corpus,
        out,
        split=split,
        revision=revision,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        max_memory=max_memory,
        stream=stream,
        device_map=device_map,
        seq_len=seq_len,
        batch_size=batch_size,
        max_tokens=max_tokens,
        save_routes=save_routes,
        plots=plots,
        progress=progress,
        **options,
    )
    return _upgrade(result, TraceRun)


def similarity(
    model: str,
    out: str | Path | None = None,
    *,
    trace: str | Path | None = None,
    corpus: str | Sequence[str] = "demo",
    **options: Any,
) -> Similarity:
    """Expert-to-expert similarity per MoE layer (:func:`moescope.redundancy.run.similarity`).

    Args:
        model: ``demo``, a checkpoint directory or a hub id.
        out: directory for the tables and heatmaps; None writes nothing.
        trace: a trace directory of the same model, for the ``coactivation`` measure.
        corpus: corpus spec(s) whose tokens the ``outputs`` measure runs.
        **options: the library function's other options (``samples``, ``outputs``, ...).
    """
    from moescope.redundancy.run import similarity as run

    specs = [corpus] if isinstance(corpus, str) else list(corpus)
    return _upgrade(run(model, out, trace=trace, corpus=specs, **options), Similarity)


def prune(model: str, trace: str | Path, out: str | Path | None = None, **options: Any) -> PruneRun:
    """Score, plan and (unless ``dry_run=True``) write a pruned checkpoint (:func:`moescope.pruning.prune`).

    Args:
        model: ``demo``, a checkpoint directory or a hub id.
        trace: a trace directory recorded on ``model``.
        out: the new checkpoint's directory (not needed for a dry run).
        **options: ``drop``/``keep``/``ratio``, ``criterion``, ``dry_run``, ``method``, ... as
            the library function.

    Raises:
        PruneError: no ``out`` for a run that writes; and every error of the library function.
    """
    from moescope.pruning import prune as run

    if out is None and not options.get("dry_run"):
        raise PruneError("prune writes a checkpoint: pass out=DIR, or dry_run=True to plan only.")
    plan, result = run(model, trace, Path(".") if out is None else out, **options)
    return PruneRun(plan, result)


def evaluate(model: str, corpus: str | Sequence[str], **options: Any) -> EvalResult:
    """Perplexity of ``model`` on ``corpus`` (one spec or several), overall and per domain.

    :func:`moescope.evaluation.perplexity.evaluate` with its options; returns its ``EvalResult``.
    """
    from moescope.evaluation.perplexity import evaluate as run

    return run(model, [corpus] if isinstance(corpus, str) else list(corpus), **options)


def sweep(model: str, corpus: str | Sequence[str], **options: Any) -> SweepResult:
    """Perplexity and cost of ``model`` at several routing settings (:func:`moescope.evaluation.sweep.sweep`).

    ``corpus`` is one spec or several; ``**options`` are the library function's (``top_k``,
    ``top_p``, ``max_tokens``, ...).
    """
    from moescope.evaluation.sweep import sweep as run

    return run(model, [corpus] if isinstance(corpus, str) else list(corpus), **options)
