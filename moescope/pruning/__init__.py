"""Expert pruning in stages: score experts from a trace, plan what to keep, rewrite, verify.

1. **score** (:mod:`~moescope.pruning.score`): :func:`expert_scores` turns a trace's loads
   (:func:`read_trace`, :mod:`~moescope.pruning.tracedata`) into one score per (layer,
   expert) for a criterion (``frequency``, ``soft``, ``reap``, ``ean``, ``random``).
2. **plan** (:mod:`~moescope.pruning.plan`): :func:`plan_prune` keeps the same number of
   experts in every MoE layer, the highest-scoring ones, respecting group-limited routing;
   :func:`check_trace_matches` refuses a trace of another model.
3. **rewrite** (:mod:`~moescope.pruning.layout`, :mod:`~moescope.pruning.rewrite`): the family
   registry says where the experts live and what each tensor becomes (:func:`detect_layout`,
   :func:`plan_tensors`, :func:`updated_config`); a family-agnostic writer streams the
   safetensors shards, slicing dimension 0 by byte ranges (peak memory far below one tensor).
   With ``method="merge"`` (:mod:`~moescope.pruning.merge`), each dropped expert is instead
   folded into the kept expert most similar to it (:func:`merge_experts`): hidden neurons
   aligned (:mod:`moescope.redundancy.align`), weights averaged by routing frequency, router rows by a
   documented rule; the merged tensors of one layer at a time go through a scratch file.
4. **verify** (:mod:`~moescope.pruning.verify`): :func:`verify_checkpoint` reloads the result
   with transformers (device and dtype of your choice) and runs a forward pass, inside
   :func:`prune_checkpoint`'s temporary directory, before the output is swapped into place
   (:mod:`~moescope.pruning.write`).

:func:`prune` runs them all; it is what ``moescope prune`` calls.
"""

from __future__ import annotations

from moescope.pruning.api import prune
from moescope.pruning.card import manifest as _manifest
from moescope.pruning.card import model_card, removed_share
from moescope.pruning.layout import (
    MoELayout,
    config_num_experts,
    config_top_k,
    detect_layout,
    plan_tensors,
    prunable_family,
    updated_config,
)
from moescope.pruning.merge import (
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
from moescope.pruning.plan import (
    PrunePlan,
    check_trace_matches,
    plan_prune,
    resolve_keep,
    routing_groups,
)
from moescope.pruning.rewrite import OutTensor, rewrite_shards, row_ranges, validate_shard, write_safetensors
from moescope.pruning.score import CRITERIA, expert_scores
from moescope.pruning.source import Checkpoint, TensorInfo, open_checkpoint
from moescope.pruning.tracedata import TraceData, read_trace
from moescope.pruning.verify import verify_checkpoint
from moescope.pruning.write import (
    EXTRA_FILES,
    MANIFEST,
    PruneResult,
    _validate_experts,
    copy_extra_files,
    prune_checkpoint,
)

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
    "resolve_keep",
    "rewrite_shards",
    "routing_groups",
    "row_ranges",
    "updated_config",
    "validate_shard",
    "verify_checkpoint",
    "write_safetensors",
]
