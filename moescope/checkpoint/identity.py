"""Fingerprints: which model a trace was recorded on, and which token stream it saw.

A *model fingerprint* is a sha256 over ``config.json``, the safetensors index (if any),
and, for every shard in name order, its header (the 8-byte length and the JSON) and the
first 4 KiB of tensor data. Headers pin names, shapes, dtypes and layout; the data sample
tells apart two checkpoints of one architecture (a fine-tune and its base). It reads a
few KiB per shard, never the weights.

The *checkpoint dtype* (:func:`checkpoint_dtype`) is what the weights are stored in, read
from disk: a trace records it beside the dtype it ran in.

A *corpus fingerprint* is a sha256 over the token windows a trace ran (token ids and
domain ids in stream order, with the window length): every ``--shard i/n`` of one run
sees the same stream, so shards of one run share it and different corpora do not.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moescope.checkpoint.ref import ResolvedRef

_DATA_SAMPLE = 4096
_HEADER_CAP = 100 * 2**20


def model_fingerprint(root: str | Path) -> str | None:
    """Fingerprint of a checkpoint directory (or of a single ``.safetensors`` file's folder).

    Returns:
        ``"sha256:<hex>"``, or None when ``root`` has no config.json (nothing to identify).
    """
    root = Path(root)
    if root.is_file():
        root = root.parent
    config = root / "config.json"
    if not config.is_file():
        return None
    h = hashlib.sha256()
    h.update(b"config\0" + config.read_bytes())
    index = root / "model.safetensors.index.json"
    if index.is_file():
        h.update(b"index\0" + index.read_bytes())
    for shard in sorted(root.glob("*.safetensors")):
        h.update(b"shard\0" + shard.name.encode() + b"\0")
        with open(shard, "rb") as fh:
            raw = fh.read(8)
            h.update(raw)
            if len(raw) == 8:
                (n,) = struct.unpack("<Q", raw)
                h.update(fh.read(min(n, _HEADER_CAP)))
                h.update(fh.read(_DATA_SAMPLE))
    return "sha256:" + h.hexdigest()


def fingerprint_ref(ref: ResolvedRef | str, revision: str | None = None) -> str | None:
    """Fingerprint of a model reference resolved locally (demo, path, or a cached hub snapshot).

    Never touches the network: a hub id that is not in the local cache gives None.
    """
    from moescope.checkpoint.ref import as_ref

    try:
        mref = as_ref(ref, revision)
    except Exception:  # not a reference we can resolve: no fingerprint, the caller decides
        return None
    if mref.is_local:
        return model_fingerprint(mref.path_or_id)
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            mref.path_or_id,
            revision=mref.revision,
            local_files_only=True,
            allow_patterns=["*.json", "*.safetensors"],
        )
    except Exception:  # not cached
        return None
    return model_fingerprint(local)


class StreamHasher:
    """Accumulates the corpus fingerprint of the token windows a trace runs."""

    def __init__(self, seq_len: int) -> None:
        self._h = hashlib.sha256(f"windows\0{seq_len}\0".encode())

    def update(self, tokens: bytes, domains: bytes) -> None:
        """Add one window (its token ids and per-token domain ids, as raw bytes)."""
        self._h.update(struct.pack("<Q", len(tokens)) + tokens + domains)

    def hexdigest(self) -> str:
        """``"sha256:<hex>"`` of everything added."""
        return "sha256:" + self._h.hexdigest()


def check_trace_model(
    trace_fingerprint: str | None, model_fingerprint: str | None, trace: str, model: str
) -> bool:
    """Refuse a trace recorded on another checkpoint.

    Returns:
        True when both fingerprints are known and equal (identity proven); False when
        either is unknown (a trace of an older moescope, a model not on disk), in which
        case the caller falls back to comparing names.

    Raises:
        TraceError: both are known and differ; the message names both.
    """
    from moescope.errors import TraceError

    if not trace_fingerprint or not model_fingerprint:
        return False
    if trace_fingerprint != model_fingerprint:
        raise TraceError(
            f"{trace} was traced on another checkpoint (fingerprint {trace_fingerprint[7:19]}) than {model} "
            f"({model_fingerprint[7:19]}); trace this model with `moescope trace {model} CORPUS --out DIR`."
        )
    return True


#: safetensors dtype names of floating-point activations, as torch names them
_ST_FLOAT = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def checkpoint_dtype(name_or_path: str) -> str | None:
    """The dtype the checkpoint is stored in, read from disk (a loaded config says the load dtype).

    ``torch_dtype`` (or ``dtype``) of the checkpoint's ``config.json``, else the dtype of its
    expert weights in the safetensors headers (16- or 32-bit floats only: quantised experts
    say nothing about activations). A local directory or a hub id already in the local
    cache; None when neither says.
    """
    import json

    root = Path(name_or_path) if name_or_path else None
    if root is None or not root.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "config.json") if name_or_path else None
        except Exception:  # not a hub id, or no cache: nothing to read
            cached = None
        root = Path(cached).parent if isinstance(cached, str) else None
    if root is None:
        return None
    try:
        cfg = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    for c in (cfg, cfg.get("text_config") or {}) if isinstance(cfg, dict) else ():
        value = c.get("torch_dtype") or c.get("dtype") if isinstance(c, dict) else None
        if value in _ST_FLOAT.values():
            return str(value)
    return _safetensors_expert_dtype(root)


def _safetensors_expert_dtype(root: Path) -> str | None:
    """The most common float dtype of the expert tensors in ``root``'s safetensors headers."""
    from collections import Counter

    from moescope.checkpoint.header import read_safetensors_header

    seen: Counter[str] = Counter()
    for path in sorted(root.glob("*.safetensors"))[:4]:
        try:
            _start, header = read_safetensors_header(path)
        except Exception:  # an unreadable shard leaves the dtype unknown, the trace goes on
            continue
        for name, entry in header.items():
            if "expert" in name and isinstance(entry, dict) and entry.get("dtype") in _ST_FLOAT:
                seen[_ST_FLOAT[entry["dtype"]]] += 1
    return seen.most_common(1)[0][0] if seen else None


def same_model(traced: str, ref: str, path: Path) -> bool:
    """Whether a trace's model reference names the checkpoint at ``path`` (ref, path or hub cache)."""
    if traced == ref:
        return True
    candidates = {ref, str(path), path.name}
    try:
        candidates.add(str(path.resolve()))
        traced_path = Path(traced).expanduser()
        if traced_path.exists():
            return traced_path.resolve() == path.resolve()
    except OSError:
        pass
    # A hub id traced, its cache snapshot pruned (…/models--org--name/snapshots/<rev>).
    repo = traced.split("@")[0]
    if "/" in repo and f"models--{repo.replace('/', '--')}" in str(path):
        return True
    return traced in candidates
