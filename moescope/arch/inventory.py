"""The tensor inventory: one :class:`TensorInfo` per stored (or config-derived) tensor.

:class:`Inventory` is the list of them a checkpoint has, stored by column.
Every stage that looks at a checkpoint's tensors without loading them speaks these types:
the safetensors header reader (:mod:`moescope.checkpoint.header`) produces it, the
closed-form and spec inventories (:mod:`moescope.arch.closedform`, :mod:`moescope.arch.specfile`) build
it from a config, :mod:`moescope.checkpoint.ref` collects it per model reference, and
:mod:`moescope.accounting.params` accounts it. This module is a leaf: it imports nothing from moescope,
so every one of them imports it downward.

Also here: the bits per element of every safetensors dtype (:data:`DTYPE_BITS`) and
:func:`gc_paused`, which the readers use around the ~100k short-lived objects a large header
produces (the cyclic garbage collector would otherwise rescan them many times over).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from math import prod
from typing import Any, NamedTuple, overload

__all__ = ["DTYPE_BITS", "Inventory", "TensorInfo", "as_inventory", "gc_paused", "total_numel"]

#: bits per element of every dtype safetensors defines (0.8: 22 of them). F4 packs two
#: elements per byte and the F6 types four per three bytes: a tensor of those must fill whole
#: bytes, as safetensors itself requires.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


class TensorInfo(NamedTuple):
    """One tensor of a checkpoint (or of a config-derived inventory).

    A NamedTuple rather than a dataclass: checkpoints hold ~100k tensors and this is
    built once per tensor.

    Attributes:
        name: tensor name.
        shape: tensor shape.
        dtype: safetensors dtype string (``BF16``, ``F8_E4M3``, ``U8``...); ``None`` from configs.
        nbytes: bytes as stored (0 for config-derived inventories).
        file: the shard file that holds it, relative to the checkpoint (``None`` for
            config-derived inventories).
        offset: where its bytes start in that file, counted from the file's first byte (8 +
            header length + its ``data_offsets[0]``): seek there and read ``nbytes``. ``None``
            for config-derived inventories.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str | None = None
    nbytes: int = 0
    file: str | None = None
    offset: int | None = None

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        return prod(self.shape)


class Inventory(Sequence[TensorInfo]):
    """A checkpoint's tensors in header order (shard by shard), or a config-derived list.

    It behaves as a read-only list of :class:`TensorInfo` (``len``, indexing, slicing,
    iteration, ``==`` with a list) that builders can ``append`` to and ``extend``, but it
    keeps its data as columns: :attr:`names`, :attr:`shapes` (tuples), :attr:`dtypes`,
    :attr:`nbytes`, :attr:`files` and :attr:`offsets`. A 139k-tensor checkpoint would
    otherwise cost 139k records built and freed per read; the per-tensor passes (header
    checks, classification, sums) read the columns, and a :class:`TensorInfo` is made only
    when one is asked for. :attr:`metadata` maps each shard file to its header's
    ``__metadata__`` object (shards without one are absent).
    """

    __slots__ = ("dtypes", "files", "metadata", "names", "nbytes", "offsets", "shapes")

    def __init__(self, tensors: Iterable[TensorInfo] = ()) -> None:
        self.names: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.dtypes: list[str | None] = []
        self.nbytes: list[int] = []
        self.files: list[str | None] = []
        self.offsets: list[int | None] = []
        self.metadata: dict[str, dict[str, Any]] = {}
        self.extend(tensors)

    @classmethod
    def from_columns(
        cls,
        names: list[str],
        shapes: list[tuple[int, ...]],
        dtypes: list[str | None],
        nbytes: list[int],
        files: list[str | None],
        offsets: list[int | None] | None = None,
        metadata: dict[str, dict[str, Any]] | None = None,
    ) -> Inventory:
        """An inventory over these columns (taken, not copied; all of one length).

        Raises:
            ValueError: the columns differ in length.
        """
        if offsets is None:
            offsets = [None] * len(names)
        if not len(names) == len(shapes) == len(dtypes) == len(nbytes) == len(files) == len(offsets):
            raise ValueError("inventory columns differ in length")
        inv = cls.__new__(cls)
        inv.names, inv.shapes, inv.dtypes, inv.nbytes, inv.files = names, shapes, dtypes, nbytes, files
        inv.offsets, inv.metadata = offsets, metadata if metadata is not None else {}
        return inv

    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, i: int) -> TensorInfo: ...

    @overload
    def __getitem__(self, i: slice) -> Inventory: ...

    def __getitem__(self, i: int | slice) -> TensorInfo | Inventory:
        if isinstance(i, slice):
            return Inventory.from_columns(
                self.names[i], self.shapes[i], self.dtypes[i], self.nbytes[i], self.files[i], self.offsets[i]
            )
        return TensorInfo(
            self.names[i], self.shapes[i], self.dtypes[i], self.nbytes[i], self.files[i], self.offsets[i]
        )

    def __iter__(self) -> Iterator[TensorInfo]:
        columns = (self.names, self.shapes, self.dtypes, self.nbytes, self.files, self.offsets)
        return map(TensorInfo._make, zip(*columns, strict=True))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (Inventory, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable, like a list

    def __repr__(self) -> str:
        head = ", ".join(repr(t) for t in self[:3])
        more = f", ... ({len(self)} tensors)" if len(self) > 3 else ""
        return f"Inventory([{head}{more}])"

    def append(self, t: TensorInfo) -> None:
        """Add one tensor at the end."""
        self.names.append(t.name)
        self.shapes.append(tuple(t.shape))
        self.dtypes.append(t.dtype)
        self.nbytes.append(t.nbytes)
        self.files.append(t.file)
        self.offsets.append(t.offset)

    def extend(self, tensors: Iterable[TensorInfo]) -> None:
        """Add tensors at the end (another inventory's columns, and metadata, at C speed)."""
        if isinstance(tensors, Inventory):
            self.names.extend(tensors.names)
            self.shapes.extend(tensors.shapes)
            self.dtypes.extend(tensors.dtypes)
            self.nbytes.extend(tensors.nbytes)
            self.files.extend(tensors.files)
            self.offsets.extend(tensors.offsets)
            self.metadata.update(tensors.metadata)
            return
        for t in tensors:
            self.append(t)

    def by_name(self) -> dict[str, TensorInfo]:
        """name -> :class:`TensorInfo` (for writers that look tensors up by name)."""
        return {t.name: t for t in self}


def as_inventory(tensors: Iterable[TensorInfo]) -> Inventory:
    """``tensors`` as an :class:`Inventory` (itself when it already is one)."""
    return tensors if isinstance(tensors, Inventory) else Inventory(tensors)


def total_numel(tensors: Iterable[TensorInfo]) -> int:
    """Elements over all tensors (stored elements: MXFP4 blocks count as bytes here)."""
    if isinstance(tensors, Inventory):
        return sum(map(prod, tensors.shapes))
    return sum(prod(t.shape) for t in tensors)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a block that allocates many acyclic objects.

    Parsing a 139k-tensor header set allocates ~1M dicts, lists and tuples, none of them in a
    reference cycle; with the collector on, each young-generation pass rescans the growing
    heap and the parse takes twice as long. Reference counting still frees everything; the
    collector's previous state is restored on exit (nesting is fine).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
