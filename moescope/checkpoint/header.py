"""The one validated reader of safetensors headers.

A safetensors file starts with an 8-byte little-endian header length, then a JSON header
mapping tensor names to dtype, shape and byte offsets; that header is all moescope reads
(the weights are never touched). Every entry is checked before anything uses it — a known
dtype, a shape of non-negative whole numbers, data offsets inside the file whose span equals
the shape's byte size, no two tensors sharing bytes — so :func:`read_safetensors_header`'s
offsets can be seeked to safely and :func:`parse_header`'s sizes can be summed. Errors name
the file and the tensor.

Readers: :func:`parse_header` (header bytes, e.g. fetched by HTTP range reads),
:func:`read_local_header` (one local file, as :class:`~moescope.arch.inventory.TensorInfo`),
:func:`read_safetensors_header` (the validated header dict with the data start, for writers
that copy tensor bytes). :mod:`moescope.checkpoint.shards` reads many shards' headers with them; the
index that lists the shards, and configs, are :mod:`moescope.checkpoint.jsonfiles`'.

Imports nothing from moescope but :mod:`moescope.errors`, :mod:`moescope.arch.inventory` and
:mod:`moescope.checkpoint.jsonfiles`.
"""

from __future__ import annotations

import json
import struct
from itertools import chain
from pathlib import Path
from typing import Any

from moescope.arch.inventory import DTYPE_BITS, Inventory, TensorInfo, gc_paused
from moescope.checkpoint.jsonfiles import fast_loads
from moescope.errors import CheckpointError

__all__ = [
    "DTYPE_BITS",
    "DTYPE_NAMES",
    "MAX_HEADER_BYTES",
    "parse_header",
    "read_local_header",
    "read_raw_header",
    "read_safetensors_header",
]

#: a header longer than this is not a safetensors header (a Kimi-K2 shard's is ~300 KB)
MAX_HEADER_BYTES = 100_000_000

#: each dtype name as one str object (names parsed from JSON are new objects each time)
DTYPE_NAMES = {name: name for name in DTYPE_BITS}

#: a shape dimension is a u64 in safetensors; no real tensor holds 2^63 elements
_MAX_NUMEL = 1 << 63
_CORRUPT = "the file is corrupt — download it again"


def _bad(file: str, name: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{file}: tensor {name!r} {problem}; {_CORRUPT}.")


def _diagnose(label: str, name: str, entry: Any, data_len: int | None) -> CheckpointError:
    """The precise error for a header entry that failed the fast checks in :func:`_check_entries`."""
    if type(entry) is not dict:
        return _bad(label, name, "has a header entry that is not a JSON object")
    if "dtype" not in entry:
        return _bad(label, name, "has no dtype")
    dtype = entry["dtype"]
    if type(dtype) is not str or dtype not in DTYPE_BITS:
        return CheckpointError(
            f"{label}: tensor {name!r} has unknown dtype {str(dtype)[:40]!r} (safetensors defines "
            f"{', '.join(DTYPE_BITS)}); the file is corrupt or from a newer format."
        )
    shape = entry.get("shape")
    if type(shape) is not list:
        return _bad(label, name, f"has shape {str(shape)[:40]!r}, not a list of dimensions")
    numel = 1
    for d in shape:
        if type(d) is not int or not 0 <= d <= _MAX_NUMEL:
            return _bad(label, name, f"has a bad dimension {str(d)[:40]!r} in its shape")
        numel *= d
    if numel > _MAX_NUMEL:
        return _bad(label, name, "has a shape of more than 2^63 elements")
    offsets = entry.get("data_offsets")
    if type(offsets) is not list or len(offsets) != 2:
        return _bad(label, name, "has no [start, end] data_offsets")
    start, end = offsets
    if type(start) is not int or type(end) is not int or start < 0 or end < start:
        return _bad(label, name, f"has impossible data_offsets [{str(start)[:24]}, {str(end)[:24]}]")
    if data_len is not None and end > data_len:
        return CheckpointError(
            f"{label}: tensor {name!r} ends at byte {end} but the file holds only {data_len} data "
            "bytes; the file is truncated — download it again."
        )
    nbits = numel * DTYPE_BITS[dtype]
    size = f"{nbits // 8:,}" if nbits % 8 == 0 else f"{nbits / 8:,.1f}"
    return _bad(
        label,
        name,
        f"has shape {shape} of {dtype} ({numel:,} elements, {size} bytes) but its data "
        f"offsets span {end - start:,} bytes",
    )


def _check_entries(
    header: dict[str, Any], label: str, data_len: int | None, file: str | None = None, data_start: int = 0
) -> Inventory:
    """Validate every tensor entry of a parsed header and list the tensors.

    Checks, per tensor: a known dtype, a shape of non-negative whole numbers, two whole-number
    data offsets ``0 <= start <= end`` inside the data section, and ``numel x bits ==
    8 x (end - start)`` (sub-byte dtypes must fill whole bytes); then that no two tensors
    share bytes. ``__metadata__`` must be a JSON object.

    Cost: one pass of a few comparisons per tensor. A shard holds thousands of tensors but a
    few dozen (dtype, shape) pairs, so each pair's byte size is worked out (and its dimensions
    checked) once, and its tensors share one shape tuple; that every dimension is a whole
    number, not ``1.0`` or ``true`` (which equal 1 as dictionary keys), is checked for all
    shapes as written at once after the pass. At the
    first sign of trouble the header goes through :func:`_check_entries_exact`, which finds
    the first bad entry and says precisely what is wrong with it. Entries are usually stored
    in offset order, which the pass confirms; otherwise they are sorted once (O(n log n)) to
    look for overlaps.
    """
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    dtypes: list[str | None] = []
    sizes: list[int] = []
    offsets: list[int | None] = []
    add_name, add_shape, add_dtype, add_size = names.append, shapes.append, dtypes.append, sizes.append
    add_offset = offsets.append
    metadata: dict[str, dict[str, Any]] = {}
    tensor_file = label if file is None else file
    # (dtype, shape) -> (bytes, dtype, shape): one object each, shared by every tensor of that
    # dtype and shape (later passes compare dtypes by identity; fewer objects to make and free)
    known: dict[tuple[str, tuple[Any, ...]], tuple[int, str, tuple[int, ...]]] = {}
    as_written: list[tuple[Any, ...]] = []  # each entry's own dimensions, for the type check
    add_written = as_written.append
    limit = _MAX_NUMEL if data_len is None else data_len
    prev_end = 0
    in_order = True
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not isinstance(entry, dict):
                raise CheckpointError(f"{label}: __metadata__ is not a JSON object; {_CORRUPT}.")
            if entry:
                metadata[tensor_file] = entry
            continue
        try:
            shape = entry["shape"]
            start, end = entry["data_offsets"]
            dtype = entry["dtype"]
            dims = tuple(shape)
            size = known.get((dtype, dims))
        except (KeyError, TypeError, ValueError):
            return _check_entries_exact(header, label, data_len, file, data_start)
        if size is None:  # a (dtype, shape) pair not seen yet in this header
            nbytes = _entry_bytes(entry)
            if nbytes is None:
                return _check_entries_exact(header, label, data_len, file, data_start)
            size = known[dtype, dims] = nbytes, DTYPE_NAMES[dtype], dims
        add_written(dims)
        nbytes, dtype, dims = size
        if (
            type(shape) is not list
            or type(start) is not int
            or type(end) is not int
            or not 0 <= start <= end <= limit
            or end - start != nbytes
        ):
            return _check_entries_exact(header, label, data_len, file, data_start)
        add_name(name)
        add_shape(dims)
        add_dtype(dtype)
        add_size(nbytes)
        add_offset(data_start + start)
        if end != start:  # empty tensors occupy no bytes
            if start >= prev_end:
                prev_end = end
            else:
                in_order = False
    # every dimension a whole number: 1.0 and true hash like 1, so the size cache let them by
    if set(map(type, chain.from_iterable(as_written))) - {int}:
        return _check_entries_exact(header, label, data_len, file, data_start)
    if not in_order:
        _check_overlaps(header, label)
    files: list[str | None] = [tensor_file] * len(names)
    return Inventory.from_columns(names, shapes, dtypes, sizes, files, offsets, metadata)


def _entry_bytes(entry: Any) -> int | None:
    """Bytes of a header entry's (dtype, shape), every dimension checked; None if invalid."""
    try:
        bits = DTYPE_BITS[entry["dtype"]]
        shape = entry["shape"]
    except (KeyError, TypeError):
        return None
    if type(shape) is not list:
        return None
    numel = 1
    for d in shape:
        if type(d) is not int or not 0 <= d <= _MAX_NUMEL:
            return None
        numel *= d
    # numel x bits == 8 x nbytes also rules out sub-byte tensors that end mid-byte
    if numel > _MAX_NUMEL or (numel * bits) % 8:
        return None
    return numel * bits // 8


def _check_entries_exact(
    header: dict[str, Any], label: str, data_len: int | None, file: str | None = None, data_start: int = 0
) -> Inventory:
    """The checks of :func:`_check_entries`, one entry at a time in header order, with the
    precise error for the first entry that fails (by :func:`_diagnose`).

    The fast path hands over to this one when anything looks wrong, so every header gets the
    same first error whichever path found it.
    """
    out: list[TensorInfo] = []
    append = out.append
    make = tuple.__new__  # TensorInfo(...) without the Python-level __new__: ~20 ms per 100k tensors
    bits_of = DTYPE_BITS
    max_numel = _MAX_NUMEL
    tensor_file = label if file is None else file
    limit = max_numel if data_len is None else data_len
    prev_end = 0
    in_order = True
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not isinstance(entry, dict):
                raise CheckpointError(f"{label}: __metadata__ is not a JSON object; {_CORRUPT}.")
            continue
        try:
            shape = entry["shape"]
            start, end = entry["data_offsets"]
            dtype = entry["dtype"]
            bits = bits_of[dtype]
        except (KeyError, TypeError, ValueError):
            raise _diagnose(label, name, entry, data_len) from None
        if type(shape) is not list or type(start) is not int or type(end) is not int:
            raise _diagnose(label, name, entry, data_len)
        numel = 1
        for d in shape:
            if type(d) is not int or not 0 <= d <= max_numel:
                raise _diagnose(label, name, entry, data_len)
            numel *= d
        # numel x bits == 8 x nbytes also rules out sub-byte tensors that end mid-byte
        if not 0 <= start <= end <= limit or numel * bits != 8 * (end - start) or numel > max_numel:
            raise _diagnose(label, name, entry, data_len)
        append(make(TensorInfo, (name, tuple(shape), dtype, end - start, tensor_file, data_start + start)))
        if end != start:  # empty tensors occupy no bytes
            if start >= prev_end:
                prev_end = end
            else:
                in_order = False
    if not in_order:
        _check_overlaps(header, label)
    inv = Inventory(out)
    meta = header.get("__metadata__")
    if meta:
        inv.metadata[tensor_file] = meta
    return inv


def _check_overlaps(header: dict[str, Any], label: str) -> None:
    """No two tensors share bytes (entries already validated, not in offset order)."""
    spans = sorted(
        (e["data_offsets"][0], e["data_offsets"][1], n)
        for n, e in header.items()
        if n != "__metadata__" and e["data_offsets"][0] != e["data_offsets"][1]
    )
    prev_end, prev_name = 0, ""
    for start, end, name in spans:
        if start < prev_end:
            raise CheckpointError(
                f"{label}: tensors {prev_name!r} and {name!r} overlap (bytes {start}-{min(end, prev_end)} "
                f"belong to both); {_CORRUPT}."
            )
        prev_end, prev_name = end, name


def _decode_header(raw: bytes, label: str, fast: bool = True) -> dict[str, Any]:
    header = fast_loads(raw) if fast else None
    if type(header) is dict:
        return header
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and Python's limit on digits in an integer
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{label}: the safetensors header is not valid JSON ({reason}); {_CORRUPT}."
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{label}: the safetensors header is not a JSON object; {_CORRUPT}.")
    return header


def _checked(
    raw: bytes, label: str, data_len: int | None, file: str | None, data_start: int
) -> tuple[dict[str, Any], Inventory]:
    """Decode and check a header: (the header, its tensors). A header that fails is decoded
    again by :mod:`json`, so the error is the one :mod:`json`'s reading gives (see
    :func:`moescope.checkpoint.jsonfiles.fast_loads`)."""
    header = _decode_header(raw, label)
    try:
        return header, _check_entries(header, label, data_len, file, data_start)
    except CheckpointError:
        header = _decode_header(raw, label, fast=False)
        return header, _check_entries(header, label, data_len, file, data_start)


def parse_header(raw: bytes, file: str, file_size: int | None, label: str | None = None) -> Inventory:
    """Parse and validate a safetensors JSON header into tensors.

    Args:
        raw: the header bytes (after the 8-byte length).
        file: the shard name recorded in each :class:`TensorInfo`.
        file_size: the whole file's size in bytes, or None when unknown (offsets then go
            unchecked against it).
        label: how errors name the file (default ``file``).

    Raises:
        CheckpointError: malformed JSON, an entry with an unknown dtype, a bad shape or
            offsets, a size that does not match its shape, overlapping tensors, or offsets
            past the end of the file. The message names the file and the tensor.
    """
    label = label or file
    data_len = None if file_size is None else file_size - 8 - len(raw)
    with gc_paused():
        return _checked(raw, label, data_len, file, 8 + len(raw))[1]


def read_raw_header(path: Path) -> tuple[bytes, int]:
    """(header bytes, file size) of a local safetensors file, the length checked."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: {size} bytes is too short for a safetensors file (truncated); download it again."
                )
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(
                    f"{path}: header length {n} is larger than the file ({size} bytes); the file is "
                    "truncated or not safetensors — download it again."
                )
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: header length {n} is over {MAX_HEADER_BYTES:,} bytes; the file is not "
                    "safetensors or is corrupt — download it again."
                )
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc}); check the file.") from None
    if len(raw) < n:
        raise CheckpointError(f"{path}: the header is cut short (the file changed while reading).")
    return raw, size


def read_local_header(path: Path) -> tuple[Inventory, int]:
    """Read and validate one local safetensors header. Returns (tensors, header bytes read).

    Raises:
        CheckpointError: truncated file, impossible header length, malformed header (see
            :func:`parse_header`).
    """
    raw, size = read_raw_header(path)
    return parse_header(raw, path.name, size, label=str(path)), len(raw) + 8


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """Return ``(data_start, header)`` of a local safetensors file, validated, without the data.

    ``data_start`` is the absolute byte offset where tensor data begins (8 + header length);
    ``header`` is the JSON header as a dict (``__metadata__`` included when present). Every
    tensor entry has been checked as in :func:`parse_header`: a known dtype (see
    :data:`DTYPE_BITS`), a ``shape`` list of non-negative ints, ``data_offsets`` ``[start,
    end]`` inside the file with ``end - start`` equal to the shape's byte size, and no two
    tensors overlapping — so ``data_start + start`` can be seeked to and ``end - start``
    bytes read safely.

    Raises:
        CheckpointError: naming the file (and tensor) for any of the problems above.
    """
    raw, size = read_raw_header(path)
    with gc_paused():
        header, _ = _checked(raw, str(path), size - 8 - len(raw), path.name, 0)
    return 8 + len(raw), header
