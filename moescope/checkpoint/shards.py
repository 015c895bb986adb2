"""Read the headers of a checkpoint's many shards: raw reads in threads, parsing on two cores.

A Kimi-K2 checkpoint is 62 shards and 139k tensors: 18 MB of header JSON and an 11 MB index.
The raw bytes are read by a thread pool (on a cold disk or a network file system the reads
overlap); parsing and checking them (:func:`moescope.checkpoint.header.parse_header`) holds
the GIL, so a forked child takes the later half instead (:func:`moescope.checkpoint.forksplit.split_map`).
With an index, the shards beside it are read at once and the index is parsed as one more job
of the split (:func:`read_indexed_headers`). Errors come in the one-process order whatever
the split: the index's, a missing shard's, then the first bad shard's in file order.

``then`` runs a caller's function on each shard's tensors right after they are parsed, in the
process that parsed them (``moescope params`` classifies each shard's tensors there, so that
work is split too); its result travels back as :mod:`marshal` data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from moescope.arch.inventory import Inventory
from moescope.checkpoint.forksplit import split_map
from moescope.checkpoint.header import DTYPE_NAMES, parse_header, read_raw_header
from moescope.checkpoint.jsonfiles import INDEX_NAME, index_shards
from moescope.errors import CheckpointError

__all__ = ["ShardRead", "read_indexed_headers", "read_local_headers"]

#: below this many header bytes (~25 ms of parsing) one process is as fast as two
FORK_MIN_HEADER_BYTES = 2_000_000

#: what ``then`` computes from one shard's tensors (marshal-able: lists, tuples, str, int, ...)
Then = Callable[[Inventory], Any]


class ShardRead(NamedTuple):
    """One shard's header, read and checked.

    Attributes:
        tensors: its tensors.
        header_bytes: bytes read, the 8-byte length included.
        file_size: the file's size in bytes.
        extra: what ``then`` returned for it (None without ``then``).
    """

    tensors: Inventory
    header_bytes: int
    file_size: int
    extra: Any = None


def read_local_headers(
    root: Path, files: Sequence[str], workers: int = 8, then: Then | None = None
) -> list[ShardRead]:
    """Read and validate the headers of a checkpoint's shards.

    Args:
        root: the checkpoint directory.
        files: shard paths relative to ``root`` (already checked by
            :func:`~moescope.checkpoint.jsonfiles.safe_child` or
            :func:`~moescope.checkpoint.jsonfiles.index_shards`); recorded as each tensor's ``file``.
        workers: concurrent raw reads.
        then: run on each shard's tensors after parsing (see the module docstring).

    Returns:
        Per file, in order, a :class:`ShardRead`.

    Raises:
        CheckpointError: as :func:`~moescope.checkpoint.header.read_local_header`, naming the
            first bad shard in file order.
    """
    jobs = _shard_jobs(root, files, workers, then)
    return split_map(
        jobs,
        _parse_job,
        weights=_weights(jobs, then),
        min_weight=FORK_MIN_HEADER_BYTES,
        encode=_encode_read,
        decode=_decode_read,
        expected=CheckpointError,
    )


def read_indexed_headers(
    root: Path, index: Path, workers: int = 8, then: Then | None = None
) -> tuple[list[str], list[ShardRead]]:
    """:func:`~moescope.checkpoint.jsonfiles.index_shards` then :func:`read_local_headers`, the
    index parsed beside the headers.

    The shards an index usually lists are the ``*.safetensors`` files beside it, so those are
    read at once and the index is parsed as one more job of the split; a listed shard that was
    not among them (in a subdirectory) is read afterwards, and a file the index does not list
    is dropped, whatever its header holds.

    Returns:
        (the shard files, as ``index_shards`` gives them; per file, a :class:`ShardRead`).

    Raises:
        CheckpointError: a bad index, a listed shard missing, or a bad shard.
    """
    present = sorted(p.name for p in root.glob("*.safetensors"))
    jobs = _shard_jobs(root, present, workers, then)
    try:
        index_size = index.stat().st_size
    except OSError:
        index_size = 0
    outcomes = split_map(
        [*jobs, ("index", root, index)],
        _job_outcome,
        weights=[*_weights(jobs, then), index_size * _INDEX_COST // 100],
        min_weight=FORK_MIN_HEADER_BYTES,
        encode=_encode_outcome,
        decode=_decode_outcome,
    )
    kind, files = outcomes[-1]
    if kind == "error":
        raise CheckpointError(files)
    missing = [f for f in files if not (root / f).exists()]
    if missing:
        raise CheckpointError(
            f"{root}: shard {missing[0]} listed in {INDEX_NAME} is missing; download the full checkpoint "
            "(moescope download) or pass a complete directory."
        )
    parsed = dict(zip(present, outcomes[:-1], strict=False))
    out = []
    for f in files:
        kind, value = parsed.get(f) or ("ok", _parse_job(_shard_jobs(root, [f], 1, then)[0]))
        if kind == "error":
            raise CheckpointError(value)
        out.append(value)
    return files, out


#: the cost of parsing a byte of an index, and of classifying the tensors of a header byte
#: (``params``' ``then``), in percent of parsing and checking a header byte (measured on
#: Kimi-K2: 11 ns per header byte, 4 per index byte with orjson, 5 to classify)
_INDEX_COST, _THEN_COST = 40, 45


def _weights(jobs: list[tuple[Any, ...]], then: Then | None) -> list[int]:
    """Each shard job's cost estimate, to split the work evenly (see :func:`split_map`)."""
    factor = 100 if then is None else 100 + _THEN_COST
    return [len(job[2]) * factor // 100 for job in jobs]


def _try_read(path: Path) -> tuple[bytes, int] | tuple[bytes, CheckpointError]:
    try:
        return read_raw_header(path)
    except CheckpointError as exc:
        return b"", exc


def _shard_jobs(root: Path, files: Sequence[str], workers: int, then: Then | None) -> list[tuple[Any, ...]]:
    """(file, label, raw header, size or read error, then) per shard, the raw reads in threads."""
    paths = [root / f for f in files]
    if len(paths) < 3 or workers < 2:
        raws = list(map(_try_read, paths))
    else:
        with ThreadPoolExecutor(max_workers=min(workers, len(paths))) as pool:
            raws = list(pool.map(_try_read, paths))
    # a failed read is raised when its shard's turn comes, so errors stay in file order
    return [(f, str(path), *raw, then) for f, path, raw in zip(files, paths, raws, strict=True)]


def _parse_job(job: tuple[Any, ...]) -> ShardRead:
    f, label, raw, size, then = job
    if isinstance(size, CheckpointError):
        raise size
    tensors = parse_header(raw, f, size, label=label)
    return ShardRead(tensors, len(raw) + 8, size, None if then is None else then(tensors))


def _job_outcome(job: tuple[Any, ...]) -> tuple[str, Any]:
    """("ok", ShardRead) / ("files", the index's shards) / ("error", message): never raises
    CheckpointError (which error counts is decided once the index is known)."""
    try:
        if job[0] == "index":
            return "files", index_shards(job[1], job[2])
        return "ok", _parse_job(job)
    except CheckpointError as exc:
        return "error", str(exc)


def _encode_read(read: ShardRead) -> tuple[Any, ...]:
    inv = read.tensors
    file = inv.files[0] if len(inv) else None
    columns = inv.names, inv.shapes, inv.dtypes, inv.nbytes, inv.offsets, inv.metadata, file
    return (*columns, read.header_bytes, read.file_size, read.extra)


def _decode_read(data: tuple[Any, ...]) -> ShardRead:
    names, shapes, dtypes, nbytes, offsets, metadata, file, n, size, extra = data
    dtypes = list(map(DTYPE_NAMES.__getitem__, dtypes))  # the shared dtype objects again
    inv = Inventory.from_columns(names, shapes, dtypes, nbytes, [file] * len(names), offsets, metadata)
    return ShardRead(inv, n, size, extra)


def _encode_outcome(outcome: tuple[str, Any]) -> tuple[str, Any]:
    return (outcome[0], _encode_read(outcome[1])) if outcome[0] == "ok" else outcome


def _decode_outcome(data: tuple[str, Any]) -> tuple[str, Any]:
    return (data[0], _decode_read(data[1])) if data[0] == "ok" else (data[0], data[1])
