"""Resolve a model reference into a config and a tensor inventory, reading headers only.

One resolver, :func:`resolve_ref`, decides what a reference names, for every command (params,
trace, prune, similarity, eval load through it); :func:`open_checkpoint` then reads it:

- ``demo`` / ``demo-dense``: the models shipped inside the package;
- a local ``save_pretrained`` directory (``model.safetensors`` or sharded with
  ``model.safetensors.index.json``; a directory with only ``config.json`` is a config source);
- a single ``.safetensors`` file (with a ``config.json`` beside it, or without: then the
  accounting is by tensor names alone);
- a config file (``config.json`` or any ``.json`` holding a transformers config, or a
  moescope generic spec with ``"model_type": "moescope_spec"``);
- a hub id ``org/name`` or ``org/name@revision`` (``--revision`` wins over ``@rev``):
  ``config.json`` and the safetensors index come through ``huggingface_hub`` (HF cache,
  ``HF_TOKEN``, ``HF_ENDPOINT``, offline mode); each shard's header is fetched with HTTP range
  reads, all shards concurrently (:mod:`moescope.checkpoint.hub`). The weights are never downloaded. A
  snapshot already in the cache is read locally.

Headers are read and validated by :mod:`moescope.checkpoint.header` into
:class:`~moescope.arch.inventory.TensorInfo` records; import their names from
those modules.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moescope.arch.inventory import Inventory, as_inventory, gc_paused
from moescope.checkpoint.header import (
    read_local_header,
)
from moescope.checkpoint.hub import (
    hub_env,
    hub_offline_reason,
    looks_like_hub_id,
    remote_header,
    split_hub_ref,
)
from moescope.checkpoint.jsonfiles import (
    INDEX_NAME,
    SINGLE_NAME,
    index_shards,
    load_json,
)
from moescope.checkpoint.shards import Then, read_indexed_headers, read_local_headers
from moescope.demo import demo_model_dir
from moescope.errors import CheckpointError, ConfigError, ModelNotFoundError

#: called with a directory checkpoint's config before its shards are read; returns what to
#: run on each shard's tensors (or None): see :func:`open_checkpoint`
PerShard = Callable[[dict[str, Any] | None], Then | None]

__all__ = [
    "Checkpoint",
    "ResolvedRef",
    "open_checkpoint",
    "as_ref",
    "local_dir",
    "resolve_ref",
]

# ---------------------------------------------------------------------------------------
# The resolver
# ---------------------------------------------------------------------------------------

#: what every "nothing under that reference" error ends with
REF_HINT = (
    "pass a save_pretrained directory, a .safetensors or config.json file, a hub id like org/name, or 'demo'"
)

#: one part of a hub id as the hub accepts it (huggingface_hub's validate_repo_id)
_HUB_PART_RE = re.compile(r"[A-Za-z0-9_.\-]{1,96}")


@dataclass(frozen=True)
class ResolvedRef:
    """What a model reference names, decided without reading it.

    Attributes:
        ref: the reference as the user wrote it.
        kind: ``demo`` (a shipped model), ``dir``, ``file`` or ``hub``.
        path: the local directory or file (``demo``, ``dir``, ``file``); None for hub ids.
        repo_id: ``org/name`` for hub ids; None otherwise.
        revision: the hub revision (``--revision`` wins over ``@rev``); None for local
            references and for the default branch.
    """

    ref: str
    kind: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        """True for ``demo``, ``dir`` and ``file``."""
        return self.kind != "hub"

    @property
    def path_or_id(self) -> str:
        """What ``from_pretrained`` takes: the local path, or the hub id without ``@rev``."""
        return str(self.path) if self.path is not None else str(self.repo_id)

    @property
    def where(self) -> str:
        """How messages name it: the local path, or ``org/name@rev``."""
        if self.path is not None:
            return str(self.path)
        return f"{self.repo_id}@{self.revision}" if self.revision else str(self.repo_id)

    @property
    def local_dir(self) -> Path | None:
        """The checkpoint directory of a local reference (a file's folder); None for hub ids."""
        if self.path is None:
            return None
        return self.path if self.kind in ("demo", "dir") else self.path.parent


def as_ref(ref: ResolvedRef | str, revision: str | None = None) -> ResolvedRef:
    """``ref`` resolved once: a :class:`ResolvedRef` passes through, a string goes to :func:`resolve_ref`.

    Commands resolve the user's reference once and pass the record down; the library
    functions below them take either, so the public API still accepts plain strings.
    """
    return ref if isinstance(ref, ResolvedRef) else resolve_ref(ref, revision)


def resolve_ref(ref: str, revision: str | None = None) -> ResolvedRef:
    """Decide what a model reference names: a shipped demo, a local path, or a hub id.

    Tried in this order: the demo names (``demo``, ``demo-dense``), an existing local
    directory or file (``~`` expanded), then ``org/name`` or ``org/name@revision``. Nothing
    is read and the hub is not contacted.

    Args:
        ref: the reference as the user wrote it.
        revision: hub revision (branch, tag or commit); wins over ``@rev`` in ``ref``;
            ignored for local references.

    Returns:
        A :class:`ResolvedRef`.

    Raises:
        ModelNotFoundError: the demo is not installed, or ``ref`` is neither an existing path
            nor shaped like a hub id (one wording for every command).
    """
    demo = demo_model_dir(ref)
    if demo is not None:
        if not (demo / "config.json").exists():
            raise ModelNotFoundError(
                f"the demo model {ref!r} is not installed ({demo} is missing); reinstall moescope."
            )
        return ResolvedRef(ref, "demo", path=demo)
    path = Path(ref).expanduser()
    if path.is_dir():
        return ResolvedRef(ref, "dir", path=path)
    if path.is_file():
        return ResolvedRef(ref, "file", path=path)
    if path.exists():
        raise ModelNotFoundError(f"{ref}: not a regular file or directory; {REF_HINT}.")
    # a missing local file (`sample_configs/x.json`) is a typo'd path, not a hub repo
    if looks_like_hub_id(ref) and not ref.lower().endswith((".json", ".safetensors")):
        repo, rev = split_hub_ref(ref, revision)
        org, name = repo.split("/")
        if all(_HUB_PART_RE.fullmatch(p) and ".." not in p and "--" not in p for p in (org, name)):
            return ResolvedRef(ref, "hub", repo_id=repo, revision=rev)
    raise ModelNotFoundError(f"{ref}: no such file or directory; {REF_HINT}.")


# ---------------------------------------------------------------------------------------
# What a reference resolved to
# ---------------------------------------------------------------------------------------


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
        shard_extras: per shard, in ``files`` order, (its tensor count, what ``per_shard``'s
            function gave for it); None unless :func:`open_checkpoint` got ``per_shard``.
    """

    ref: str
    kind: str
    config: dict[str, Any] | None
    tensors: Inventory = field(default_factory=Inventory)
    location: str = ""
    files: list[str] = field(default_factory=list)
    file_bytes: int = 0
    bytes_read: int = 0
    notes: list[str] = field(default_factory=list)
    shard_extras: list[tuple[int, Any]] | None = None

    def __post_init__(self) -> None:
        self.tensors = as_inventory(self.tensors)  # a plain list of TensorInfo is welcome too

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
# Local sources
# ---------------------------------------------------------------------------------------


def _dir_tensors(root: Path, then: Then | None = None) -> tuple[Inventory, list[str], int, int, list[Any]]:
    """(tensors, shard files, their total size, header bytes read, per shard (tensors, what
    ``then`` gave)) of a checkpoint directory."""
    index = root / INDEX_NAME
    tensors = Inventory()
    read = size = 0
    with gc_paused():
        if index.exists():
            files, parsed = read_indexed_headers(root, index, then=then)
        else:
            files = sorted(p.name for p in root.glob("*.safetensors"))
            parsed = read_local_headers(root, files, then=then)
        for t, n, file_size, _ in parsed:
            tensors.extend(t)
            read += n
            size += file_size
        # a header cannot repeat a name (JSON keeps one), so a repeat spans two shards
        if len(set(tensors.names)) != len(tensors):
            where: dict[str, str] = {}
            for ti in tensors:
                other = where.setdefault(ti.name, str(ti.file))
                if other != ti.file:
                    raise CheckpointError(
                        f"{root}: tensor {ti.name!r} is stored in both {other} and {ti.file}; the "
                        "checkpoint is inconsistent — download it again."
                    )
    return tensors, files, size, read, [(len(r.tensors), r.extra) for r in parsed]


def _from_dir(ref: str, root: Path, kind: str = "dir", per_shard: PerShard | None = None) -> Checkpoint:
    cfg_path = root / "config.json"
    has_weights = (root / INDEX_NAME).exists() or any(root.glob("*.safetensors"))
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
        then = None if per_shard is None else per_shard(config)
        ck.tensors, ck.files, ck.file_bytes, ck.bytes_read, extras = _dir_tensors(root, then)
        if then is not None:
            ck.shard_extras = extras
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
        if path.name == INDEX_NAME:
            return _from_dir(ref, path.parent)
        if config.get("model_type") == "moescope_spec":
            from moescope.arch.specfile import spec_to_config

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


def _hub_meta(r: ResolvedRef, env: dict[str, Any], offline: bool) -> tuple[str | None, str | None]:
    """Local paths of the repo's ``config.json`` and safetensors index (None: the repo has none).

    Raises:
        ModelNotFoundError: gated, missing repo or revision, or the hub failing.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = str(r.repo_id)
    common = {"revision": r.revision, "cache_dir": env["cache_dir"], "token": env["token"]}
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
        with ThreadPoolExecutor(max_workers=2) as pool:
            fut_cfg = pool.submit(fetch, "config.json")
            fut_idx = pool.submit(fetch, INDEX_NAME)
            return fut_cfg.result(), fut_idx.result()
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
            f"{repo}: revision {r.revision!r} not found; check the branch, tag or commit."
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelNotFoundError(
            f"{r.where}: cannot reach the hub ({str(exc).splitlines()[0]}); check the network, or run "
            "`moescope download` on a machine with network and set HF_HUB_OFFLINE=1."
        ) from None


def _hub_remote_headers(
    ck: Checkpoint, r: ResolvedRef, files: list[str], env: dict[str, Any], has_index: bool, workers: int
) -> Checkpoint:
    """Fill ``ck`` with every shard's header, fetched by range reads, all shards concurrently."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    repo = str(r.repo_id)

    def header(f: str) -> tuple[str, Inventory, int]:
        return (f, *remote_header(repo, f, r.revision, env))

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:
            results = list(pool.map(header, files))
    except EntryNotFoundError:
        if not has_index:
            ck.notes.append("the repo has no safetensors weights: counts come from config.json")
            return ck
        raise CheckpointError(f"{r.where}: a shard listed in {INDEX_NAME} is missing on the hub.") from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelNotFoundError(
            f"{r.where}: reading safetensors headers failed ({str(exc).splitlines()[0]})."
        ) from None
    for _f, tensors, read in results:
        ck.tensors.extend(tensors)
        ck.bytes_read += read
        ck.file_bytes += sum(tensors.nbytes)
    ck.files = files
    ck.notes.append(f"read {len(files)} safetensors headers from the hub (weights not downloaded)")
    return ck


def _from_hub(r: ResolvedRef, workers: int = 64) -> Checkpoint:
    env = hub_env()
    where = r.where
    # offline, or the hub unreachable with the repo cached: files come from the cache only
    offline_why = hub_offline_reason(r.ref, r.revision, env)
    offline = offline_why is not None
    cfg_file, idx_file = _hub_meta(r, env, offline)
    if cfg_file is None:
        if offline:
            raise ModelNotFoundError(
                f"{where} is not in the HF cache at {env['cache_dir']} ({offline_why}); run "
                f"`moescope download {r.ref}` on a machine with network first."
            )
        raise ModelNotFoundError(f"{where} has no config.json; moescope needs a transformers checkpoint.")
    config = load_json(Path(cfg_file))
    snapshot = Path(cfg_file).parent
    ck = Checkpoint(r.ref, "hub", config, location=where)
    if offline and not env["offline"]:
        ck.notes.append(f"{offline_why}: read from the local HF cache")
    # no absolute paths, no `..`
    files = index_shards(snapshot, Path(idx_file)) if idx_file is not None else [SINGLE_NAME]
    # A snapshot already downloaded (moescope download) is read from the cache.
    if all((snapshot / f).exists() for f in files):
        with gc_paused():
            for tensors, n, size, _ in read_local_headers(snapshot, files):
                ck.tensors.extend(tensors)
                ck.bytes_read += n
                ck.file_bytes += size
        ck.files = files
        ck.notes.append("headers read from the local HF cache")
        return ck
    if offline:
        what = f"{offline_why} and" if env["offline"] else "the hub is unreachable and"
        ck.notes.append(f"{what} the weights are not cached: counts come from config.json")
        return ck
    return _hub_remote_headers(ck, r, files, env, idx_file is not None, workers)


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def open_checkpoint(
    ref: ResolvedRef | str, revision: str | None = None, *, per_shard: PerShard | None = None
) -> Checkpoint:
    """Resolve a model reference into a :class:`Checkpoint` (config + tensors from headers).

    Args:
        ref: ``demo``, a directory, a ``.safetensors`` or ``.json`` file, or a hub id
            (``org/name`` or ``org/name@revision``); see :func:`resolve_ref`.
        revision: hub revision (overrides ``@rev`` in ``ref``).
        per_shard: for a local checkpoint directory, called with its config (or None) before
            the shards are read; the function it returns (if any) runs on each shard's
            tensors where that shard is parsed (see :mod:`moescope.checkpoint.shards`), and
            ``ck.shard_extras`` gets (tensor count, result) per shard. Other sources ignore it.

    Raises:
        ModelNotFoundError: nothing found under that reference.
        CheckpointError: a file exists but is truncated or malformed.
        ConfigError: the config is malformed.
    """
    r = as_ref(ref, revision)
    if r.kind == "hub":
        return _from_hub(r)
    assert r.path is not None  # local kinds always carry their path
    if r.kind == "file":
        return _from_file(r.ref, r.path)
    return _from_dir(r.ref, r.path, r.kind, per_shard)


def local_dir(ref: ResolvedRef | str, revision: str | None = None, *, download: bool = True) -> Path:
    """Resolve a model reference (``demo``, a directory, a hub id in the cache) to a directory.

    Args:
        ref: a model reference, or one already resolved (decoded once, passed down).
        revision: hub revision when ``ref`` is a string.
        download: fetch a hub model's config, tokenizer and safetensors into the HF cache when
            not cached; False: only the cache is looked at.

    Raises:
        ModelNotFoundError: nothing found (for hub ids: not downloadable / not cached).
    """
    mref = as_ref(ref, revision)
    if mref.is_local:
        path = Path(mref.path_or_id)
        if path.is_file():
            path = path.parent
        return path
    from huggingface_hub import snapshot_download

    from moescope.checkpoint.hub import PICKLE_PATTERNS

    env = hub_env()
    offline = hub_offline_reason(mref.path_or_id, mref.revision, env) is not None
    try:
        local = snapshot_download(
            mref.path_or_id,
            revision=mref.revision,
            cache_dir=env["cache_dir"],
            local_files_only=offline or not download,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"],
            ignore_patterns=PICKLE_PATTERNS,
        )
    except Exception as exc:  # hub errors come in many types; one line with the cause
        raise ModelNotFoundError(f"cannot fetch {mref.ref}: {str(exc).splitlines()[0]}") from exc
    return Path(local)
