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
from pathlib import Path
from typing import Any

from moescope.closedform import TensorInfo
from moescope.demo import demo_model_dir
from moescope.errors import CheckpointError, ConfigError, ModelNotFoundError

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


# ---------------------------------------------------------------------------------------
# safetensors headers
# ---------------------------------------------------------------------------------------

_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
    "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1,
    "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75,
}  # fmt: skip


def parse_header(raw: bytes, file: str, file_size: int | None) -> list[TensorInfo]:
    """Parse a safetensors JSON header into tensors, validating offsets against the file size.

    Raises:
        CheckpointError: malformed JSON, bad entries, or offsets past the end of the file.
    """
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{file}: the safetensors header is not valid JSON ({exc}); the file is corrupt — download it again."
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header is not a JSON object; the file is corrupt.")
    out: list[TensorInfo] = []
    data_len = None if file_size is None else file_size - 8 - len(raw)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(entry["shape"])
            start, end = entry["data_offsets"]
            if not (
                isinstance(dtype, str) and isinstance(start, int) and isinstance(end, int) and end >= start
            ):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{file}: tensor {name!r} has a malformed header entry; the file is corrupt — download it again."
            ) from None
        if data_len is not None and end > data_len:
            raise CheckpointError(
                f"{file}: tensor {name!r} ends at byte {end} but the file holds only {data_len} data bytes; "
                "the file is truncated — download it again."
            )
        out.append(TensorInfo(name, shape, dtype, end - start, file))
    return out


def read_local_header(path: Path) -> tuple[list[TensorInfo], int]:
    """Read one local safetensors header. Returns (tensors, header bytes read).

    Raises:
        CheckpointError: truncated file, impossible header length, malformed header.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(
                f"{path}: {size} bytes is too short for a safetensors file (truncated); download it again."
            )
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: header length {n} is larger than the file ({size} bytes); the file is truncated "
                "or not safetensors — download it again."
            )
        raw = fh.read(n)
    return parse_header(raw, path.name, size), n + 8


# ---------------------------------------------------------------------------------------
# Local sources
# ---------------------------------------------------------------------------------------


def load_json(path: Path, what: str = "config") -> dict[str, Any]:
    """Load a JSON object, with a one-line error naming the file on failure."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: malformed JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); fix the {what} file."
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; pass a JSON {what} file.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}; fix the {what} file.")
    return data


def _dir_tensors(root: Path) -> tuple[list[TensorInfo], list[str], int, int]:
    index = root / _INDEX
    if index.exists():
        idx = load_json(index, "safetensors index")
        wm = idx.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{index}: has no weight_map; re-save the checkpoint with save_pretrained.")
        files = sorted(set(wm.values()))
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    missing = [f for f in files if not (root / f).exists()]
    if missing:
        raise CheckpointError(
            f"{root}: shard {missing[0]} listed in {_INDEX} is missing; download the full checkpoint "
            "(moescope download) or pass a complete directory."
        )
    tensors: list[TensorInfo] = []
    read = size = 0
    for f in files:
        t, n = read_local_header(root / f)
        tensors.extend(t)
        read += n
        size += (root / f).stat().st_size
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


def _hub_env() -> dict[str, Any]:
    """Hub settings read at call time (tests and users may set them after import)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return {
        "endpoint": os.environ.get("HF_ENDPOINT") or None,
        "cache_dir": os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"),
        "token": os.environ.get("HF_TOKEN") or None,
        "offline": os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"),
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
    resp = session.get(url, headers={**headers, "range": f"bytes=0-{FIRST_READ - 1}"}, timeout=timeout)
    hf_raise_for_status(resp)
    first = resp.content
    transferred = len(first)
    if len(first) < 8:
        raise CheckpointError(f"{repo}/{filename}: too short for a safetensors file; the upload is broken.")
    (n,) = struct.unpack("<Q", first[:8])
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{repo}/{filename}: header length {n} is implausible; not a safetensors file.")
    raw = first[8 : 8 + n]
    if len(raw) < n:
        resp = session.get(url, headers={**headers, "range": f"bytes={len(first)}-{n + 7}"}, timeout=timeout)
        hf_raise_for_status(resp)
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
    common = {"revision": rev, "cache_dir": env["cache_dir"], "token": env["token"]}
    if env["endpoint"]:
        common["endpoint"] = env["endpoint"]
    where = f"{repo}@{rev}" if rev else repo

    def fetch(filename: str) -> str | None:
        try:
            return str(hf_hub_download(repo, filename, local_files_only=env["offline"], **common))
        except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: catch it first)
            if env["offline"]:
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
            "`moescope download` on a connected machine and set HF_HUB_OFFLINE=1."
        ) from None
    if cfg_file is None:
        if env["offline"]:
            raise ModelNotFoundError(
                f"{where} is not in the HF cache ({env['cache_dir']}) and HF_HUB_OFFLINE=1; run "
                f"`moescope download {ref}` on a connected machine first."
            )
        raise ModelNotFoundError(f"{where} has no config.json; moescope needs a transformers checkpoint.")
    config = load_json(Path(cfg_file))
    snapshot = Path(cfg_file).parent
    ck = Checkpoint(ref, "hub", config, location=where)

    if idx_file is not None:
        idx = load_json(Path(idx_file), "safetensors index")
        files = sorted(set((idx.get("weight_map") or {}).values()))
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
    if env["offline"]:
        ck.notes.append("HF_HUB_OFFLINE=1 and the weights are not cached: counts come from config.json")
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
