"""``import_routes``: routing recorded elsewhere → an ordinary trace directory.

What: :func:`import_routes` reads ``sglang-dump``, ``sglang-response`` or ``ids`` files
(:mod:`moescope.importers.sglang`, :mod:`moescope.importers.ids`), takes the routing shape
from ``--model`` (header-only), reduces the routing with the trace's own reducer and
writes the directory with :func:`moescope.tracing.write_trace_dir` through
:func:`moescope.outdir.atomic_output`. ``summary.json`` records ``source`` (the format)
and ``lacks`` (what the source does not carry); ``expert_load.csv`` counts equal the input.

How: streamed sources (responses, ids) are packed into ``seq_len`` windows and
``batch_size``-window batches as ``moescope trace`` packs its corpus, so the per-batch
what-ifs (capacity, expert-parallel) are those of a trace with the same settings; SGLang
per-token dumps keep their forward passes as batches. SGLang ``stat`` dumps hold counts
only: the state is filled from them directly and every per-token statistic is listed in
``lacks``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moescope import __version__
from moescope.importers import common as c
from moescope.importers.common import ModelShape, Piece, RouteSink, RoutingImportError

#: the formats :func:`import_routes` reads
FORMATS = ("sglang-dump", "sglang-response", "ids", "vllm")

#: ``lacks`` of an SGLang ``stat`` dump: counts only
STAT_LACKS = (
    c.LACKS_GATE_WEIGHTS,
    c.LACKS_OUT_NORMS,
    c.LACKS_DOMAINS,
    c.LACKS_TOKEN_ORDER,
    c.LACKS_PER_TOKEN,
    c.LACKS_COACTIVATION,
    c.LACKS_CAPACITY,
    c.LACKS_EXPERT_PARALLEL,
)


@dataclass
class ImportResult:
    """What an import wrote.

    Attributes:
        out_dir: the trace directory.
        format: the import format.
        files: the files read.
        mode: ``per_token``, ``stat``, ``responses``, ``parquet``, ``npy`` (or several, joined by ``+``).
        tokens: tokens imported.
        records: forward passes (dumps), responses, or files (ids) imported.
        documents: documents (token-ordered segments), or None when token order is unknown.
        duplicates: dump records skipped as copies held by another tensor-parallel rank.
        lacks: what the source does not carry (``summary.json`` ``lacks``).
        layers / num_experts / top_k: the routing shape taken from the model.
        seconds: wall time of reading and reducing.
        notes: facts worth telling the user (printed on stderr by the CLI).
        summary: the ``summary.json`` written.
    """

    out_dir: Path
    format: str
    files: list[str]
    mode: str
    tokens: int
    records: int
    documents: int | None
    duplicates: int
    lacks: list[str]
    layers: list[int]
    num_experts: int
    top_k: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (paths as strings)."""
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


@dataclass
class _Run:
    """Counters of one import, filled by the format readers."""

    shape: ModelShape
    sink: RouteSink | None
    modes: list[str] = field(default_factory=list)
    records: int = 0
    duplicates: int = 0
    lacks: set[str] = field(default_factory=set)
    ordered: bool = False
    notes: list[str] = field(default_factory=list)
    routes: Any = None  # importers.routes_out.ImportRoutes with save_routes

    def stream(self, piece: Piece) -> None:
        """Feed one piece to the sink (and keep it for ``routes/``)."""
        assert self.sink is not None
        self.sink.stream(piece)
        if self.routes is not None:
            self.routes.add(piece)


def _dumps(files: Sequence[Path]) -> Iterator[tuple[Path, dict[str, Any], str]]:
    from moescope.importers.sglang import dump_mode, load_dump

    for path in files:
        data = load_dump(path)
        yield path, data, dump_mode(data, path)


def _import_dump(run: _Run, files: Sequence[Path], state: Any) -> None:
    from moescope.importers.sglang import DumpStats, read_dump, stat_counts

    loaded = list(_dumps(files[:1]))
    mode = loaded[0][2]
    rest = _dumps(files[1:])

    def same_mode() -> Iterator[tuple[Path, dict[str, Any]]]:
        for path, data, m in [*loaded, *rest]:
            if m != mode:
                raise RoutingImportError(
                    f"{path} is a {m} dump but {files[0]} is {mode}; import each mode on its own."
                )
            yield path, data

    run.modes.append(mode)
    if mode == "stat":
        counts, tokens, steps = stat_counts(list(same_mode()), run.shape)
        state.counts += counts
        state.tokens += tokens
        state.batches += steps
        run.records += steps
        run.lacks.update(STAT_LACKS)
        run.notes.append(
            "stat dumps hold counts only: load, imbalance and dead experts are known; co-activation, "
            "reuse, capacity and expert-parallel what-ifs are not (record with per_token mode for them)"
        )
        return
    assert run.sink is not None
    stats = DumpStats()
    for piece in read_dump(same_mode(), run.shape, stats):
        run.sink.batch(piece)
    run.records += stats.records
    run.duplicates += stats.duplicates
    run.ordered = stats.ordered_tokens > 0
    if stats.duplicates:
        run.notes.append(
            f"{stats.duplicates} record(s) skipped: the same forward pass recorded by another "
            "tensor-parallel rank (counted once)"
        )
    run.lacks.update((c.LACKS_GATE_WEIGHTS, c.LACKS_OUT_NORMS, c.LACKS_DOMAINS))


def _import_responses(run: _Run, files: Sequence[Path]) -> None:
    from moescope.importers.sglang import read_responses

    assert run.sink is not None
    run.modes.append("responses")
    for piece in read_responses(files, run.shape):
        run.records += 1
        run.stream(piece)
    run.ordered = True
    run.lacks.update((c.LACKS_GATE_WEIGHTS, c.LACKS_OUT_NORMS))


def _import_vllm(run: _Run, files: Sequence[Path]) -> None:
    from moescope.importers.vllm import read_vllm

    run.modes.append("requests")
    for piece in read_vllm(files, run.shape):
        run.records += 1
        run.stream(piece)
    run.ordered = True
    run.lacks.update((c.LACKS_GATE_WEIGHTS, c.LACKS_OUT_NORMS))


def _import_ids(run: _Run, files: Sequence[Path]) -> None:
    from moescope.importers.ids import file_kind, read_npy, read_parquet

    assert run.sink is not None
    run.lacks.add(c.LACKS_OUT_NORMS)
    for path in files:
        kind = file_kind(path)
        if kind not in run.modes:
            run.modes.append(kind)
        if kind == "npy":
            piece, present = read_npy(path, run.shape), set[str]()
        else:
            piece, present = read_parquet(path, run.shape)
        if "weight" not in present:
            run.lacks.add(c.LACKS_GATE_WEIGHTS)
        run.ordered |= piece.segments is not None
        run.records += 1
        run.stream(piece)


def _meta(
    shape: ModelShape, fmt: str, files: Sequence[Path], seq_len: int | None, batch_size: int | None
) -> dict[str, Any]:
    return {
        "model": shape.ref,
        "model_type": shape.model_type,
        "hidden_size": shape.hidden_size,
        "dtype": shape.dtype,
        "fingerprint": shape.fingerprint,
        "corpus": [str(p) for p in files],
        "split": None,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "max_tokens": None,
        "packing": f"imported ({fmt})",
        "shard": {"index": 0, "count": 1},
        "moescope_version": __version__,
        "run_id": uuid.uuid4().hex,
        "source": fmt,
    }


def import_routes(
    format: str,
    paths: str | Path | Sequence[str | Path],
    *,
    model: str,
    out: str | Path,
    revision: str | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    plots: bool = True,
    progress: Callable[[int], None] | None = None,
    save_routes: bool = False,
) -> ImportResult:
    """Write a trace directory from routing recorded elsewhere (counts equal to the input).

    Args:
        format: ``sglang-dump``, ``sglang-response`` or ``ids`` (see :mod:`moescope.importers`).
        paths: the recorded files (several SGLang ranks or dumps are combined); one path
            alone (a ``str`` or ``Path``) is one file.
        model: the model the routing was recorded on (hub id, directory, config file): its
            MoE layers, expert count and top-k are read from the config, never the weights.
        out: trace directory to write (an old trace there is replaced, atomically).
        revision: hub revision of ``model``.
        seq_len / batch_size: packing of streamed formats (responses, ids) into the batches
            of the capacity and expert-parallel what-ifs, as ``moescope trace`` packs (None:
            trace's default window for this model, 512 or its context when shorter).
        plots: draw ``plots/*.png``.
        progress: called with the tokens imported so far.
        save_routes: also write ``routes/`` (per-token routing in order, for ``moescope
            offload``) when the source has token order (:mod:`moescope.importers.routes_out`).

    Returns:
        An :class:`ImportResult`.

    Raises:
        RoutingImportError: unknown format, bad or unsafe input, routing that does not fit
            the model; OutputError: ``out`` is refused; NotMoEError, ConfigError,
            ModelNotFoundError: ``model`` is unusable.
    """
    from moescope.importers.common import check_paths, model_shape
    from moescope.outdir import atomic_output, check_destination
    from moescope.tracedir.files import KIND
    from moescope.tracedir.state import TraceState
    from moescope.tracing.write import write_trace_dir

    if format not in FORMATS:
        raise RoutingImportError(f"unknown import format {format!r}; use one of {', '.join(FORMATS)}.")
    if (seq_len is not None and seq_len < 1) or batch_size < 1:
        raise RoutingImportError("seq_len and batch_size must be at least 1.")
    files = check_paths([paths] if isinstance(paths, str | os.PathLike) else paths)
    shape = model_shape(model, revision)
    if seq_len is None:
        seq_len = shape.seq_len
    inputs: list[str | Path] = [*files, *([shape.local_path] if shape.local_path else [])]
    check_destination(out, KIND, inputs=inputs)
    t0 = time.perf_counter()
    streamed = format != "sglang-dump"
    state = TraceState(
        list(shape.moe_layers),
        shape.num_experts,
        shape.top_k,
        meta=_meta(shape, format, files, seq_len if streamed else None, batch_size if streamed else None),
    )
    sink = RouteSink(state, seq_len=seq_len, batch_size=batch_size, progress=progress)
    run = _Run(shape, sink)
    if save_routes and streamed:
        from moescope.importers.routes_out import ImportRoutes

        run.routes = ImportRoutes(list(shape.moe_layers), shape.top_k, seq_len)
    if format == "sglang-dump":
        _import_dump(run, files, state)
    elif format == "sglang-response":
        _import_responses(run, files)
    elif format == "vllm":
        _import_vllm(run, files)
    else:
        _import_ids(run, files)
    sink.close()
    if state.tokens == 0:
        raise RoutingImportError(
            f"{files[0]}{' ...' if len(files) > 1 else ''}: no routed token in the input; pass a recording "
            "made while the model served requests."
        )
    if not run.ordered:
        run.lacks.add(c.LACKS_TOKEN_ORDER)
    if not state.domains:
        run.lacks.add(c.LACKS_DOMAINS)
    ordered = c.LACKS_TOKEN_ORDER not in run.lacks
    state.meta.update(
        lacks=sorted(run.lacks),
        corpus_fingerprint=sink.fingerprint if run.modes != ["stat"] else None,
        corpus_stats={"documents_used": sink.documents if ordered else None, "stream_tokens": state.tokens},
        execution=None,
        imported={
            "format": format,
            "mode": "+".join(run.modes),
            "files": [str(p) for p in files],
            "records": run.records,
            "duplicates": run.duplicates,
        },
    )
    seconds = time.perf_counter() - t0
    if save_routes and (run.routes is None or run.routes.unordered):
        run.notes.append(
            "routes/ not written: the source has no token order (sglang-dump, or ids without doc)"
        )
    with atomic_output(out, KIND, inputs=inputs) as tmp:
        if run.routes is not None:
            run.routes.write(tmp)
        summary = write_trace_dir(tmp, state, timings={"import_seconds": seconds}, plots=plots)
    return ImportResult(
        out_dir=Path(out),
        format=format,
        files=[str(p) for p in files],
        mode="+".join(run.modes),
        tokens=state.tokens,
        records=run.records,
        documents=sink.documents if ordered else None,
        duplicates=run.duplicates,
        lacks=sorted(run.lacks),
        layers=list(state.layers),
        num_experts=state.num_experts,
        top_k=state.top_k,
        seconds=seconds,
        notes=run.notes,
        summary=summary,
    )
