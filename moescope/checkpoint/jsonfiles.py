"""The JSON files beside the weights: configs and the safetensors index, read with one-line
errors, and the shard paths an index lists, kept inside the checkpoint.

:func:`load_json` reads a config or an index (size-capped; ``fast=True`` parses with orjson,
see :func:`fast_loads`); :func:`index_shards` lists the shards a
``model.safetensors.index.json`` names, each checked by :func:`safe_child`. The safetensors
headers themselves are :mod:`moescope.checkpoint.header`'s.

Imports nothing from moescope but :mod:`moescope.errors` and :mod:`moescope.arch.inventory`.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

try:  # 1.5x faster than json on headers; any input it refuses goes to json (see _fast_loads)
    from orjson import loads as _orjson_loads
except ImportError:  # pragma: no cover - orjson is a dependency; a platform without a wheel
    _orjson_loads = None  # type: ignore[assignment]

from moescope.arch.inventory import gc_paused
from moescope.errors import CheckpointError, ConfigError, MoescopeError

__all__ = [
    "INDEX_NAME",
    "MAX_JSON_BYTES",
    "SINGLE_NAME",
    "fast_loads",
    "index_shards",
    "load_json",
    "safe_child",
]

#: the index of a sharded checkpoint, and the single-file name, as save_pretrained writes them
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def fast_loads(raw: bytes | str) -> Any:
    """orjson's parse of ``raw``, or None where only :mod:`json` can say what it is.

    On valid JSON the two agree except for integers beyond 64 bits, which orjson reads as
    floats: in a header those fail the entry checks, and every caller then re-reads with
    :mod:`json` (so errors are word for word the same); in ``__metadata__``, which moescope
    only carries along, such a number stays a float. Anything orjson refuses (NaN, a
    lone surrogate, a byte-order mark, malformed text) is left to :mod:`json` to accept or
    describe.
    """
    if _orjson_loads is None:
        return None
    try:
        return _orjson_loads(raw)
    except ValueError:  # orjson.JSONDecodeError
        return None


def safe_child(root: Path, relpath: Any, what: str) -> Path:
    """``root / relpath`` if it stays inside ``root``; else a :class:`CheckpointError`.

    For paths that a file lists (an index's shard names): refuses anything but a non-empty
    relative path string, absolute paths (POSIX or Windows style), ``..`` components, NUL
    bytes, and symlinks that resolve outside ``root``. Inside a Hugging Face cache snapshot
    (``.../models--org--name/snapshots/REV``) files are symlinks into the repo's ``blobs/``
    folder, so there the repo folder is the boundary.

    Args:
        root: the checkpoint directory.
        relpath: the path as listed (any JSON value; only a string can pass).
        what: who lists it, for the message, e.g. ``"ckpt/model.safetensors.index.json: shard of
            tensor 'lm_head.weight'"``.

    Returns:
        ``root / relpath`` (not resolved).

    Raises:
        CheckpointError: the path is not a string, or leaves ``root``.
    """
    fix = f"list a file inside {root} (fix the file that lists it)"
    if not isinstance(relpath, str) or not relpath or "\x00" in relpath:
        raise CheckpointError(f"{what} is {json.dumps(relpath, default=repr)[:80]}, not a file name; {fix}.")
    posix, win = PurePosixPath(relpath), PureWindowsPath(relpath)
    if posix.is_absolute() or win.is_absolute() or win.drive or relpath.startswith(("/", "\\")):
        raise CheckpointError(f"{what} is the absolute path {relpath!r}; {fix}.")
    if ".." in posix.parts or ".." in win.parts:
        raise CheckpointError(f"{what} is {relpath!r}, which climbs out with '..'; {fix}.")
    child = root / posix
    try:
        base = root.resolve()
        if base.parent.name == "snapshots" and base.parent.parent.name.startswith(
            ("models--", "datasets--", "spaces--")
        ):
            base = base.parent.parent
        target = child.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise CheckpointError(f"{what} is {relpath!r}, which cannot be resolved ({exc}); {fix}.") from None
    if target != base and base not in target.parents:
        raise CheckpointError(f"{what} is {relpath!r}, a link to {target} outside the checkpoint; {fix}.")
    return child


#: a config or index file larger than this is not one (a Kimi-K2 index is ~10 MB)
MAX_JSON_BYTES = 256 * 1024 * 1024


def load_json(
    path: Path, what: str = "config", error: type[MoescopeError] = ConfigError, fast: bool = False
) -> dict[str, Any]:
    """Load a JSON object, with a one-line error naming the file on failure.

    Args:
        path: the file.
        what: what it should be, for the message (``config``, ``safetensors index``).
        error: the error type to raise (:class:`ConfigError`, or :class:`CheckpointError` for
            an index).
        fast: try orjson first (see :func:`fast_loads`; numbers beyond 64 bits become
            floats): for a large index, whose numbers moescope does not use.

    Raises:
        ConfigError (or ``error``): unreadable, too large, not UTF-8, malformed JSON (also
            nesting too deep or integers too long for Python), or not a JSON object.
    """
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise error(
                f"{path}: {path.stat().st_size:,} bytes is too large for a {what} file; pass the right file."
            )
        data = fast_loads(path.read_bytes()) if fast else None
        if type(data) is not dict:
            data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(
            f"{path}: malformed JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); fix the {what} file."
        ) from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a UTF-8 text file; pass a JSON {what} file.") from None
    except (ValueError, RecursionError) as exc:  # integers over Python's digit limit, deep nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else "a number with too many digits"
        raise error(f"{path}: malformed JSON ({reason}); fix the {what} file.") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} file ({exc.strerror or exc}).") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}; fix the {what} file.")
    return data


def index_shards(root: Path, index: Path) -> list[str]:
    """The shard files a ``model.safetensors.index.json`` lists, each checked to stay in ``root``.

    Returns:
        Shard paths relative to ``root`` (POSIX form, ``./`` dropped, each once), sorted.

    Raises:
        CheckpointError: malformed index, no ``weight_map``, or a shard path that is not a
            relative path inside ``root`` (see :func:`safe_child`).
    """
    with gc_paused():  # a Kimi-K2 index maps 139k names: 280k strings, no cycles
        idx = load_json(index, "safetensors index", CheckpointError, fast=True)
    wm = idx.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index}: has no weight_map; re-save the checkpoint with save_pretrained.")
    try:
        # ~100k tensors but a few dozen shards: check each distinct path once
        distinct = set(wm.values())
        if all(isinstance(rel, str) for rel in distinct):
            for rel in distinct:
                safe_child(root, rel, f"{index}: shard {rel!r}")
            return sorted({PurePosixPath(rel).as_posix() for rel in distinct})
    except (TypeError, CheckpointError):  # an unhashable or bad entry: find the first, by tensor
        pass
    checked: dict[Any, str] = {}
    for name, rel in wm.items():  # ~100k tensors but a few dozen shards: check each path once
        key = rel if isinstance(rel, str) else repr(rel)
        if key not in checked:
            safe_child(root, rel, f"{index}: the shard of tensor {name[:80]!r}")
            checked[key] = PurePosixPath(rel).as_posix()
    return sorted(set(checked.values()))
