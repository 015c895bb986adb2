"""Resolve a model reference into a config and a tensor inventory, reading headers only.

Sources, in the order they are tried:

- ``demo`` / ``demo-dense``: the models shipped inside the package;
- a local ``save_pretrained`` directory (``model.safetensors`` or sharded with
  ``model.safetensors.index.json``; a directory with only ``config.json`` is a config source);
- a single ``.safetensors`` file (with a ``config.json`` beside it, or without: then the
  accounting is by tensor names alone);
- a config file (``config.json`` or any ``.json`` holding a transformers config, or a
  moescope generic spec with ``"model_type": "moescope_spec"``);
- a hub id ``org/name`` or ``org/name@revision``: ``config.json`` and the safetensors index
  come through ``huggingface_hub`` (HF cache, ``HF_TOKEN``, ``HF_ENDPOINT``, offline mode);
  each shard's header is fetched with HTTP range reads, all shards concurrently. The weights
  are never downloaded. A snapshot already in the cache is read locally.

A safetensors file starts with an 8-byte little-endian header length, then a JSON header
mapping tensor names to dtype, shape and byte offsets; that header is all moescope reads.
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from moescope.closedform import TensorInfo
from moescope.demo import demo_model_dir
from moescope.errors import CheckpointError, ConfigError, ModelNotFoundError, MoescopeError

MAX_HEADER_BYTES = 100_000_000
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


@dataclass
class Checkpoint:
    """What a model reference resolved to.

    Attributes:
        ref: the reference as the user wrote it.
        kind: ``demo``, ``dir``, ``file``, ``config``, ``spec`` or ``hub``.
        config: the config dict, or None for a bare ``.safetensors`` file.
        tensors: tensors read from safetensors headers (empty for config sources).
        location: local path or ``org/name@revision``.
        files: safetensors files read (names relative to the checkpoint).
        file_bytes: total size of those files in bytes.
        bytes_read: header bytes actually read (hub: transferred over HTTP).
        notes: facts about how the numbers were obtained, shown to the user.
    """

    ref: str
    kind: str
    config: dict[str, Any] | None
    tensors: list[TensorInfo] = field(default_factory=list)
    location: str = ""
    files: list[str] = field(default_factory=list)
    file_bytes: int = 0
    bytes_read: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        """``safetensors`` when tensors were read from headers, else ``config``."""
        return "safetensors" if self.tensors else "config"

    @property
    def config_where(self) -> str:
        """The config's file, as error messages name it."""
        if self.kind in ("dir", "demo") and self.location:
            return str(Path(self.location) / "config.json")
        if self.kind == "file" and self.location:
            return str(Path(self.location).parent / "config.json")
        if self.kind == "hub" and self.location:
            return f"{self.location}: config.json"
        return self.location or self.ref


# ---------------------------------------------------------------------------------------
# safetensors headers
# ---------------------------------------------------------------------------------------

#: bits per element of every dtype safetensors defines (0.8: 22 of them). F4 packs two
#: elements per byte and the F6 types four per three bytes: a tensor of those must fill whole
#: bytes, as safetensors itself requires.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip

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
    header: dict[str, Any], label: str, data_len: int | None, file: str | None = None
) -> list[TensorInfo]:
    """Validate every tensor entry of a parsed header and list the tensors.

    Checks, per tensor: a known dtype, a shape of non-negative whole numbers, two whole-number
    data offsets ``0 <= start <= end`` inside the data section, and ``numel x bits ==
    8 x (end - start)`` (sub-byte dtypes must fill whole bytes); then that no two tensors
    share bytes. ``__metadata__`` must be a JSON object.

    Cost: one pass (the checks are a few comparisons per tensor, the error text is built only
    on failure by :func:`_diagnose`); entries are usually stored in offset order, which the
    pass confirms, otherwise they are sorted once (O(n log n)).
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
        append(make(TensorInfo, (name, tuple(shape), dtype, end - start, tensor_file)))
        if end != start:  # empty tensors occupy no bytes
            if start >= prev_end:
                prev_end = end
            else:
                in_order = False
    if not in_order:
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
    return out


def _decode_header(raw: bytes, label: str) -> dict[str, Any]:
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


def parse_header(raw: bytes, file: str, file_size: int | None, label: str | None = None) -> list[TensorInfo]:
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
    header = _decode_header(raw, label)
    data_len = None if file_size is None else file_size - 8 - len(raw)
    return _check_entries(header, label, data_len, file)


def _read_raw_header(path: Path) -> tuple[bytes, int]:
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


def read_local_header(path: Path) -> tuple[list[TensorInfo], int]:
    """Read and validate one local safetensors header. Returns (tensors, header bytes read).

    Raises:
        CheckpointError: truncated file, impossible header length, malformed header (see
            :func:`parse_header`).
    """
    raw, size = _read_raw_header(path)
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
    raw, size = _read_raw_header(path)
    header = _decode_header(raw, str(path))
    _check_entries(header, str(path), size - 8 - len(raw), path.name)
    return 8 + len(raw), header


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


# ---------------------------------------------------------------------------------------
# Local sources
# ---------------------------------------------------------------------------------------


#: a config or index file larger than this is not one (a Kimi-K2 index is ~10 MB)
MAX_JSON_BYTES = 256 * 1024 * 1024


def load_json(path: Path, what: str = "config", error: type[MoescopeError] = ConfigError) -> dict[str, Any]:
    """Load a JSON object, with a one-line error naming the file on failure.

    Args:
        path: the file.
        what: what it should be, for the message (``config``, ``safetensors index``).
        error: the error type to raise (:class:`ConfigError`, or :class:`CheckpointError` for
            an index).

    Raises:
        ConfigError (or ``error``): unreadable, too large, not UTF-8, malformed JSON (also
            nesting too deep or integers too long for Python), or not a JSON object.
    """
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise error(
                f"{path}: {path.stat().st_size:,} bytes is too large for a {what} file; pass the right file."
            )
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
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
    idx = load_json(index, "safetensors index", CheckpointError)
    wm = idx.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index}: has no weight_map; re-save the checkpoint with save_pretrained.")
    checked: dict[Any, str] = {}
    for name, rel in wm.items():  # ~100k tensors but a few dozen shards: check each path once
        key = rel if isinstance(rel, str) else repr(rel)
        if key not in checked:
            safe_child(root, rel, f"{index}: the shard of tensor {name[:80]!r}")
            checked[key] = PurePosixPath(rel).as_posix()
    return sorted(set(checked.values()))


def _dir_tensors(root: Path) -> tuple[list[TensorInfo], list[str], int, int]:
    index = root / _INDEX
    if index.exists():
        files = index_shards(root, index)
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    missing = [f for f in files if not (root / f).exists()]
    if missing:
        raise CheckpointError(
            f"{root}: shard {missing[0]} listed in {_INDEX} is missing; download the full checkpoint "
            "(moescope download) or pass a complete directory."
        )
    tensors: list[TensorInfo] = []
    where: dict[str, str] = {}
    read = size = 0
    for f in files:
        t, n = read_local_header(root / f)
        for ti in t:
            other = where.setdefault(ti.name, f)
            if other != f:
                raise CheckpointError(
                    f"{root}: tensor {ti.name!r} is stored in both {other} and {f}; the checkpoint is "
                    "inconsistent — download it again."
                )
        tensors.extend(t)
        read += n
        try:
            size += (root / f).stat().st_size
        except OSError as exc:
            raise CheckpointError(f"{root / f}: cannot read ({exc.strerror or exc}).") from None
    return tensors, files, size, read


def _from_dir(ref: str, root: Path, kind: str = "dir") -> Checkpoint:
    cfg_path = root / "config.json"
    has_weights = (root / _INDEX).exists() or any(root.glob("*.safetensors"))
    if not cfg_path.exists() and not has_weights:
        bins = [p.name for p in root.glob("*.bin")] + [p.name for p in root.glob("*.pt")]
        extra = f" (found {bins[0]}: pickled weights are not read; convert to safetensors)" if bins else ""
        raise ModelNotFoundError(
            f"{root} has no config.json and no .safetensors files{extra}; pass a save_pretrained "
            "directory, a .safetensors or config.json file, or a hub id like org/name."
        )
    config = load_json(cfg_path) if cfg_path.exists() else None
    ck = Checkpoint(ref, kind, config, location=str(root))
    if has_weights:
        ck.tensors, ck.files, ck.file_bytes, ck.bytes_read = _dir_tensors(root)
    else:
        ck.notes.append("no safetensors weights in the directory: counts come from config.json")
    if config is None:
        ck.notes.append("no config.json: accounting by tensor names alone (top-k unknown)")
    return ck


def _from_file(ref: str, path: Path) -> Checkpoint:
    if path.suffix == ".safetensors":
        tensors, n = read_local_header(path)
        cfg_path = path.parent / "config.json"
        config = load_json(cfg_path) if cfg_path.exists() else None
        ck = Checkpoint(ref, "file", config, tensors, str(path), [path.name], path.stat().st_size, n)
        if config is None:
            ck.notes.append(
                "no config.json beside the file: accounting by tensor names alone (top-k unknown)"
            )
        return ck
    if path.suffix == ".json":
        config = load_json(path)
        if path.name == _INDEX:
            return _from_dir(ref, path.parent)
        if config.get("model_type") == "moescope_spec":
            from moescope.spec import spec_to_config

            ck = Checkpoint(ref, "spec", spec_to_config(config, str(path)), location=str(path))
            ck.notes.append("generic moescope spec: counts come from the spec's dimensions")
            return ck
        if "model_type" not in config and "architectures" not in config:
            raise ConfigError(
                f"{path}: not a transformers config (no model_type); pass a config.json, a safetensors file "
                "or a checkpoint directory."
            )
        ck = Checkpoint(ref, "config", config, location=str(path))
        ck.notes.append("config only: counts come from the config, not from stored tensors")
        return ck
    raise ModelNotFoundError(
        f"{path}: not a .safetensors or .json file; pass a checkpoint directory, a .safetensors file, "
        "a config.json or a hub id like org/name."
    )


# ---------------------------------------------------------------------------------------
# Hub source
# ---------------------------------------------------------------------------------------


_TRUE = ("1", "true", "yes", "on")


def _hub_env() -> dict[str, Any]:
    """Hub settings read at call time (tests and users may set them after import).

    ``offline`` is true when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) says so now,
    or when huggingface_hub read it so at import (then it refuses every request anyway);
    ``offline_why`` names the variable, for messages.
    """
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    why = next((f"{v}=1" for v in flags if os.environ.get(v, "").lower() in _TRUE), None)
    if why is None:
        try:
            from huggingface_hub import constants

            why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else None
        except ImportError:  # pragma: no cover - huggingface_hub is a dependency
            pass
    endpoint = os.environ.get("HF_ENDPOINT") or None
    return {
        "endpoint": endpoint.rstrip("/") if endpoint else None,
        "cache_dir": os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"),
        "token": os.environ.get("HF_TOKEN") or None,
        "offline": why is not None,
        "offline_why": why,
    }


def split_hub_ref(ref: str, revision: str | None = None) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); an explicit ``revision`` wins."""
    repo, _, rev = ref.partition("@")
    return repo, revision or rev or None


def looks_like_hub_id(ref: str) -> bool:
    """``org/name`` or ``org/name@rev`` that is not a local path."""
    repo = ref.partition("@")[0]
    parts = repo.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


#: seconds the reachability probe waits for the hub; huggingface_hub itself would retry a
#: refused connection with backoff for about 25 s per file before giving up
PROBE_TIMEOUT = 5.0


def _probe_hub(endpoint: str) -> str | None:
    """None when ``endpoint`` answers HTTP at all (any status), else why not, in a few words.

    One HEAD request without retries: connection refused, DNS failure, proxy or TLS errors
    and timeouts all mean unreachable.
    """
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT, follow_redirects=False)
    except Exception as exc:  # any transport failure (httpx, requests, proxies): unreachable
        text = " ".join(str(exc).split()) or type(exc).__name__
        return text if len(text) <= 120 else text[:117] + "..."
    return None


def _cached_config(repo: str, revision: str | None, cache_dir: str) -> str | None:
    """Path of the repo's ``config.json`` in the HF cache at that revision, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "config.json", cache_dir=cache_dir, revision=revision)
    return found if isinstance(found, str) else None


def hub_offline_reason(
    ref: str, revision: str | None, env: dict[str, Any], *, use_cache: bool = True
) -> str | None:
    """Decide, before any hub request, whether a hub id is read online or from the cache only.

    Offline mode is honoured; otherwise one quick probe checks that the endpoint answers,
    so an unreachable hub fails in seconds instead of after huggingface_hub's retries.

    Args:
        ref: ``org/name`` or ``org/name@revision``.
        revision: explicit revision (wins over ``@rev``).
        env: :func:`_hub_env`.
        use_cache: whether a cached copy may stand in when the hub is unreachable
            (``moescope download`` passes False: it needs the hub).

    Returns:
        None to go online; else why the caller must pass ``local_files_only=True``
        (``HF_HUB_OFFLINE=1`` or ``the hub at URL is unreachable (...)``).

    Raises:
        ModelNotFoundError: offline or unreachable, and the repo is not in the HF cache
            (or ``use_cache`` is False and the hub is unreachable).
    """
    from huggingface_hub import constants

    repo, rev = split_hub_ref(ref, revision)
    where = f"{repo}@{rev}" if rev else repo
    cache = env["cache_dir"]
    if env["offline"]:
        if use_cache and _cached_config(repo, rev, cache) is None:
            raise ModelNotFoundError(
                f"{where} is not in the HF cache at {cache} and {env['offline_why']} forbids downloads; run "
                f"`moescope download {ref}` on a machine with network (same HF_HUB_CACHE), or unset "
                f"{str(env['offline_why']).split('=')[0]}."
            )
        return str(env["offline_why"])
    endpoint = env["endpoint"] or constants.ENDPOINT
    why = _probe_hub(endpoint)
    if why is None:
        return None
    reason = f"the hub at {endpoint} is unreachable ({why})"
    if not use_cache:
        raise ModelNotFoundError(
            f"{where}: {reason}; check the network, or run `moescope download` on a machine with network. "
            f"What is already in the HF cache ({cache}) can be used with HF_HUB_OFFLINE=1."
        )
    if _cached_config(repo, rev, cache) is None:
        raise ModelNotFoundError(
            f"{where}: {reason} and the model is not in the HF cache at {cache}; check the network, or run "
            f"`moescope download {ref}` on a machine with network and use that cache here with HF_HUB_OFFLINE=1."
        )
    return reason


#: first range read per shard: most headers fit, so one round trip per shard (a Kimi-K2
#: shard's header is ~300 KB); 512 KB x 62 shards is 0.003% of a 1 TB checkpoint.
FIRST_READ = 512 * 1024


def _remote_header(
    repo: str, filename: str, revision: str | None, env: dict[str, Any]
) -> tuple[list[TensorInfo], int]:
    """Fetch one shard's header with HTTP range reads through huggingface_hub's session.

    Returns (tensors, bytes transferred). A header larger than :data:`FIRST_READ` costs a
    second range request for the rest.
    """
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo, filename, revision=revision, endpoint=env["endpoint"] or constants.ENDPOINT)
    headers = build_hf_headers(token=env["token"])
    session = get_session()
    timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT

    def get(byte_range: str) -> Any:
        try:
            resp = session.get(url, headers={**headers, "range": byte_range}, timeout=timeout)
        except Exception as exc:  # transport errors (refused, reset, timeout) of any HTTP client
            raise ModelNotFoundError(
                f"{repo}/{filename}: the hub stopped answering while reading the header "
                f"({' '.join(str(exc).split()) or type(exc).__name__}); check the network and retry."
            ) from None
        hf_raise_for_status(resp)
        return resp

    resp = get(f"bytes=0-{FIRST_READ - 1}")
    first = resp.content
    transferred = len(first)
    if len(first) < 8:
        raise CheckpointError(f"{repo}/{filename}: too short for a safetensors file; the upload is broken.")
    (n,) = struct.unpack("<Q", first[:8])
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{repo}/{filename}: header length {n} is implausible; not a safetensors file.")
    raw = first[8 : 8 + n]
    if len(raw) < n:
        resp = get(f"bytes={len(first)}-{n + 7}")
        raw += resp.content
        transferred += len(resp.content)
    if len(raw) < n:
        raise CheckpointError(f"{repo}/{filename}: the header is cut short; the upload is broken.")
    size = None
    cr = resp.headers.get("content-range", "")
    if "/" in cr and cr.rsplit("/", 1)[1].isdigit():
        size = int(cr.rsplit("/", 1)[1])
    return parse_header(raw, filename, size), transferred


def _from_hub(ref: str, revision: str | None, workers: int = 64) -> Checkpoint:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, rev = split_hub_ref(ref, revision)
    env = _hub_env()
    where = f"{repo}@{rev}" if rev else repo
    # offline, or the hub unreachable with the repo cached: files come from the cache only
    offline_why = hub_offline_reason(ref, revision, env)
    offline = offline_why is not None
    common = {"revision": rev, "cache_dir": env["cache_dir"], "token": env["token"]}
    if env["endpoint"]:
        common["endpoint"] = env["endpoint"]

    def fetch(filename: str) -> str | None:
        try:
            return str(hf_hub_download(repo, filename, local_files_only=offline, **common))
        except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: catch it first)
            if offline:
                return None
            raise
        except EntryNotFoundError:
            return None

    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            fut_cfg = pool.submit(fetch, "config.json")
            fut_idx = pool.submit(fetch, _INDEX)
            cfg_file, idx_file = fut_cfg.result(), fut_idx.result()
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo} is gated; accept its licence on the hub and set HF_TOKEN (or run `hf auth login`)."
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo}: no such model on the hub (or it is private: set HF_TOKEN); check the id."
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(
            f"{repo}: revision {rev!r} not found; check the branch, tag or commit."
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelNotFoundError(
            f"{where}: cannot reach the hub ({str(exc).splitlines()[0]}); check the network, or run "
            "`moescope download` on a machine with network and set HF_HUB_OFFLINE=1."
        ) from None
    if cfg_file is None:
        if offline:
            raise ModelNotFoundError(
                f"{where} is not in the HF cache at {env['cache_dir']} ({offline_why}); run "
                f"`moescope download {ref}` on a machine with network first."
            )
        raise ModelNotFoundError(f"{where} has no config.json; moescope needs a transformers checkpoint.")
    config = load_json(Path(cfg_file))
    snapshot = Path(cfg_file).parent
    ck = Checkpoint(ref, "hub", config, location=where)
    if offline and not env["offline"]:
        ck.notes.append(f"{offline_why}: read from the local HF cache")

    if idx_file is not None:
        files = index_shards(snapshot, Path(idx_file))  # no absolute paths, no `..`
    else:
        files = [_SINGLE]
    # A snapshot already downloaded (moescope download) is read from the cache.
    if all((snapshot / f).exists() for f in files):
        for f in files:
            t, n = read_local_header(snapshot / f)
            ck.tensors.extend(t)
            ck.bytes_read += n
            ck.file_bytes += (snapshot / f).stat().st_size
        ck.files = files
        ck.notes.append("headers read from the local HF cache")
        return ck
    if offline:
        what = f"{offline_why} and" if env["offline"] else "the hub is unreachable and"
        ck.notes.append(f"{what} the weights are not cached: counts come from config.json")
        return ck

    def header(f: str) -> tuple[str, list[TensorInfo], int]:
        return (f, *_remote_header(repo, f, rev, env))

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:
            results = list(pool.map(header, files))
    except EntryNotFoundError:
        if idx_file is None:
            ck.notes.append("the repo has no safetensors weights: counts come from config.json")
            return ck
        raise CheckpointError(f"{where}: a shard listed in {_INDEX} is missing on the hub.") from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelNotFoundError(
            f"{where}: reading safetensors headers failed ({str(exc).splitlines()[0]})."
        ) from None
    for _f, tensors, read in results:
        ck.tensors.extend(tensors)
        ck.bytes_read += read
        ck.file_bytes += sum(t.nbytes for t in tensors)
    ck.files = files
    ck.notes.append(f"read {len(files)} safetensors headers from the hub (weights not downloaded)")
    return ck


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def open_checkpoint(ref: str, revision: str | None = None) -> Checkpoint:
    """Resolve a model reference into a :class:`Checkpoint` (config + tensors from headers).

    Args:
        ref: ``demo``, a directory, a ``.safetensors`` or ``.json`` file, or a hub id
            (``org/name`` or ``org/name@revision``).
        revision: hub revision (overrides ``@rev`` in ``ref``).

    Raises:
        ModelNotFoundError: nothing found under that reference.
        CheckpointError: a file exists but is truncated or malformed.
        ConfigError: the config is malformed.
    """
    demo = demo_model_dir(ref)
    if demo is not None:
        if not demo.exists():
            raise ModelNotFoundError(f"the demo model {ref!r} is not installed ({demo}); reinstall moescope.")
        ck = _from_dir(ref, demo, "demo")
        return ck
    path = Path(ref).expanduser()
    if path.is_dir():
        return _from_dir(ref, path)
    if path.is_file():
        return _from_file(ref, path)
    if looks_like_hub_id(ref):
        return _from_hub(ref, revision)
    raise ModelNotFoundError(
        f"{ref}: no such file or directory; pass a save_pretrained directory, a .safetensors or config.json "
        "file, a hub id like org/name, or 'demo'."
    )
