"""Expert pruning in stages: score experts from a trace, plan what to keep, rewrite, verify.

1. **score** (:mod:`~moescope.prune.score`): :func:`expert_scores` turns a trace's loads
   (:func:`read_trace`, :mod:`~moescope.prune.tracedata`) into one score per (layer,
   expert) for a criterion (``frequency``, ``soft``, ``reap``, ``ean``, ``random``).
2. **plan** (:mod:`~moescope.prune.plan`): :func:`plan_prune` keeps the same number of
   experts in every MoE layer, the highest-scoring ones, respecting group-limited routing;
   :func:`check_trace_matches` refuses a trace of another model.
3. **rewrite** (:mod:`~moescope.prune.layout`, :mod:`~moescope.prune.rewrite`): the family
   registry says where the experts live and what each tensor becomes (:func:`detect_layout`,
   :func:`plan_tensors`, :func:`updated_config`); a family-agnostic writer streams the
   safetensors shards, slicing dimension 0 by byte ranges (peak memory far below one tensor).
   With ``method="merge"`` (:mod:`~moescope.prune.merge`), each dropped expert is instead
   folded into the kept expert most similar to it (:func:`merge_experts`): hidden neurons
   aligned (:mod:`moescope.align`), weights averaged by routing frequency, router rows by a
   documented rule; the merged tensors of one layer at a time go through a scratch file.
4. **verify** (:mod:`~moescope.prune.verify`): :func:`verify_checkpoint` reloads the result
   with transformers (device and dtype of your choice) and runs a forward pass, inside
   :func:`prune_checkpoint`'s temporary directory, before the output is swapped into place
   (:mod:`~moescope.prune.write`).

:func:`prune` runs them all; it is what ``moescope prune`` calls.
"""

from __future__ import annotations

from moescope.prune.api import prune
from moescope.prune.card import manifest as _manifest
from moescope.prune.card import model_card, removed_share
from moescope.prune.layout import (
    MoELayout,
    config_num_experts,
    config_top_k,
    detect_layout,
    plan_tensors,
    prunable_family,
    updated_config,
)
from moescope.prune.merge import (
    MERGE_BY,
    METHODS,
    ROUTER_RULES,
    Member,
    MergeGroup,
    MergeOptions,
    MergePlan,
    merge_experts,
    read_similarity,
)
from moescope.prune.plan import (
    PrunePlan,
    check_trace_matches,
    plan_prune,
    resolve_keep,
    routing_groups,
    same_model,
)
from moescope.prune.rewrite import OutTensor, rewrite_shards, row_ranges, validate_shard, write_safetensors
from moescope.prune.score import CRITERIA, expert_scores
from moescope.prune.source import Checkpoint, TensorInfo, open_checkpoint, resolve_checkpoint_dir
from moescope.prune.tracedata import TraceData, read_trace
from moescope.prune.verify import verify_checkpoint
from moescope.prune.write import (
    EXTRA_FILES,
    MANIFEST,
    PruneResult,
    _validate_experts,
    copy_extra_files,
    prune_checkpoint,
)

# Names the tests and benchmarks reach for (kept from the single-module version).
_OutTensor = OutTensor
_row_ranges = row_ranges
_validate_shard = validate_shard

__all__ = [
    "CRITERIA",
    "EXTRA_FILES",
    "MANIFEST",
    "MERGE_BY",
    "METHODS",
    "ROUTER_RULES",
    "Member",
    "MergeGroup",
    "MergeOptions",
    "MergePlan",
    "Checkpoint",
    "MoELayout",
    "OutTensor",
    "PrunePlan",
    "PruneResult",
    "TensorInfo",
    "TraceData",
    "_manifest",
    "_validate_experts",
    "check_trace_matches",
    "config_num_experts",
    "config_top_k",
    "copy_extra_files",
    "detect_layout",
    "expert_scores",
    "merge_experts",
    "model_card",
    "open_checkpoint",
    "plan_prune",
    "plan_tensors",
    "prunable_family",
    "prune",
    "prune_checkpoint",
    "read_trace",
    "read_similarity",
    "removed_share",
    "resolve_checkpoint_dir",
    "resolve_keep",
    "rewrite_shards",
    "routing_groups",
    "row_ranges",
    "same_model",
    "updated_config",
    "validate_shard",
    "verify_checkpoint",
    "write_safetensors",
]
