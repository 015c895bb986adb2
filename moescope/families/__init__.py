"""The family registry: one module per Mixture-of-Experts family, looked up by ``model_type``.

Each module of this package (``mixtral.py``, ``deepseek_v3.py``, ...) defines ``FAMILY``, a
:class:`~moescope.families._base.Family` record; the registry finds them all (modules whose
name does not start with ``_``), so adding a family is one new file here plus one tiny config
in ``tests/tiny.py``, which the registry tests then build, save, account, trace and prune.

Lookups: :func:`get` (a ``model_type`` or alias, None when unknown), :func:`family_of`
(a config dict's normalised key), :func:`require` (a record, or a clear error naming what is
unknown), :func:`all_families`. Dense families need no record: :data:`DENSE_FAMILIES` lists
the ones moescope knows to be dense (the fallback for anything else is a warning, not a guess).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from moescope.errors import NotMoEError
from moescope.families._base import (
    ADAPTERS,
    EXPERT_COUNT_KEYS,
    LAYER_COUNT_KEYS,
    LAYER_RE,
    PER_EXPERT_RE,
    Attention,
    Family,
    Fields,
    Hooks,
    Layers,
    Placement,
    Reader,
    Routing,
    Tensors,
    get,
    layer_of,
)

__all__ = [
    "ADAPTERS",
    "DENSE_FAMILIES",
    "DENSE_TIED_BY_DEFAULT",
    "EXPERT_COUNT_KEYS",
    "LAYER_COUNT_KEYS",
    "LAYER_RE",
    "PER_EXPERT_RE",
    "Attention",
    "Family",
    "Fields",
    "Hooks",
    "Layers",
    "Placement",
    "Reader",
    "Routing",
    "Tensors",
    "all_families",
    "family_of",
    "get",
    "layer_of",
    "lookup",
    "moe_family_names",
    "require",
    "text_config",
]

#: dense families moescope knows (no record needed: nothing routes)
DENSE_FAMILIES = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gpt2",
        "gemma",
        "gemma2",
        "phi3",
        "olmo",
        "olmo2",
        "granite",
        "gpt_neox",
        "falcon",
        "starcoder2",
    }
)

#: dense families whose config classes default tie_word_embeddings to True
DENSE_TIED_BY_DEFAULT = frozenset({"gpt2", "gemma", "gemma2"})


@functools.cache
def _registry() -> tuple[dict[str, Family], dict[str, str]]:
    """Import every family module once: (name -> record, alias -> name)."""
    records: dict[str, Family] = {}
    aliases: dict[str, str] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        record = getattr(module, "FAMILY", None)
        if not isinstance(record, Family) or record.name != info.name:
            raise RuntimeError(f"{module.__name__} must define FAMILY = Family(name={info.name!r}, ...)")
        records[record.name] = record
        for alias in record.aliases:
            aliases[alias] = record.name
    return records, aliases


def all_families() -> list[Family]:
    """Every registered family, by name."""
    records, _ = _registry()
    return [records[name] for name in sorted(records)]


def moe_family_names() -> tuple[str, ...]:
    """Names of the transformers MoE families (moescope's own spec format left out)."""
    return tuple(f.name for f in all_families() if f.config_class is not None)


def lookup(model_type: str | None) -> Family | None:
    """The record for a ``model_type`` or one of its aliases (case-insensitive), or None."""
    if not isinstance(model_type, str):
        return None
    records, aliases = _registry()
    key = model_type.lower()
    return records.get(aliases.get(key, key))


def family_of(cfg: dict[str, Any]) -> str:
    """Normalised family key of a config dict (``kimi_k2`` -> ``deepseek_v3``).

    A config with no ``model_type`` whose architecture is a DeepSeek class reads as
    ``deepseek_v3`` (some remote-code checkpoints omit the field).
    """
    mt = cfg.get("model_type")
    mt = mt.lower() if isinstance(mt, str) else ""
    if not mt:
        archs = cfg.get("architectures")
        if isinstance(archs, list) and archs and isinstance(archs[0], str) and "Deepseek" in archs[0]:
            mt = "deepseek_v3"
    _, aliases = _registry()
    return aliases.get(mt, mt)


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a (possibly multimodal) config."""
    tc = cfg.get("text_config")
    if isinstance(tc, dict):
        merged = dict(tc)
        merged.setdefault("model_type", cfg.get("model_type"))
        if "tie_word_embeddings" not in merged and "tie_word_embeddings" in cfg:
            merged["tie_word_embeddings"] = cfg["tie_word_embeddings"]
        return merged
    return cfg


def require(cfg: dict[str, Any], doing: str, where: str = "config.json") -> Family:
    """The record of a config's family, or an error saying why ``doing`` cannot proceed.

    Args:
        cfg: a config dict.
        doing: what needs the record, for the message (``"pruning"``).
        where: the file the config came from, for the message.

    Raises:
        NotMoEError: the family is dense, or not in the registry (its layout is unknown).
    """
    name = family_of(cfg)
    record = lookup(name)
    if record is not None:
        return record
    if name in DENSE_FAMILIES:
        raise NotMoEError(
            f"{where}: model_type {name!r} is a dense family with no routed experts; {doing} needs a MoE model."
        )
    known = ", ".join(moe_family_names())
    raise NotMoEError(
        f"{where}: model_type {name or '(none)'!r} is not a MoE family moescope knows, so its expert layout is "
        f"unknown and {doing} would have to guess; supported: {known}."
    )
