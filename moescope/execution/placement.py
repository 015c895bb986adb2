"""Read a decoder layer's stored tensors straight into its parameters' final layout.

What: the streamer's fast path for loading a layer. transformers' conversion turns
Mixtral's per-expert ``experts.N.w1/w3`` into a fused ``experts.gate_up_proj`` by reading
each tensor, stacking the experts (one copy) and concatenating gate and up (another copy),
into freshly allocated memory that the kernel must fault in and zero. For a layer that
is three passes over its bytes plus page faults, and during the concatenation the layer
is held two or three times. :class:`Placer` computes where each stored tensor lands in
the final parameter and ``preadv``\\ s its bytes there directly: one copy, and into memory
recycled from the layer released before (no page faults after the first layers), so
a layer is held once.

How:

- The plan comes from transformers' own rules: each key is renamed with the model's
  conversion mapping (``rename_source_key``, the function ``from_pretrained`` uses); a
  key that converts is placed only when the converter's operations are ones whose result
  is a plain placement of whole tensors: ``MergeModulelist(dim=0)`` (stack the experts),
  optionally followed by ``Concatenate(dim=c)`` with ``c >= 1``, or a ``Concatenate``
  alone. Everything else (quantised checkpoints, interleaving, chunking, dtype tricks,
  a key that renames to no parameter) falls back to transformers' conversion for the
  whole layer.
- Every plan shape (layer kind: a dense first layer, a MoE layer) is verified once: the
  first layer of that kind is loaded by transformers' conversion as before, and every
  stored tensor must equal the region the plan puts it in, in the loaded parameters
  (and their shapes and dtypes the plan's). A plan that differs is never used (that
  layer kind stays on transformers' path).
- Released layers give their tensors back to a pool (by shape and dtype), taken by the
  next layer's placement; a tensor is pooled only when nothing else holds its storage
  (a view kept by a caller, a numpy array), so recycled memory is never memory in use.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Placer", "pread_into"]

# "…layers.7.…" -> "…layers.#.…": one plan shape per layer kind
_INDEX_RE = re.compile(r"\.\d+\.")


@dataclass(frozen=True)
class _Copy:
    """One stored tensor's destination: ``target[index].narrow(dim, offset, size)``."""

    key: str
    target: str
    index: int | None  # the expert slot (stacked dim 0), None when not stacked
    dim: int | None  # the concatenation dim of the (indexed) region, None when whole
    offset: int
    size: int

    def region(self, tensor: Any) -> Any:
        """The view of ``tensor`` (the whole target) that this stored tensor fills."""
        if self.index is not None:
            tensor = tensor[self.index]
        if self.dim is not None:
            tensor = tensor.narrow(self.dim, self.offset, self.size)
        return tensor


@dataclass
class _Plan:
    copies: list[_Copy]
    #: target name -> (shape, torch dtype)
    targets: dict[str, tuple[tuple[int, ...], Any]]
    shape: tuple[str, ...]  # the layer kind: targets with layer indices blanked


def _use_count(t: Any) -> int:
    import torch

    return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))


class Placer:
    """Plans and performs the direct placement of decoder-layer tensors (see the module doc).

    Args:
        model: the streamed skeleton, before any layer is loaded (its state dict is meta).
        weight_mapping: the model's conversion mapping (``get_model_conversion_mapping``).
        where, files, nbytes: the checkpoint index (:class:`moescope.execution.stream._Shards`).
        st_dtypes: safetensors dtype name -> torch dtype name, for the dtypes read directly.
    """

    def __init__(
        self,
        model: Any,
        weight_mapping: Sequence[Any],
        where: dict[str, tuple[int, str, tuple[int, ...]]],
        files: dict[str, Path],
        nbytes: dict[str, int],
        st_dtypes: dict[str, str],
    ) -> None:
        import torch
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        self.model = model
        self.renamings = [e for e in weight_mapping if isinstance(e, WeightRenaming)]
        self.converters = [e for e in weight_mapping if isinstance(e, WeightConverter)]
        self.by_pattern = {p: c for c in self.converters for p in c.source_patterns}
        self.meta = dict(model.state_dict())
        self.prefix = model.base_model_prefix
        self.where, self.files, self.nbytes, self.st_dtypes = where, files, nbytes, st_dtypes
        self.verified: set[tuple[str, ...]] = set()
        self.rejected: set[tuple[str, ...]] = set()
        self.pool: dict[tuple[tuple[int, ...], Any], list[Any]] = {}
        self.lock = threading.Lock()
        #: layers placed directly, and tensors taken from the pool rather than allocated
        self.placed = 0
        self.recycled = 0
        # what a tensor that alone holds its storage reports (the query itself holds one)
        self._sole = _use_count(torch.empty(1))

    # -- planning ------------------------------------------------------------------------------
    def plan(self, keys: Sequence[str]) -> _Plan | None:
        """Where each of ``keys`` lands, or None when the layer needs transformers' conversion."""
        from transformers.core_model_loading import (
            Concatenate,
            MergeModulelist,
            dot_natural_key,
            rename_source_key,
        )

        # target -> pattern -> keys in transformers' order (natural key order)
        groups: dict[str, dict[str | None, list[str]]] = {}
        converter_of: dict[str, Any] = {}
        import torch

        for key in sorted(keys, key=dot_natural_key):
            if not hasattr(torch, self.st_dtypes.get(self.where[key][1], "")):
                return None  # a dtype torch cannot view bytes as
            renamed, pattern = rename_source_key(key, self.renamings, self.converters, self.prefix, self.meta)
            if renamed not in self.meta and key in self.meta:
                renamed, pattern = key, None
            if renamed not in self.meta:
                return None  # unexpected key: transformers' path records it
            groups.setdefault(renamed, {}).setdefault(pattern, []).append(key)
            if pattern is not None:
                converter_of[renamed] = self.by_pattern[pattern]
        copies: list[_Copy] = []
        targets: dict[str, tuple[tuple[int, ...], Any]] = {}
        for target, by_pattern in groups.items():
            ref = self.meta[target]
            shape = tuple(int(s) for s in ref.shape)
            targets[target] = (shape, ref.dtype)
            if target not in converter_of:
                alone = by_pattern.get(None, [])
                if len(alone) != 1 or self.where[alone[0]][2] != shape:
                    return None  # a renamed tensor fills its parameter, alone
                key = alone[0]
                copies.append(_Copy(key, target, None, None, 0, 0))
                continue
            conv = converter_of[target]
            ops = list(conv.operations)
            if getattr(conv, "quantization_operation", None) is not None or None in by_pattern:
                return None
            stacked = bool(ops) and type(ops[0]) is MergeModulelist and ops[0].dim == 0
            rest = ops[1:] if stacked else ops
            cat = None
            if rest:
                if len(rest) != 1 or type(rest[0]) is not Concatenate:
                    return None
                cat = int(rest[0].dim) - (1 if stacked else 0)  # the dim within one expert's slice
                if cat < 0:
                    return None
            elif not stacked or len(by_pattern) != 1:
                return None
            region = shape[1:] if stacked else shape
            offset = 0
            for pattern in conv.source_patterns:  # Concatenate's order: the converter's patterns
                pkeys = by_pattern.get(pattern)
                if not pkeys:
                    continue
                if stacked and len(pkeys) != shape[0]:
                    return None
                if not stacked and len(pkeys) != 1:
                    return None
                src = self.where[pkeys[0]][2]
                size = src[cat] if cat is not None and cat < len(src) else 0
                want = list(region)
                if cat is not None:
                    if cat >= len(region):
                        return None
                    want[cat] = size
                for slot, key in enumerate(pkeys):
                    if self.where[key][2] != tuple(want):
                        return None
                    copies.append(
                        _Copy(
                            key,
                            target,
                            slot if stacked else None,
                            cat,
                            offset,
                            size if cat is not None else 0,
                        )
                    )
                offset += size
            if cat is not None and offset != region[cat]:
                return None
        kind = tuple(sorted(_INDEX_RE.sub(".#.", t) for t in targets))
        return _Plan(copies, targets, kind)

    # -- placing -------------------------------------------------------------------------------
    def _take(self, shape: tuple[int, ...], dtype: Any) -> Any:
        import torch

        with self.lock:
            free = self.pool.get((shape, dtype))
            if free:
                self.recycled += 1
                return free.pop()
        return torch.empty(shape, dtype=dtype)

    def fill(self, plan: _Plan) -> dict[str, Any]:
        """The layer's tensors by target name, read from the checkpoint files into their places."""
        import torch

        out = {name: self._take(shape, dt) for name, (shape, dt) in plan.targets.items()}
        fds: dict[Path, int] = {}
        try:
            for c in plan.copies:
                region = c.region(out[c.target])
                offset, st_dtype, shape = self.where[c.key]
                src_dt = getattr(torch, self.st_dtypes[st_dtype])
                path = self.files[c.key]
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY)
                if src_dt == region.dtype and region.is_contiguous():
                    pread_into(fds[path], region, offset, self.nbytes[c.key], path, c.key)
                else:  # a cast or a strided region: read, then copy (the copy casts as .to does)
                    buf = torch.empty(shape, dtype=src_dt)
                    pread_into(fds[path], buf, offset, self.nbytes[c.key], path, c.key)
                    region.copy_(buf)
        finally:
            for fd in fds.values():
                os.close(fd)
        with self.lock:
            self.pool.clear()  # what this layer did not take is another kind's: let it go
        return out

    def _tensor(self, name: str) -> Any:
        """The model's parameter or buffer ``name`` (None when it has none)."""
        path, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(path) if path else self.model, attr, None)

    def install(self, tensors: dict[str, Any]) -> None:
        """Set ``tensors`` as the model's parameters (or buffers), as ``set_param_for_module`` does."""
        import torch

        for name, value in tensors.items():
            path, _, attr = name.rpartition(".")
            module = self.model.get_submodule(path) if path else self.model
            if attr in module._buffers:
                setattr(module, attr, value)
            else:
                param = torch.nn.Parameter(value, requires_grad=value.is_floating_point())
                param._is_hf_initialized = True  # type: ignore[attr-defined]
                setattr(module, attr, param)

    def verify(self, plan: _Plan, state: dict[str, Any]) -> bool:
        """Whether the model's loaded layer (transformers' conversion of ``state``) is ``plan`` placed.

        Each stored tensor is compared with the region the plan puts it in, in the loaded
        parameter itself (no third copy of the layer); the plan covers every element of a
        target by construction (all experts stacked, concatenated sizes summing up).
        """
        import torch

        for name, (shape, dt) in plan.targets.items():
            got = self._tensor(name)
            if got is None or got.device.type == "meta" or got.dtype != dt or tuple(got.shape) != shape:
                return False
        for c in plan.copies:
            region = c.region(self._tensor(c.target).detach())
            if not torch.equal(region, state[c.key].to(region.dtype)):
                return False
        return True

    def drop_pool(self) -> None:
        """Let the pooled tensors go (at the end of a pass: the next one starts afresh)."""
        with self.lock:
            self.pool.clear()

    def recycle(self, module: Any) -> None:
        """Put ``module`` back on meta, pooling its tensors that nothing else holds."""
        tensors = [t.detach() for t in (*module.parameters(), *module.buffers()) if t.device.type == "cpu"]
        module.to("meta")
        with self.lock:
            for t in tensors:
                if (
                    t.is_contiguous()
                    and t.storage_offset() == 0
                    and t.untyped_storage().nbytes() == t.numel() * t.element_size()
                    and _use_count(t) <= self._sole
                ):
                    self.pool.setdefault((tuple(t.shape), t.dtype), []).append(t)
        del tensors


def pread_into(fd: int, region: Any, offset: int, n: int, path: Path, key: str) -> None:
    """``os.preadv`` ``n`` bytes at ``offset`` into the contiguous tensor ``region`` (no GIL held)."""
    import torch

    from moescope.errors import CheckpointError

    if region.numel() * region.element_size() != n:
        raise CheckpointError(f"{path}: {key} holds {n} bytes, its parameter needs {region.nbytes}.")
    if not n:
        return
    view = region.view(-1).view(torch.uint8).numpy().data
    done = 0
    while done < n:  # preadv may return short counts on large reads
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CheckpointError(f"{path}: truncated while reading {key}.")
        done += got
