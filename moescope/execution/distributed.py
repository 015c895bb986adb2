"""Several processes or machines through ``torch.distributed`` (``torchrun``).

Under ``torchrun --nproc-per-node N -m moescope trace …`` every process reads the same
corpus stream and runs its share of the batches (batch ``b`` on rank ``b mod N``, the same
split as ``--shard``); the raw sums are then added with ``all_reduce`` (gloo on CPU, nccl
on GPU) and rank 0 writes the one output directory. Integer sums are exact, so the result
equals a single-process run of the same corpus.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) with several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` when not launched."""
    if not launched():
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def local_device(device: str) -> str:
    """One GPU per process: ``cuda`` becomes ``cuda:$LOCAL_RANK`` under a launcher."""
    if launched() and device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


@contextlib.contextmanager
def process_group(device: str) -> Iterator[tuple[int, int]]:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA) for the block.

    Yields:
        ``(rank, world_size)``; ``(0, 1)`` without a launcher (nothing initialised).
    """
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        yield rank_world()
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def all_reduce_sum(arrays: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """Element-wise sums of int64 numpy arrays over all ranks (exact), returned as numpy."""
    import numpy as np
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return arrays
    dev = torch.device(device if device.startswith("cuda") else "cpu")
    out: dict[str, Any] = {}
    for name, arr in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64)).to(dev)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out[name] = t.cpu().numpy()
    return out


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order); None on the other ranks."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    rank, world = dist.get_rank(), dist.get_world_size()
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the error that stopped rank 0)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
