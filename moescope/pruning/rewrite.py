"""Rewrite stage: stream a safetensors checkpoint, slicing dimension 0 of chosen tensors.

Family-agnostic: the caller says, per output shard, which tensors to write and for each
the byte ranges of the source that make it up (:class:`OutTensor`): a whole tensor, a
renamed one, or the kept slabs of dimension 0 (``[E, ...]`` experts, packed ``[E*I, H]``
rows, router rows and biases all keep contiguous byte ranges per expert). The format is an
8-byte header length, a JSON header and raw bytes, so :func:`write_safetensors` copies byte
ranges file-to-file with a bounded buffer (the kernel's ``copy_file_range`` when available):
peak memory stays far below one tensor, whatever the dtype (bf16, FP8, MXFP4 blocks).

:func:`rewrite_shards` writes every shard into a directory (the caller's temporary one),
re-opens each with ``safetensors.safe_open`` to check names and shapes, and writes
``model.safetensors.index.json`` when the source had one or there are several shards.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moescope.errors import CheckpointError
from moescope.outdir import write_json_atomic

_COPY_CHUNK = 64 * 2**20
INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype -> item size, used only to order tensors for alignment.
_ITEMSIZE = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
}


@dataclass(frozen=True)
class OutTensor:
    """One output tensor: its header entry and the source byte ranges that make it up.

    Attributes:
        name: output name.
        dtype: safetensors dtype (unchanged from the source).
        shape: output shape.
        ranges: ``(absolute offset, length)`` in the source file, in order.
        source: the file the ranges are in, when not the shard's own source (merged
            experts are computed into a scratch file, :mod:`moescope.pruning.merge`).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]
    source: Path | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        return sum(n for _, n in self.ranges)

    @classmethod
    def whole(cls, info: Any, name: str | None = None) -> OutTensor:
        """``info`` copied unchanged (under ``name`` when given)."""
        return cls(name or info.name, info.dtype, info.shape, ((info.offset, info.nbytes),))

    @classmethod
    def rows(cls, info: Any, groups: int, kept: Sequence[int]) -> OutTensor:
        """The ``kept`` of ``groups`` equal slabs of dimension 0 of ``info``, in order."""
        shape = (info.shape[0] // groups * len(kept), *info.shape[1:])
        return cls(info.name, info.dtype, shape, row_ranges(info, groups, kept))


def row_ranges(info: Any, groups: int, kept: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Byte ranges of the kept slabs when dim 0 splits into ``groups`` equal slabs.

    Args:
        info: a tensor with ``name``, ``start`` (absolute offset) and ``nbytes``.
        groups: equal slabs dimension 0 splits into (the expert count).
        kept: slab indices to keep, in output order (adjacent ones are merged).

    Raises:
        CheckpointError: the tensor's bytes do not split into ``groups``.
    """
    if info.nbytes % groups or (info.shape and info.shape[0] % groups):
        raise CheckpointError(f"{info.name}: {info.nbytes} bytes do not split into {groups} experts.")
    slab = info.nbytes // groups
    merged: list[list[int]] = []
    for j in kept:
        start = info.offset + j * slab
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1][1] += slab
        else:
            merged.append([start, slab])
    return tuple((s, n) for s, n in merged)


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` of fd ``src`` to the current position of fd ``dst``."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < length:
        n = min(_COPY_CHUNK, length - done)
        if use_kernel:
            try:
                got = os.copy_file_range(src, dst, n, offset + done)
            except OSError:
                use_kernel = False
                continue
            if got == 0:
                raise CheckpointError("unexpected end of a source shard while copying; it is truncated.")
        else:
            data = os.pread(src, n, offset + done)
            if not data:
                raise CheckpointError("unexpected end of a source shard while copying; it is truncated.")
            got = os.write(dst, data)
        done += got


def write_safetensors(
    path: Path, tensors: Sequence[OutTensor], metadata: dict[str, str] | None, source: Path
) -> int:
    """Stream a safetensors file from byte ranges of ``source``; returns bytes of tensor data.

    A tensor with its own :attr:`OutTensor.source` is copied from that file instead.

    Tensors are ordered by item size (largest first), then name, so every tensor stays
    aligned to its item size, as safetensors' own writer does.
    """
    ordered = sorted(tensors, key=lambda t: (-_ITEMSIZE.get(t.dtype, 1), t.name))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for t in ordered:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    fds: dict[Path | None, int] = {None: os.open(source, os.O_RDONLY)}
    try:
        for t in ordered:
            if t.source is not None and t.source not in fds:
                fds[t.source] = os.open(t.source, os.O_RDONLY)
        dst = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(dst, struct.pack("<Q", len(blob)) + blob)
            for t in ordered:
                for start, length in t.ranges:
                    _copy_range(fds[t.source], dst, start, length)
        finally:
            os.close(dst)
    finally:
        for fd in fds.values():
            os.close(fd)
    return offset


def validate_shard(path: Path, tensors: Sequence[OutTensor]) -> None:
    """Re-open a written shard with safetensors and check its names and shapes.

    Raises:
        CheckpointError: the shard does not read back, or differs from ``tensors``.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            keys = set(fh.keys())
            for t in tensors:
                if tuple(fh.get_slice(t.name).get_shape()) != t.shape:
                    raise CheckpointError(f"{path.name}: {t.name} was written with the wrong shape.")
    except (OSError, RuntimeError, Exception) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path.name}: written shard does not read back ({exc}).") from exc
    if keys != {t.name for t in tensors}:
        raise CheckpointError(f"{path.name}: written shard has the wrong tensor names.")


def rewrite_shards(
    source: Path,
    shards: Sequence[str],
    per_shard: dict[str, list[OutTensor]],
    dest: Path,
    *,
    metadata: dict[str, dict[str, str]] | None = None,
    indexed: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[str, str], int]:
    """Write the planned tensors of every shard of ``source`` into ``dest``, same shard names.

    Args:
        source: the source checkpoint directory.
        shards: its shard file names, in order.
        per_shard: shard name -> output tensors (shards left empty are not written).
        dest: the directory to write into (an existing, private temporary one).
        metadata: per-shard ``__metadata__`` to carry over.
        indexed: write ``model.safetensors.index.json`` even for a single shard.
        progress: called as ``progress(shard, done, total)`` after each shard.

    Returns:
        ``(weight_map, bytes_out)``: tensor name -> shard, and tensor bytes written.

    Raises:
        CheckpointError: a source shard is truncated or a written one does not read back.
    """
    weight_map: dict[str, str] = {}
    bytes_out = 0
    written = [s for s in shards if per_shard.get(s)]
    for i, shard in enumerate(written):
        tensors = per_shard[shard]
        bytes_out += write_safetensors(dest / shard, tensors, (metadata or {}).get(shard), source / shard)
        validate_shard(dest / shard, tensors)
        weight_map.update({t.name: shard for t in tensors})
        if progress:
            progress(shard, i + 1, len(written))
    if indexed or len(written) > 1:
        index = {"metadata": {"total_size": bytes_out}, "weight_map": dict(sorted(weight_map.items()))}
        write_json_atomic(dest / INDEX_NAME, index)
    return weight_map, bytes_out
