"""The source checkpoint of a prune: ``config.json`` plus a tensor inventory with byte offsets.

:func:`moescope.checkpoint.ref.local_dir` turns a model reference into a local directory (hub ids
through the HF cache); :func:`open_checkpoint` reads every shard header through the
validated reader of :mod:`moescope.checkpoint.ref` and keeps each tensor's absolute byte range,
which is all the rewriter needs to copy or slice it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moescope.arch.inventory import TensorInfo  # the one tensor type: file relative, offset absolute
from moescope.checkpoint.ref import ResolvedRef
from moescope.errors import CheckpointError

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


def open_checkpoint(path: str | Path | ResolvedRef) -> Checkpoint:
    """Read ``config.json`` and every shard header of a safetensors checkpoint directory.

    Headers are read by the one validated reader (:func:`moescope.checkpoint.ref.open_checkpoint`:
    offsets in bounds and non-overlapping, index paths inside the checkpoint, a tensor in two
    shards refused); each :class:`~moescope.arch.inventory.TensorInfo` keeps its shard (relative)
    and absolute byte offset, which is all the rewriter needs to copy or slice it.

    Raises:
        CheckpointError: no config, no safetensors weights, a missing shard, or a bad header.
    """
    from moescope.arch.validate import validate_config
    from moescope.checkpoint.ref import ResolvedRef
    from moescope.checkpoint.ref import open_checkpoint as open_source

    mref = path if isinstance(path, ResolvedRef) else None
    root = Path(mref.local_dir or mref.ref) if mref is not None else Path(path)  # type: ignore[arg-type]
    if not (root / "config.json").exists():
        raise CheckpointError(f"{root} has no config.json; pass a save_pretrained directory or a hub id.")
    source = open_source(mref if mref is not None else str(root))
    if source.config is None or not source.files:
        raise CheckpointError(
            f"{root} has no safetensors weights (pickled .bin weights are not read); convert it "
            "with save_pretrained(safe_serialization=True)."
        )
    validate_config(source.config, str(root / "config.json"))
    tensors = {t.name: t for t in source.tensors}
    metadata = {shard: dict(source.tensors.metadata.get(shard) or {}) for shard in source.files}
    return Checkpoint(root, source.config, list(source.files), tensors, metadata)
