"""The source checkpoint of a prune: ``config.json`` plus a tensor inventory with byte offsets.

:func:`resolve_checkpoint_dir` turns a model reference into a local directory (hub ids
through the HF cache); :func:`open_checkpoint` reads every shard header through the
validated reader of :mod:`moescope.checkpoint` and keeps each tensor's absolute byte range,
which is all the rewriter needs to copy or slice it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moescope.errors import CheckpointError, ModelNotFoundError
from moescope.inventory import TensorInfo  # the one tensor type: file relative, offset absolute

INDEX_NAME = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    """A local safetensors checkpoint: config plus a tensor inventory from the headers.

    Attributes:
        path: the directory.
        config: ``config.json`` as a dict.
        shards: shard file names in order (one for a single ``model.safetensors``).
        tensors: name -> :class:`TensorInfo`.
        metadata: per-shard ``__metadata__``.
    """

    path: Path
    config: dict[str, Any]
    shards: list[str]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        """The config's ``model_type``."""
        return str(self.config.get("model_type", ""))


def resolve_checkpoint_dir(ref: str, revision: str | None = None) -> Path:
    """Resolve a model reference (``demo``, a directory, a hub id in the cache) to a directory.

    Raises:
        ModelNotFoundError: nothing found (for hub ids: not downloadable / not cached).
    """
    from moescope.model import parse_model_ref

    mref = parse_model_ref(ref, revision)
    if mref.is_local:
        path = Path(mref.path_or_id)
        if path.is_file():
            path = path.parent
        return path
    from huggingface_hub import snapshot_download

    from moescope.checkpoint import _hub_env, hub_offline_reason
    from moescope.download import PICKLE_PATTERNS

    env = _hub_env()
    offline = hub_offline_reason(mref.path_or_id, mref.revision, env) is not None
    try:
        local = snapshot_download(
            mref.path_or_id,
            revision=mref.revision,
            cache_dir=env["cache_dir"],
            local_files_only=offline,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"],
            ignore_patterns=PICKLE_PATTERNS,
        )
    except Exception as exc:  # hub errors come in many types; one line with the cause
        raise ModelNotFoundError(f"cannot fetch {ref}: {str(exc).splitlines()[0]}") from exc
    return Path(local)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read ``config.json`` and every shard header of a safetensors checkpoint directory.

    Headers are read by the one validated reader (:func:`moescope.checkpoint.open_checkpoint`:
    offsets in bounds and non-overlapping, index paths inside the checkpoint, a tensor in two
    shards refused); each :class:`~moescope.inventory.TensorInfo` keeps its shard (relative)
    and absolute byte offset, which is all the rewriter needs to copy or slice it.

    Raises:
        CheckpointError: no config, no safetensors weights, a missing shard, or a bad header.
    """
    from moescope.checkpoint import open_checkpoint as open_source
    from moescope.validate import validate_config

    root = Path(path)
    if not (root / "config.json").exists():
        raise CheckpointError(f"{root} has no config.json; pass a save_pretrained directory or a hub id.")
    source = open_source(str(root))
    if source.config is None or not source.files:
        raise CheckpointError(
            f"{root} has no safetensors weights (pickled .bin weights are not read); convert it "
            "with save_pretrained(safe_serialization=True)."
        )
    validate_config(source.config, str(root / "config.json"))
    tensors = {t.name: t for t in source.tensors}
    metadata = {shard: dict(source.tensors.metadata.get(shard) or {}) for shard in source.files}
    return Checkpoint(root, source.config, list(source.files), tensors, metadata)
