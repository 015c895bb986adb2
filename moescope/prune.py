"""Expert pruning: score experts from a trace, choose what to keep, write a smaller checkpoint.

How it works:

1. :func:`read_trace` reads a trace directory (``summary.json``, ``expert_load.csv``,
   optional ``domain_load.csv`` and ``coactivation.csv``); it is the one place that knows
   the trace format.
2. :func:`expert_scores` turns the loads into one score per (layer, expert) for a
   criterion: ``frequency`` (tokens routed), ``soft`` (sum of gate weights), ``reap``
   (mean over routed tokens of gate x expert-output norm), ``ean`` (sum of output norms)
   or ``random`` (a seeded baseline). ``balance_domains`` normalises each domain's loads
   to sum to one per layer before averaging them, so a large domain cannot outvote a
   small one.
3. :func:`plan_prune` keeps the same number of experts in every MoE layer (the config has
   one expert count), the highest-scoring ones, and respects group-limited routing
   (deepseek ``n_group > 1``: the same number kept per group) or refuses with a reason.
4. :func:`prune_checkpoint` streams the safetensors shards tensor by tensor. The format
   is an 8-byte header length, a JSON header and raw bytes, and removing experts only
   ever slices dimension 0 (per-expert tensors are dropped or renamed, fused ``[E, ...]``
   tensors, DBRX's packed ``[E*I, H]`` rows and router rows/biases keep contiguous byte
   ranges). So the writer copies byte ranges file-to-file with a bounded buffer (the
   kernel's ``copy_file_range`` when available): peak memory stays far below one tensor,
   whatever the dtype (bf16, FP8, MXFP4 blocks). Output shards keep the input's sharding
   and names; everything is written to a temporary sibling directory and renamed into
   place, so a failure never leaves a half-written checkpoint. Each output shard is
   re-opened with ``safetensors.safe_open`` and checked against the plan.
5. :func:`verify_checkpoint` reloads the result with transformers and runs a forward pass.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moescope.errors import (
    CheckpointError,
    ModelNotFoundError,
    MoescopeError,
    NotMoEError,
    PruneError,
    TraceError,
)
from moescope.identity import check_trace_model, model_fingerprint
from moescope.outdir import atomic_output, check_destination, resolve_output, write_json_atomic

CRITERIA = ("frequency", "soft", "reap", "ean", "random")

# Config fields that hold the routed-expert count, per family (TRANSFORMERS_MOE.md).
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts")

# Files never copied from the source directory: weights are rewritten, pickles are refused.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_INDEX_NAME = "model.safetensors.index.json"
_SINGLE_NAME = "model.safetensors"
_MANIFEST = "prune_manifest.json"
_COPY_CHUNK = 64 * 2**20

# safetensors dtype -> item size, used only to order tensors for alignment.
_ITEMSIZE = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
}

# Router tensors relative to the MoE block: gate.weight, router.weight, router.bias,
# gate.e_score_correction_bias (deepseek_v3), router.layer.weight (dbrx), ...
_ROUTER_RE = re.compile(r"^(?:gate|router)(?:\.[A-Za-z_]+)?\.(?:weight|bias|e_score_correction_bias)$")
_LAYER_RE = re.compile(r"^(.*?\b(?:layers|blocks)\.(\d+)\.)(.*)$")  # dbrx: transformer.blocks.N
# Per-expert tensors: experts.{j}.rest (most families) or experts.expert_{j}.rest (switch).
_PER_EXPERT_RE = re.compile(r"^(.*\.experts\.)((?:expert_)?)(\d+)\.(.+)$")


# --------------------------------------------------------------------------- trace


@dataclass(frozen=True)
class TraceData:
    """What pruning and similarity read from a trace directory.

    Attributes:
        path: the trace directory.
        summary: ``summary.json`` as a dict.
        expert_load: ``expert_load.csv`` (``layer, expert, count, weight_sum, out_norm_sum,
            weighted_out_norm_sum``).
        domain_load: ``domain_load.csv`` (``domain, layer, expert, count, weight_sum``) or None.
        coactivation: ``coactivation.csv`` (``layer, expert_a, expert_b, count``) or None.
    """

    path: Path
    summary: dict[str, Any]
    expert_load: pd.DataFrame
    domain_load: pd.DataFrame | None
    coactivation: pd.DataFrame | None

    @property
    def model(self) -> str | None:
        """The model reference the trace was recorded on."""
        value = self.summary.get("model")
        return str(value) if value is not None else None

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer."""
        value = self.summary.get("num_experts")
        if value is None:
            return int(self.expert_load["expert"].max()) + 1
        return int(value)

    @property
    def top_k(self) -> int | None:
        """Experts per token, when the summary records it."""
        value = self.summary.get("top_k")
        return int(value) if value is not None else None

    @property
    def layers(self) -> list[int]:
        """MoE layer indices (decoder layer numbers, as in the checkpoint)."""
        for key in ("moe_layers", "layers", "moe_layer_indices"):
            value = self.summary.get(key)
            if isinstance(value, list) and value:
                return sorted(int(v) for v in value)
        return sorted(int(v) for v in self.expert_load["layer"].unique())


def read_trace(path: str | Path) -> TraceData:
    """Read a trace directory written by ``moescope trace``.

    Args:
        path: the directory passed to ``moescope trace --out``.

    Returns:
        The parsed trace.

    Raises:
        TraceError: the directory, ``summary.json`` or ``expert_load.csv`` is missing or
            malformed, or the trace is marked incomplete.
    """
    root = Path(path).expanduser()
    summary_path = root / "summary.json"
    load_path = root / "expert_load.csv"
    if not root.is_dir():
        raise TraceError(f"{root}: no such trace directory; run `moescope trace MODEL CORPUS --out {root}`.")
    for p in (summary_path, load_path):
        if not p.exists():
            raise TraceError(f"{root} has no {p.name}; it is not a complete trace, re-run `moescope trace`.")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        raise TraceError(f"{summary_path}: malformed JSON ({exc.msg}); re-run `moescope trace`.") from exc
    if not isinstance(summary, dict):
        raise TraceError(f"{summary_path}: expected a JSON object; re-run `moescope trace`.")
    if summary.get("complete") is False:
        raise TraceError(f"{root}: the trace is marked incomplete (interrupted?); re-run `moescope trace`.")
    load = _read_csv(load_path, ("layer", "expert", "count"))
    for col in ("weight_sum", "out_norm_sum", "weighted_out_norm_sum"):
        if col not in load.columns:
            load[col] = np.nan
    domain = root / "domain_load.csv"
    coact = root / "coactivation.csv"
    return TraceData(
        path=root,
        summary=summary,
        expert_load=load,
        domain_load=_read_csv(domain, ("domain", "layer", "expert", "count")) if domain.exists() else None,
        coactivation=(
            _read_csv(coact, ("layer", "expert_a", "expert_b", "count")) if coact.exists() else None
        ),
    )


def _read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot parse CSV ({exc}); re-run `moescope trace`.") from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise TraceError(
            f"{path}: missing column(s) {', '.join(missing)}; it was written by another version, "
            "re-run `moescope trace`."
        )
    return frame


# --------------------------------------------------------------------------- checkpoint


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as stored in a safetensors file (header only)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    nbytes: int


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

    Raises:
        CheckpointError: no config, no safetensors weights, a missing shard, or a header
            whose offsets do not match its shapes.
    """
    from moescope.checkpoint import index_shards, load_json, read_safetensors_header, safe_child
    from moescope.validate import validate_config

    root = Path(path)
    cfg_path = root / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{root} has no config.json; pass a save_pretrained directory or a hub id.")
    config = load_json(cfg_path)
    validate_config(config, str(cfg_path))
    index = root / _INDEX_NAME
    if index.exists():
        shards = index_shards(root, index)
    elif (root / _SINGLE_NAME).exists():
        shards = [_SINGLE_NAME]
    else:
        found = sorted(p.name for p in root.glob("*.safetensors"))
        if not found:
            raise CheckpointError(
                f"{root} has no safetensors weights (pickled .bin weights are not read); convert it "
                "with save_pretrained(safe_serialization=True)."
            )
        shards = found
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, dict[str, str]] = {}
    for shard in shards:
        file = safe_child(root, shard, f"{_INDEX_NAME} shard")
        if not file.exists():
            raise CheckpointError(f"{file}: shard listed in the index is missing; download it again.")
        data_start, header = read_safetensors_header(file)
        metadata[shard] = header.pop("__metadata__", None) or {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            shape = tuple(int(s) for s in info["shape"])
            tensors[name] = TensorInfo(name, info["dtype"], shape, file, data_start + begin, end - begin)
    return Checkpoint(root, config, shards, tensors, metadata)


def _config_value(config: dict[str, Any], keys: Iterable[str]) -> tuple[dict[str, Any], str] | None:
    """Find the first of ``keys`` in the config, its ``text_config`` or dbrx's ``ffn_config``."""
    for scope in (config, config.get("text_config") or {}, config.get("ffn_config") or {}):
        for key in keys:
            if isinstance(scope, dict) and scope.get(key) is not None:
                return scope, key
    return None


def config_num_experts(config: dict[str, Any]) -> int:
    """The routed-expert count from a config dict.

    Raises:
        NotMoEError: the config has no expert-count field.
    """
    found = _config_value(config, EXPERT_COUNT_FIELDS)
    if found is None or int(found[0][found[1]]) < 2:
        raise NotMoEError(
            f"model_type {config.get('model_type')!r} has no routed experts (none of "
            f"{', '.join(EXPERT_COUNT_FIELDS)} in config.json); pruning needs a Mixture-of-Experts model."
        )
    return int(found[0][found[1]])


def config_top_k(config: dict[str, Any]) -> int:
    """Experts per token from a config dict (phimoe hard-wires 2; switch uses 1)."""
    found = _config_value(config, TOP_K_FIELDS)
    if found is not None:
        return int(found[0][found[1]])
    return 1 if config.get("model_type") == "switch_transformers" else 2


@dataclass(frozen=True)
class MoELayout:
    """Where the routed experts of one checkpoint live.

    Attributes:
        num_experts: routed experts per MoE layer.
        top_k: experts per token.
        layers: MoE layer index -> MoE block prefix (e.g. ``model.layers.3.mlp.``).
    """

    num_experts: int
    top_k: int
    layers: dict[int, str]


def detect_layout(ckpt: Checkpoint) -> MoELayout:
    """Find the MoE blocks from the tensor names: a router with E rows marks a block.

    Raises:
        NotMoEError: no expert count in the config or no router tensors.
    """
    num_experts = config_num_experts(ckpt.config)
    layers: dict[int, str] = {}
    for info in ckpt.tensors.values():
        m = _LAYER_RE.match(info.name)
        if not m or not info.shape or info.shape[0] != num_experts:
            continue
        # A router is <block>.gate.* / <block>.router.*; find the block prefix.
        rest = m.group(3)
        for marker in (".gate.", ".router."):
            pos = rest.find(marker)
            if pos >= 0 and _ROUTER_RE.match(rest[pos + 1 :]):
                layers[int(m.group(2))] = m.group(1) + rest[: pos + 1]
                break
    if not layers:
        raise NotMoEError(
            f"{ckpt.path}: no router tensors with {num_experts} rows found; this checkpoint's MoE layout "
            "is not recognised."
        )
    found = _config_value(ckpt.config, ("num_hidden_layers", "n_layers"))
    n_layers = int(found[0][found[1]]) if found else None
    mtp = sorted(i for i in layers if n_layers is not None and i >= n_layers)
    if mtp:
        # deepseek_v3-style MTP layers sit after the decoder; transformers does not build them
        # and a trace never sees them, so their experts cannot be scored.
        raise PruneError(
            f"{ckpt.path} has multi-token-prediction layers {mtp} with routed experts, which a trace "
            "cannot score; pruning checkpoints with MTP layers is not supported yet."
        )
    return MoELayout(num_experts, config_top_k(ckpt.config), dict(sorted(layers.items())))


# --------------------------------------------------------------------------- scoring and plan


def expert_scores(
    trace: TraceData, criterion: str, *, seed: int = 0, balance_domains: bool = False
) -> pd.DataFrame:
    """One score per (layer, expert): higher means more worth keeping.

    Args:
        trace: the trace to score from.
        criterion: ``frequency``, ``soft``, ``reap``, ``ean`` or ``random``.
        seed: seed of the ``random`` baseline.
        balance_domains: average per-domain normalised loads instead of pooled loads.

    Returns:
        DataFrame with columns ``layer, expert, score``, every expert of every MoE layer
        (experts the trace never saw score 0).

    Raises:
        PruneError: unknown criterion, or ``balance_domains`` without the per-domain
            columns the criterion needs.
    """
    if criterion not in CRITERIA:
        raise PruneError(f"unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}.")
    num_experts = trace.num_experts
    grid = pd.MultiIndex.from_product([trace.layers, range(num_experts)], names=["layer", "expert"])
    if criterion == "random":
        rng = np.random.default_rng(seed)
        return pd.DataFrame({"score": rng.random(len(grid))}, index=grid).reset_index()
    if balance_domains:
        if trace.domain_load is None or trace.domain_load["domain"].nunique() == 0:
            raise PruneError(
                f"{trace.path} has no domain_load.csv; --balance-domains needs a trace of a corpus with "
                "domains (e.g. the built-in `demo`)."
            )
        frame = trace.domain_load.copy()
        frame["score"] = _criterion_values(frame, criterion, where=trace.path / "domain_load.csv")
        totals = frame.groupby(["domain", "layer"])["score"].transform("sum")
        frame["score"] = (frame["score"] / totals.where(totals > 0)).fillna(0.0)
        # Average over every domain, counting an expert a domain never used as 0.
        n_domains = frame["domain"].nunique()
        pooled = frame.groupby(["layer", "expert"])["score"].sum() / n_domains
    else:
        frame = trace.expert_load.copy()
        frame["score"] = _criterion_values(frame, criterion, where=trace.path / "expert_load.csv")
        pooled = frame.groupby(["layer", "expert"])["score"].sum()
    return pd.DataFrame({"score": pooled.reindex(grid, fill_value=0.0).astype(float)}).reset_index()


def _criterion_values(frame: pd.DataFrame, criterion: str, *, where: Path) -> pd.Series:
    needs = {
        "frequency": ["count"],
        "soft": ["weight_sum"],
        "reap": ["weighted_out_norm_sum", "count"],
        "ean": ["out_norm_sum"],
    }[criterion]
    missing = [c for c in needs if c not in frame.columns or frame[c].isna().all()]
    if missing:
        raise PruneError(
            f"{where} has no {', '.join(missing)} column, which criterion {criterion!r} needs; "
            "use --criterion frequency or soft, or re-run `moescope trace` with this version."
        )
    if criterion == "frequency":
        return frame["count"].astype(float)
    if criterion == "soft":
        return frame["weight_sum"].astype(float)
    if criterion == "ean":
        return frame["out_norm_sum"].astype(float)
    count = frame["count"].astype(float)
    return (frame["weighted_out_norm_sum"].astype(float) / count.where(count > 0)).fillna(0.0)


@dataclass(frozen=True)
class PrunePlan:
    """Which experts each MoE layer keeps.

    Attributes:
        criterion: scoring criterion used.
        num_experts: experts per layer before pruning.
        keep: experts per layer after pruning (the same in every layer).
        top_k: experts per token.
        kept: layer -> sorted kept expert ids (old numbering; new id = position).
        scores: layer -> one score per old expert id.
        n_group: routing groups respected (1 when routing is not group-limited).
        seed: seed of the ``random`` criterion.
        balance_domains: whether scores were averaged over domains.
    """

    criterion: str
    num_experts: int
    keep: int
    top_k: int
    kept: dict[int, list[int]]
    scores: dict[int, list[float]]
    n_group: int = 1
    seed: int = 0
    balance_domains: bool = False

    def records(self) -> list[dict[str, Any]]:
        """One record per (layer, expert): ``layer, expert, score, rank, action, new_expert``."""
        out: list[dict[str, Any]] = []
        for layer, scores in self.scores.items():
            order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
            rank = {e: i + 1 for i, e in enumerate(order)}
            kept = self.kept[layer]
            for expert in range(len(scores)):
                keep = expert in kept
                out.append(
                    {
                        "layer": layer,
                        "expert": expert,
                        "score": float(scores[expert]),
                        "rank": rank[expert],
                        "action": "keep" if keep else "drop",
                        "new_expert": kept.index(expert) if keep else None,
                    }
                )
        return out


def resolve_keep(num_experts: int, *, drop: int | None, keep: int | None, ratio: float | None) -> int:
    """Experts to keep per layer from exactly one of ``drop``, ``keep`` or ``ratio``.

    ``ratio`` is the fraction of experts to drop (0.25 drops a quarter), rounded to the
    nearest whole expert.

    Raises:
        PruneError: none or several given, or a value out of range.
    """
    given = [v is not None for v in (drop, keep, ratio)]
    if sum(given) != 1:
        raise PruneError("pass exactly one of --drop N, --keep N or --ratio R.")
    if drop is not None:
        result = num_experts - drop
    elif keep is not None:
        result = keep
    else:
        assert ratio is not None
        if not 0.0 < ratio < 1.0:
            raise PruneError(f"--ratio {ratio} is out of range; pass the fraction to drop, between 0 and 1.")
        result = num_experts - int(round(ratio * num_experts))
    if result >= num_experts:
        raise PruneError(f"keeping {result} of {num_experts} experts drops nothing; drop at least one.")
    if result < 1:
        raise PruneError(f"cannot keep {result} experts per layer (the model has {num_experts}).")
    return result


def routing_groups(config: dict[str, Any]) -> tuple[int, int, bool]:
    """``(n_group, topk_group, needs_two_per_group)`` for group-limited routing, else ``(1, 1, False)``.

    deepseek_v3-style routing scores a group by the sum of its top two experts, so a
    group must keep at least two; deepseek_v2 limits groups only with
    ``topk_method='group_limited_greedy'``.
    """
    found = _config_value(config, ("n_group",))
    n_group = int(found[0]["n_group"]) if found else 1
    if n_group <= 1:
        return 1, 1, False
    scope = found[0] if found else config
    if config.get("model_type") == "deepseek_v2" and scope.get("topk_method") != "group_limited_greedy":
        return 1, 1, False
    topk_group = int(scope.get("topk_group") or 1)
    return n_group, topk_group, config.get("model_type") != "deepseek_v2"


def plan_prune(
    scores: pd.DataFrame,
    *,
    num_experts: int,
    top_k: int,
    keep: int,
    criterion: str,
    config: dict[str, Any] | None = None,
    seed: int = 0,
    balance_domains: bool = False,
) -> PrunePlan:
    """Keep the ``keep`` highest-scoring experts in every layer (ties: lower id first).

    With group-limited routing (``n_group > 1``) each group keeps ``keep / n_group``
    experts, so group membership survives renumbering.

    Raises:
        PruneError: ``keep < top_k``, or group-limited routing cannot stay consistent.
    """
    if keep < top_k:
        raise PruneError(
            f"cannot keep {keep} experts per layer: each token uses top_k={top_k}; keep at least {top_k}."
        )
    n_group, topk_group, two_per_group = routing_groups(config or {})
    if n_group > 1:
        if num_experts % n_group:
            raise PruneError(f"{num_experts} experts do not split into n_group={n_group} groups.")
        if keep % n_group:
            raise PruneError(
                f"group-limited routing (n_group={n_group}) needs the kept count divisible by {n_group}; "
                f"keep {keep - keep % n_group} or {keep + n_group - keep % n_group} instead of {keep}."
            )
        per_group = keep // n_group
        if topk_group * per_group < top_k or (two_per_group and per_group < 2):
            raise PruneError(
                f"keeping {keep} experts leaves {per_group} per group; with topk_group={topk_group} a token "
                f"could not reach top_k={top_k}"
                + (" (and a group needs 2 to be scored)" if two_per_group else "")
                + "; keep more experts."
            )
    kept: dict[int, list[int]] = {}
    per_layer: dict[int, list[float]] = {}
    for layer, group in scores.groupby("layer", sort=True):
        values = group.set_index("expert")["score"].reindex(range(num_experts), fill_value=0.0)
        vals = [float(v) for v in values.to_numpy()]
        per_layer[int(layer)] = vals
        size = num_experts // n_group
        chosen: list[int] = []
        for g in range(n_group):
            members = range(g * size, (g + 1) * size)
            ranked = sorted(members, key=lambda e: (-vals[e], e))
            chosen.extend(ranked[: keep // n_group])
        kept[int(layer)] = sorted(chosen)
    return PrunePlan(criterion, num_experts, keep, top_k, kept, per_layer, n_group, seed, balance_domains)


def check_trace_matches(trace: TraceData, ckpt: Checkpoint, layout: MoELayout, model_ref: str) -> None:
    """Refuse a trace recorded on another model: compare experts, top-k, layers, name.

    Raises:
        TraceError: with the field that differs and the fix.
    """
    fix = f"re-run `moescope trace {model_ref} CORPUS --out DIR` and prune with that trace."
    if trace.num_experts != layout.num_experts:
        raise TraceError(
            f"{trace.path} was traced on a model with {trace.num_experts} experts, {model_ref} has "
            f"{layout.num_experts}; {fix}"
        )
    if trace.top_k is not None and trace.top_k != layout.top_k:
        raise TraceError(f"{trace.path} has top_k={trace.top_k}, {model_ref} has {layout.top_k}; {fix}")
    if trace.layers != list(layout.layers):
        raise TraceError(
            f"{trace.path} covers MoE layers {trace.layers}, {model_ref} has {list(layout.layers)}; {fix}"
        )
    bad = trace.expert_load[
        (trace.expert_load["expert"] < 0) | (trace.expert_load["expert"] >= layout.num_experts)
    ]
    if len(bad):
        raise TraceError(
            f"{trace.path}/expert_load.csv names expert {int(bad['expert'].iloc[0])}, outside 0..."
            f"{layout.num_experts - 1}; {fix}"
        )
    traced_type = trace.summary.get("model_type")
    if traced_type and traced_type != ckpt.model_type:
        raise TraceError(f"{trace.path} is a {traced_type} trace, {model_ref} is {ckpt.model_type}; {fix}")
    if check_trace_model(
        trace.summary.get("fingerprint"), model_fingerprint(ckpt.path), str(trace.path), model_ref
    ):
        return
    if trace.model and not same_model(trace.model, model_ref, ckpt.path):
        raise TraceError(f"{trace.path} was traced on {trace.model}, not {model_ref}; {fix}")


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


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]  # (absolute offset, length) in the source file

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.ranges)


def _row_ranges(info: TensorInfo, groups: int, kept: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Byte ranges of the kept slabs when dim 0 splits into ``groups`` equal slabs."""
    if info.nbytes % groups:
        raise CheckpointError(f"{info.name}: {info.nbytes} bytes do not split into {groups} experts.")
    slab = info.nbytes // groups
    merged: list[list[int]] = []
    for j in kept:
        start = info.start + j * slab
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1][1] += slab
        else:
            merged.append([start, slab])
    return tuple((s, n) for s, n in merged)


def plan_tensors(
    ckpt: Checkpoint, layout: MoELayout, kept: dict[int, list[int]]
) -> dict[str, list[_OutTensor]]:
    """Map every input tensor to its output (renamed, sliced or dropped), per shard.

    Raises:
        PruneError: a kept expert id is unknown or the plan misses a MoE layer.
        CheckpointError: an experts tensor whose first dimension does not match E.
    """
    num = layout.num_experts
    for layer in layout.layers:
        if layer not in kept:
            raise PruneError(f"no kept experts given for MoE layer {layer}.")
    for layer, ids in kept.items():
        if layer not in layout.layers:
            raise PruneError(f"layer {layer} is not a MoE layer (MoE layers: {list(layout.layers)}).")
        bad = [j for j in ids if not 0 <= j < num]
        if bad or len(set(ids)) != len(ids):
            raise PruneError(
                f"layer {layer}: unknown or repeated expert ids {bad or ids}; ids run 0..{num - 1}."
            )
    counts = {len(v) for v in kept.values()}
    if len(counts) != 1:
        raise PruneError(f"every layer must keep the same number of experts, got {sorted(counts)}.")
    out: dict[str, list[_OutTensor]] = {s: [] for s in ckpt.shards}
    for info in ckpt.tensors.values():
        shard = info.file.name
        m = _LAYER_RE.match(info.name)
        layer = int(m.group(2)) if m else -1
        block = layout.layers.get(layer)
        if block is None or not info.name.startswith(block):
            out[shard].append(_OutTensor(info.name, info.dtype, info.shape, ((info.start, info.nbytes),)))
            continue
        ids = sorted(kept[layer])
        rel = info.name[len(block) :]
        per = _PER_EXPERT_RE.match(info.name)
        if per and per.group(1).startswith(block) and "shared" not in per.group(1)[len(block) :]:
            j = int(per.group(3))
            if j >= num:
                raise CheckpointError(f"{info.name}: expert {j} but the config has {num} experts.")
            if j in ids:
                new = f"{per.group(1)}{per.group(2)}{ids.index(j)}.{per.group(4)}"
                out[shard].append(_OutTensor(new, info.dtype, info.shape, ((info.start, info.nbytes),)))
            continue
        is_router = bool(_ROUTER_RE.match(rel))
        in_experts = rel.startswith("experts.")
        if "shared" in rel.split(".")[0] or not (is_router or in_experts or len(info.shape) >= 3):
            out[shard].append(_OutTensor(info.name, info.dtype, info.shape, ((info.start, info.nbytes),)))
            continue
        if not info.shape:
            raise CheckpointError(f"{info.name}: scalar inside the experts; this layout is not supported.")
        rows = info.shape[0]
        if rows == num:
            shape = (len(ids), *info.shape[1:])
            out[shard].append(_OutTensor(info.name, info.dtype, shape, _row_ranges(info, num, ids)))
        elif in_experts and rows % num == 0:
            # DBRX packs experts as [E*I, H] rows: expert j owns rows j*I..(j+1)*I.
            shape = (len(ids) * (rows // num), *info.shape[1:])
            out[shard].append(_OutTensor(info.name, info.dtype, shape, _row_ranges(info, num, ids)))
        elif is_router or in_experts:
            raise CheckpointError(
                f"{info.name} has shape {list(info.shape)}, first dimension not the {num} experts; "
                "this checkpoint layout is not supported for pruning."
            )
        else:
            out[shard].append(_OutTensor(info.name, info.dtype, info.shape, ((info.start, info.nbytes),)))
    return out


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` of fd ``src`` to the current position of fd ``dst``."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < length:
        n = min(_COPY_CHUNK, length - done)
        if use_kernel:
            try:
                got = os.copy_file_range(src, dst, n, offset + done)
            except OSError:
                use_kernel = False
                continue
            if got == 0:
                raise CheckpointError("unexpected end of a source shard while copying; it is truncated.")
        else:
            data = os.pread(src, n, offset + done)
            if not data:
                raise CheckpointError("unexpected end of a source shard while copying; it is truncated.")
            got = os.write(dst, data)
        done += got


def write_safetensors(
    path: Path, tensors: Sequence[_OutTensor], metadata: dict[str, str] | None, source: Path
) -> int:
    """Stream a safetensors file from byte ranges of ``source``; returns bytes of tensor data.

    Tensors are ordered by item size (largest first), then name, so every tensor stays
    aligned to its item size, as safetensors' own writer does.
    """
    ordered = sorted(tensors, key=lambda t: (-_ITEMSIZE.get(t.dtype, 1), t.name))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for t in ordered:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    src = os.open(source, os.O_RDONLY)
    try:
        dst = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(dst, struct.pack("<Q", len(blob)) + blob)
            for t in ordered:
                for start, length in t.ranges:
                    _copy_range(src, dst, start, length)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return offset


def updated_config(config: dict[str, Any], keep: int, num_experts: int) -> tuple[dict[str, Any], list[str]]:
    """Copy of ``config`` with every routed-expert count field set to ``keep``.

    Returns:
        The new config and the dotted names of the fields changed.

    Raises:
        PruneError: no expert-count field held ``num_experts``.
    """
    new = json.loads(json.dumps(config))
    changed: list[str] = []
    for scope_name in ("", "text_config", "ffn_config"):
        scope = new if not scope_name else new.get(scope_name)
        if not isinstance(scope, dict):
            continue
        for key in EXPERT_COUNT_FIELDS:
            if scope.get(key) == num_experts:
                scope[key] = keep
                changed.append(f"{scope_name}.{key}" if scope_name else key)
    if not changed:
        raise PruneError(f"no expert-count field ({', '.join(EXPERT_COUNT_FIELDS)}) equal to {num_experts}.")
    return new, changed


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune_checkpoint` wrote.

    Attributes:
        out: the new checkpoint directory.
        plan: the plan carried out.
        bytes_in: tensor bytes read from the source.
        bytes_out: tensor bytes written.
        tensors_out: number of tensors written.
        config_fields: expert-count fields updated.
        verified: whether a reload and forward pass succeeded (None: not run).
    """

    out: Path
    plan: PrunePlan
    bytes_in: int
    bytes_out: int
    tensors_out: int
    config_fields: list[str]
    verified: bool | None = None


def prune_checkpoint(
    ckpt: Checkpoint,
    layout: MoELayout,
    plan: PrunePlan,
    out: str | Path,
    *,
    model_ref: str | None = None,
    trace_path: str | Path | None = None,
    trace_summary: dict[str, Any] | None = None,
    trace_load: pd.DataFrame | None = None,
    overwrite: bool = False,
    verify: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> PruneResult:
    """Write the pruned checkpoint to ``out``: built aside, verified there, then swapped in.

    Args:
        ckpt: the source checkpoint.
        layout: its MoE layout (from :func:`detect_layout`).
        plan: which experts each layer keeps.
        out: the new directory; must not exist (or be empty) unless ``overwrite``, and even
            then only a complete pruned checkpoint written by moescope is replaced.
        model_ref: recorded in the manifest and model card.
        trace_path: recorded in the manifest.
        trace_summary: the trace's ``summary.json`` (its fingerprint goes into the manifest).
        trace_load: the trace's ``expert_load.csv``: the share of routing the dropped experts
            carried goes into the manifest and model card.
        overwrite: replace an existing moescope prune output at ``out``.
        verify: reload the result with transformers and run a forward pass *before* it is
            swapped in (a checkpoint that fails is never put in place).
        progress: called as ``progress(shard, done, total)`` after each shard.

    Returns:
        A :class:`PruneResult`.

    Raises:
        OutputError: ``out`` is refused (see :func:`moescope.outdir.check_destination`).
        PruneError: the plan is inconsistent with the checkpoint.
        CheckpointError: the source layout is not prunable or the output fails validation.
    """
    inputs = [ckpt.path, trace_path]
    check_destination(out, "prune", inputs=inputs, replace=overwrite)
    new_config, fields = updated_config(ckpt.config, plan.keep, layout.num_experts)
    per_shard = plan_tensors(ckpt, layout, plan.kept)
    verified: bool | None = None
    with atomic_output(out, "prune", inputs=inputs, replace=overwrite) as tmp:
        weight_map: dict[str, str] = {}
        bytes_out = 0
        written = [s for s in ckpt.shards if per_shard[s]]
        for i, shard in enumerate(written):
            tensors = per_shard[shard]
            bytes_out += write_safetensors(tmp / shard, tensors, ckpt.metadata.get(shard), ckpt.path / shard)
            _validate_shard(tmp / shard, tensors)
            weight_map.update({t.name: shard for t in tensors})
            if progress:
                progress(shard, i + 1, len(written))
        _validate_experts(weight_map, layout, plan.keep)
        if (ckpt.path / _INDEX_NAME).exists() or len(written) > 1:
            index = {"metadata": {"total_size": bytes_out}, "weight_map": dict(sorted(weight_map.items()))}
            write_json_atomic(tmp / _INDEX_NAME, index)
        copied = copy_extra_files(ckpt.path, tmp, remote_code="auto_map" in ckpt.config)
        write_json_atomic(tmp / "config.json", new_config, sort_keys=True)
        check = verify_checkpoint(tmp) if verify else None
        verified = True if verify else None
        manifest = _manifest(ckpt, layout, plan, fields, model_ref, trace_path, trace_summary, check, copied)
        for layer, share in removed_share(trace_load, plan).items():
            manifest["layers"][str(layer)].update(share)
        (tmp / "README.md").write_text(model_card(manifest))
        write_json_atomic(tmp / _MANIFEST, manifest)  # the marker, last
    bytes_in = sum(t.nbytes for t in ckpt.tensors.values())
    n_out = sum(len(v) for v in per_shard.values())
    return PruneResult(resolve_output(out), plan, bytes_in, bytes_out, n_out, fields, verified)


# Files copied from the source checkpoint besides the rewritten weights and config: what a
# tokenizer and generation need. Model cards, training metrics, pickles and anything else
# are not copied (the source's card and metrics would be false for the pruned model).
EXTRA_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_REMOTE_CODE_RE = re.compile(r"^(?:configuration|modeling|tokenization)_[A-Za-z0-9_]+\.py$")


def _allowed_root(src: Path) -> Path:
    """Where files of ``src`` may really live: the directory, or its HF cache repo folder.

    Files of a hub snapshot (``…/models--org--name/snapshots/<rev>/``) are symlinks into
    the repo's ``blobs/``; anything else must stay inside the checkpoint directory.
    """
    root = src.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root.parent.parent
    return root


def copy_extra_files(src: Path, dest: Path, *, remote_code: bool = False) -> list[str]:
    """Copy the allow-listed files of ``src`` into ``dest`` (contents, never links).

    A file that is a symlink resolving outside the checkpoint (or its HF cache repo) is
    skipped with a warning: a link to a secret must not end up in a model one may share.

    Returns:
        The names copied.
    """
    allowed = _allowed_root(src)
    names = [n for n in EXTRA_FILES if (src / n).exists()]
    if remote_code:
        names += sorted(p.name for p in src.iterdir() if _REMOTE_CODE_RE.match(p.name))
    copied = []
    for name in names:
        item = src / name
        real = item.resolve()
        if not real.is_file() or not real.is_relative_to(allowed):
            print(
                f"Warning: not copying {item}: it links outside the checkpoint ({real}).",
                file=sys.stderr,
            )
            continue
        shutil.copyfile(real, dest / name)
        copied.append(name)
    return copied


def _validate_shard(path: Path, tensors: Sequence[_OutTensor]) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            keys = set(fh.keys())
            for t in tensors:
                if tuple(fh.get_slice(t.name).get_shape()) != t.shape:
                    raise CheckpointError(f"{path.name}: {t.name} was written with the wrong shape.")
    except (OSError, RuntimeError, Exception) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path.name}: written shard does not read back ({exc}).") from exc
    if keys != {t.name for t in tensors}:
        raise CheckpointError(f"{path.name}: written shard has the wrong tensor names.")


def _validate_experts(weight_map: dict[str, str], layout: MoELayout, keep: int) -> None:
    """Per-expert names must run 0..keep-1 with the same suffixes (a gap loads silently compacted)."""
    seen: dict[tuple[str, str], set[int]] = {}
    for name in weight_map:
        m = _PER_EXPERT_RE.match(name)
        if m and "shared" not in m.group(1):
            seen.setdefault((m.group(1), m.group(4)), set()).add(int(m.group(3)))
    for (prefix, suffix), ids in seen.items():
        if ids != set(range(keep)):
            raise CheckpointError(
                f"{prefix}*.{suffix}: experts {sorted(ids)} after pruning, expected 0..{keep - 1}."
            )


def _manifest(
    ckpt: Checkpoint,
    layout: MoELayout,
    plan: PrunePlan,
    fields: list[str],
    model_ref: str | None,
    trace_path: str | Path | None,
    trace_summary: dict[str, Any] | None = None,
    check: dict[str, Any] | None = None,
    copied: Sequence[str] = (),
) -> dict[str, Any]:
    from moescope import __version__

    summary = trace_summary or {}
    return {
        "tool": "moescope",
        "kind": "prune",
        "complete": True,
        "moescope_version": __version__,
        "model": model_ref or str(ckpt.path),
        "source_path": str(ckpt.path),
        "source_fingerprint": model_fingerprint(ckpt.path),
        "model_type": ckpt.model_type,
        "source_trace": str(trace_path) if trace_path else None,
        "trace_fingerprint": summary.get("fingerprint"),
        "trace_corpus": summary.get("corpus"),
        "trace_tokens": summary.get("tokens"),
        "criterion": plan.criterion,
        "seed": plan.seed if plan.criterion == "random" else None,
        "balance_domains": plan.balance_domains,
        "num_experts_before": plan.num_experts,
        "num_experts_after": plan.keep,
        "top_k": plan.top_k,
        "n_group": plan.n_group,
        "config_fields_updated": fields,
        "copied_files": list(copied),
        "verification": check,
        "layers": {
            str(layer): {
                "kept": plan.kept[layer],
                "dropped": [e for e in range(plan.num_experts) if e not in plan.kept[layer]],
                "scores": plan.scores[layer],
            }
            for layer in layout.layers
        },
    }


def removed_share(load: pd.DataFrame | None, plan: PrunePlan) -> dict[int, dict[str, float | None]]:
    """Per layer, the share of routed tokens and of gate weight that went to the dropped experts."""
    if load is None:
        return {}
    shares: dict[int, dict[str, float | None]] = {}
    for layer, kept in plan.kept.items():
        rows = load[load["layer"] == layer]
        dropped = ~rows["expert"].isin(kept)
        rec: dict[str, float | None] = {}
        for col, key in (("count", "dropped_count_share"), ("weight_sum", "dropped_weight_share")):
            total = float(rows[col].sum()) if col in rows else float("nan")
            rec[key] = float(rows.loc[dropped, col].sum()) / total if total and total == total else None
        shares[layer] = rec
    return shares


def _is_hub_id(ref: str) -> bool:
    from moescope.model import parse_model_ref

    try:
        return not parse_model_ref(ref).is_local
    except MoescopeError:
        return False


def model_card(manifest: dict[str, Any]) -> str:
    """The pruned checkpoint's README.md: base model, what was removed, how it was chosen, what was measured."""
    m = manifest
    lines = [
        "---",
        *([f"base_model: {m['model']}"] if _is_hub_id(str(m["model"])) else []),
        "tags:",
        "  - moescope",
        "  - pruned",
        "  - mixture-of-experts",
        "---",
        "",
        f"# {m['model']}, pruned to {m['num_experts_after']} of {m['num_experts_before']} experts per layer",
        "",
        f"Written by moescope {m['moescope_version']} (`moescope prune`). The experts each MoE layer kept and",
        "dropped are listed below and in `prune_manifest.json`. This card replaces the base model's: its",
        "figures (benchmarks, training metrics) were measured on the unpruned model and do not hold here.",
        "",
        f"- base model: `{m['model']}` ({m['model_type']}), fingerprint `{m['source_fingerprint']}`",
        f"- criterion: `{m['criterion']}`"
        + (f" (seed {m['seed']})" if m.get("seed") is not None else "")
        + (", domains balanced" if m.get("balance_domains") else ""),
        f"- trace: `{m['source_trace']}` over {m.get('trace_tokens') or '?'} tokens of "
        f"{m.get('trace_corpus') or '?'}, fingerprint `{m.get('trace_fingerprint')}`",
        f"- experts per token (top-k): {m['top_k']}; config fields updated: {', '.join(m['config_fields_updated'])}",
    ]
    check = m.get("verification")
    if check:
        lines.append(
            f"- verified: reloaded with transformers ({check['parameters']:,} parameters) and ran a forward "
            "pass with finite logits"
        )
    else:
        lines.append("- verified: not run (`--no-verify`)")
    lines += [
        "",
        "## Measured on the trace",
        "",
        "Share of the trace's routing that went to the dropped experts (what the pruned model must do without):",
        "",
        "| layer | dropped experts | routed tokens share | gate weight share |",
        "|---|---|---|---|",
    ]
    for layer, rec in m["layers"].items():
        tok = rec.get("dropped_count_share")
        wgt = rec.get("dropped_weight_share")
        lines.append(
            f"| {layer} | {', '.join(map(str, rec['dropped'])) or '-'} | "
            f"{'-' if tok is None else f'{tok:.2%}'} | {'-' if wgt is None else f'{wgt:.2%}'} |"
        )
    lines += [
        "",
        "Quality on text is not measured by `prune`; compare perplexities with",
        f"`moescope eval {m['model']} CORPUS` and `moescope eval THIS_DIR CORPUS`.",
        "",
    ]
    return "\n".join(lines) + "\n"


def verify_checkpoint(path: str | Path, *, tokens: int = 8) -> dict[str, Any]:
    """Reload a checkpoint with transformers and run one forward pass.

    Returns:
        ``{"parameters": int, "logits_shape": [...], "num_experts": int}``.

    Raises:
        CheckpointError: missing or unexpected keys, a load failure, or non-finite logits.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # stderr stays quiet in --json runs
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, output_loading_info=True
        )
    except Exception as exc:  # transformers raises many types; report the first line
        raise CheckpointError(f"{path}: transformers cannot load the pruned checkpoint: {exc}") from exc
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise CheckpointError(
            f"{path}: pruned checkpoint loads with {bad}; this is a moescope bug, please report."
        )
    vocab = int(model.config.get_text_config().vocab_size)
    ids = (torch.arange(tokens) * 7 + 3) % vocab
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits
    if not torch.isfinite(logits).all():
        raise CheckpointError(f"{path}: the pruned model's logits are not finite.")
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "logits_shape": list(logits.shape),
        "num_experts": config_num_experts(json.loads((Path(path) / "config.json").read_text())),
    }


def prune(
    model: str,
    trace: str | Path,
    out: str | Path,
    *,
    drop: int | None = None,
    keep: int | None = None,
    ratio: float | None = None,
    criterion: str = "reap",
    seed: int = 0,
    balance_domains: bool = False,
    dry_run: bool = False,
    verify: bool = True,
    overwrite: bool = False,
    revision: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[PrunePlan, PruneResult | None]:
    """Score, plan and (unless ``dry_run``) write and verify a pruned checkpoint.

    Args:
        model: model reference (``demo``, a directory, a hub id).
        trace: trace directory recorded on the same model.
        out: output directory.
        drop: experts to drop per layer.
        keep: experts to keep per layer.
        ratio: fraction of experts to drop per layer.
        criterion: one of :data:`CRITERIA`.
        seed: seed for ``random``.
        balance_domains: average per-domain normalised loads.
        dry_run: plan only; write nothing.
        verify: reload the result with transformers and run a forward pass.
        overwrite: replace an existing ``out``.
        revision: hub revision.
        progress: per-shard callback.

    Returns:
        ``(plan, result)``; ``result`` is None for a dry run.

    Raises:
        PruneError, TraceError, CheckpointError, NotMoEError: see the message.
    """
    if criterion not in CRITERIA:
        raise PruneError(f"unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}.")
    if not dry_run:
        check_destination(out, "prune", inputs=[trace, model], replace=overwrite)
    tr = read_trace(trace)
    ckpt = open_checkpoint(resolve_checkpoint_dir(model, revision))
    layout = detect_layout(ckpt)
    check_trace_matches(tr, ckpt, layout, model)
    n_keep = resolve_keep(layout.num_experts, drop=drop, keep=keep, ratio=ratio)
    scores = expert_scores(tr, criterion, seed=seed, balance_domains=balance_domains)
    plan = plan_prune(
        scores,
        num_experts=layout.num_experts,
        top_k=layout.top_k,
        keep=n_keep,
        criterion=criterion,
        config=ckpt.config,
        seed=seed,
        balance_domains=balance_domains,
    )
    if dry_run:
        return plan, None
    result = prune_checkpoint(
        ckpt,
        layout,
        plan,
        out,
        model_ref=model,
        trace_path=tr.path,
        trace_summary=tr.summary,
        trace_load=tr.expert_load,
        overwrite=overwrite,
        verify=verify,
        progress=progress,
    )
    return plan, result
