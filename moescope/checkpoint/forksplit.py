"""Split CPU-bound work between this process and one forked child: both cores, no pool.

Reading a 62-shard, 139k-tensor checkpoint's headers is ~0.2 s of JSON parsing and checking
per entry, all under the GIL, so threads cannot share it. A forked child can: it inherits the
bytes already read (copy-on-write), works through the second half of the items while this
process does the first, and sends its results back through a pipe as :mod:`marshal` data
(plain lists, strings and numbers; ~10 ms for 70k tensors — nothing is unpickled). The child
never returns into the caller's code: it leaves with :func:`os._exit`, so no ``atexit`` hook,
buffered output or temporary file of the parent is touched twice.

It is used only where it is safe and pays: on Linux, with two CPUs available to this process,
no other Python thread running (forking a threaded process can copy a lock mid-use; a notebook
kernel therefore gets the one-process path), and enough work (``weights`` over ``min_weight``).
Anything unexpected in the child — a crash, a signal, an unreadable reply — makes this process
do the child's half itself, so the result never depends on the split. ``MOESCOPE_NO_FORK=1``
turns it off.

Errors keep their order: items are in order, the parent has the earlier half, and the child
stops at its first expected error, so the error raised is the one a one-process loop would
raise first.
"""

from __future__ import annotations

import marshal
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["can_fork", "split_map"]

T = TypeVar("T")
R = TypeVar("R")


def can_fork() -> bool:
    """Whether :func:`split_map` may fork here (see the module docstring)."""
    if sys.platform != "linux" or not hasattr(os, "fork") or os.environ.get("MOESCOPE_NO_FORK"):
        return False
    if threading.active_count() != 1:
        return False
    try:
        return len(os.sched_getaffinity(0)) >= 2
    except OSError:
        return False


#: the child's extra cost per unit of work: sending its results back (marshal, the pipe) and
#: their decoding here, ~15% of parsing them (Kimi-K2 headers); the child gets that much less
CHILD_OVERHEAD = 0.15


def _cut(weights: Sequence[int], child_overhead: float = CHILD_OVERHEAD) -> int:
    """The index splitting ``weights`` so that this process's part (the first) and the child's
    part with its overhead take about as long; both parts non-empty."""
    total = sum(weights)
    # first part ~ (1 + overhead) x second part
    target = total * (1 + child_overhead) / (2 + child_overhead)
    acc = 0
    for i, w in enumerate(weights):
        if acc + w / 2 >= target:
            return min(max(i, 1), len(weights) - 1)
        acc += w
    return len(weights) - 1


def split_map(
    items: Sequence[T],
    work: Callable[[T], R],
    *,
    weights: Sequence[int],
    min_weight: int,
    encode: Callable[[R], Any],
    decode: Callable[[Any], R],
    expected: type[Exception] | None = None,
) -> list[R]:
    """``[work(x) for x in items]``, the later half computed in a forked child when it pays.

    Args:
        items: the work, in order.
        work: what to do with one item; may raise ``expected``.
        weights: a cost estimate per item (e.g. bytes to parse), to split the halves evenly.
        min_weight: below this total the work runs in this process alone.
        encode: a result as :mod:`marshal`-able data (lists, tuples, str, int, dicts).
        decode: the inverse of ``encode``.
        expected: the error type ``work`` raises for bad input; the child reports it by
            message and it is raised here as ``expected(message)``, in item order. Any other
            error in the child makes this process redo the child's half (and raise it itself).
    """
    if len(items) < 2 or sum(weights) < min_weight or not can_fork():
        return [work(x) for x in items]
    cut = _cut(weights)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its half, one reply, gone
        status = 1
        try:
            os.close(read_fd)
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends it at once
            reply: list[tuple[str, Any]] = []
            for x in items[cut:]:
                try:
                    reply.append(("ok", encode(work(x))))
                except Exception as exc:
                    if expected is None or not isinstance(exc, expected):
                        raise
                    reply.append(("error", str(exc)))
                    break
            with os.fdopen(write_fd, "wb") as fh:
                fh.write(marshal.dumps(reply))
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    reply_bytes = b""
    try:
        mine = [work(x) for x in items[:cut]]  # an error here is the first one: raised as is
        with os.fdopen(read_fd, "rb") as fh:
            read_fd = -1
            reply_bytes = fh.read()
    finally:
        if read_fd >= 0:  # leaving early: stop the child
            os.close(read_fd)
            _kill(pid)
        _, status = os.waitpid(pid, 0)
    return mine + _child_results(items[cut:], work, reply_bytes, status, decode, expected)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass


def _child_results(
    items: Sequence[T],
    work: Callable[[T], R],
    reply_bytes: bytes,
    status: int,
    decode: Callable[[Any], R],
    expected: type[Exception] | None = None,
) -> list[R]:
    """The child's results, or this process's own when the child did not finish cleanly."""
    try:
        reply = marshal.loads(reply_bytes) if os.waitstatus_to_exitcode(status) == 0 else None
    except (EOFError, ValueError, TypeError):
        reply = None
    if not isinstance(reply, list) or not reply or len(reply) > len(items):
        return [work(x) for x in items]
    out: list[R] = []
    for kind, value in reply:
        if kind == "error" and expected is not None:
            raise expected(value)
        out.append(decode(value))
    if len(out) != len(items):  # an incomplete reply without an error: do the rest here
        out.extend(work(x) for x in items[len(out) :])
    return out
