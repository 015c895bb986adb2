"""``prune``: score, plan, rewrite and verify in one call (what ``moescope prune`` runs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from moescope.checkpoint.ref import local_dir, resolve_ref
from moescope.errors import PruneError
from moescope.outdir import check_destination
from moescope.pruning.layout import detect_layout
from moescope.pruning.merge import (
    METHODS,
    ROUTER_RULES,
    MergeOptions,
    merge_experts,
    read_similarity,
    resolve_merge_by,
)
from moescope.pruning.plan import PrunePlan, check_trace_matches, plan_prune, resolve_keep
from moescope.pruning.score import CRITERIA, expert_scores
from moescope.pruning.source import open_checkpoint
from moescope.pruning.write import PruneResult, prune_checkpoint
from moescope.tracedir.files import read_trace_dir


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
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    method: str = "drop",
    merge_by: str | None = None,
    similarity: str | Path | None = None,
    merge_router: str = "mean",
    merge_align: bool = True,
    max_memory: str | None = None,
    stream: bool | None = None,
    device_map: str | None = None,
    on_plan: Callable[[str], None] | None = None,
) -> tuple[PrunePlan, PruneResult | None]:
    """Score, plan and (unless ``dry_run``) write and verify a pruned checkpoint.

    Args:
        model: model reference (``demo``, a directory, a hub id).
        trace: trace directory recorded on the same model (a complete trace, read by
            :func:`moescope.tracedir.files.read_trace_dir`).
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
        device: torch device of the verification reload.
        dtype: dtype of the verification reload (``auto``: the checkpoint's own).
        trust_remote_code: allow the checkpoint's own modelling code in the reload.
        progress: per-shard (and, merging, per-layer) callback.
        method: ``drop`` removes the dropped experts; ``merge`` folds each into the kept
            expert most similar to it (:mod:`moescope.pruning.merge`).
        merge_by: ``output`` (the ``outputs`` measure of ``similarity``) or ``weight`` (the
            aligned weight cosine); default ``output`` when ``similarity`` is given, else ``weight``.
        similarity: a ``moescope similarity`` output directory (for ``merge_by="output"``).
        merge_router: ``mean`` or ``kept`` (:data:`moescope.pruning.merge.ROUTER_RULES`).
        merge_align: align hidden neurons before averaging (leave on; off shows why).
        max_memory: memory budget of the verification (``--max-memory``): a pruned
            checkpoint bigger than it is verified streamed, one layer at a time.
        stream: ``True``/``False`` forces a streamed / whole verification; None decides by size.
        device_map: ``auto`` lets accelerate place the verification reload.
        on_plan: called with the line that says how the verification runs, and why.

    Returns:
        ``(plan, result)``; ``result`` is None for a dry run. With ``method="merge"`` the
        plan's ``merge`` holds the partners, weights and alignment scores (also on a dry run).

    Raises:
        PruneError, TraceError, CheckpointError, NotMoEError: see the message.
    """
    if criterion not in CRITERIA:
        raise PruneError(f"unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}.")
    merge = _merge_options(method, merge_by, similarity, merge_router, merge_align)
    if device_map is not None and stream:
        raise PruneError(
            "--stream and --device-map auto are two ways to fit a model: pass one (streaming reads each "
            "weight once per pass; accelerate re-reads offloaded weights every forward)."
        )
    if not dry_run:
        check_destination(out, "prune", inputs=[trace, model], replace=overwrite)
    tr = read_trace_dir(trace)
    mref = resolve_ref(model, revision)  # decoded once; a local reference is not resolved again
    ckpt = open_checkpoint(mref if mref.is_local and mref.kind != "file" else local_dir(mref))
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
        if merge is not None:
            sim = (
                read_similarity(merge.similarity, layout)
                if merge.similarity and merge.by == "output"
                else None
            )
            mplan, _ = merge_experts(ckpt, layout, plan, tr.expert_load, **merge.kwargs(), similarity=sim)
            plan = replace(plan, merge=mplan)
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
        verify_options={
            "device": device,
            "dtype": dtype,
            "trust_remote_code": trust_remote_code,
            "max_memory": max_memory,
            "stream": stream,
            "device_map": device_map,
            "on_plan": on_plan,
        },
        progress=progress,
        merge=merge,
    )
    return result.plan, result


def _merge_options(
    method: str, by: str | None, similarity: str | Path | None, router: str, align: bool
) -> MergeOptions | None:
    """The merge asked for (None for ``drop``), checked before any work.

    Raises:
        PruneError: an unknown method or router rule, or merge options with ``drop``.
    """
    if method not in METHODS:
        raise PruneError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}.")
    if method == "drop":
        if by is not None or similarity is not None:
            raise PruneError("--merge-by and --similarity apply to --method merge; add --method merge.")
        return None
    if router not in ROUTER_RULES:
        raise PruneError(f"unknown --merge-router {router!r}; use one of {', '.join(ROUTER_RULES)}.")
    return MergeOptions(resolve_merge_by(by, similarity), router, align, similarity)
