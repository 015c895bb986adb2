"""Write stage: build the pruned checkpoint aside, verify it there, then swap it into place.

:func:`prune_checkpoint` rewrites the shards (:mod:`moescope.pruning.rewrite`), checks the
expert numbering, copies an allow-list of tokenizer and generation files, writes the new
config, verifies the result (:mod:`moescope.pruning.verify`) *before* the swap, and writes the
model card and ``prune_manifest.json`` (the output's marker, last), all inside
:func:`moescope.outdir.atomic_output`: a failure leaves the old output or nothing.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from moescope.errors import CheckpointError
from moescope.families import PER_EXPERT_RE
from moescope.outdir import atomic_output, check_destination, resolve_output, write_json_atomic
from moescope.pruning.card import manifest as _manifest
from moescope.pruning.card import model_card, removed_share
from moescope.pruning.layout import MoELayout, plan_tensors, updated_config
from moescope.pruning.merge import MergeOptions, merge_experts, read_similarity
from moescope.pruning.plan import PrunePlan
from moescope.pruning.rewrite import INDEX_NAME, OutTensor, rewrite_shards
from moescope.pruning.source import Checkpoint
from moescope.pruning.verify import verify_checkpoint

MANIFEST = "prune_manifest.json"


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
    verify_options: dict[str, Any] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    merge: MergeOptions | None = None,
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
        verify_options: keyword arguments of :func:`verify_checkpoint` (``device``, ``dtype``,
            ``trust_remote_code``).
        progress: called as ``progress(shard, done, total)`` after each shard (and
            ``progress("layer N", done, total)`` after each merged layer).
        merge: fold the dropped experts into kept ones (:mod:`moescope.pruning.merge`) instead
            of dropping them; the result's plan carries the :class:`MergePlan`.

    Returns:
        A :class:`PruneResult`.

    Raises:
        OutputError: ``out`` is refused (see :func:`moescope.outdir.check_destination`).
        PruneError: the plan is inconsistent with the checkpoint.
        CheckpointError: the source layout is not prunable or the output fails validation.
    """
    inputs = [ckpt.path, trace_path, *([merge.similarity] if merge and merge.similarity else [])]
    check_destination(out, "prune", inputs=inputs, replace=overwrite)
    new_config, fields = updated_config(ckpt.config, plan.keep, layout.num_experts)
    per_shard = plan_tensors(ckpt, layout, plan.kept)
    sim = (
        read_similarity(merge.similarity, layout)
        if merge and merge.by == "output" and merge.similarity
        else None
    )
    verified: bool | None = None
    with atomic_output(out, "prune", inputs=inputs, replace=overwrite) as tmp:
        scratch = tmp / ".merge-scratch"
        try:
            if merge is not None:
                mplan, merged = merge_experts(
                    ckpt, layout, plan, trace_load, **merge.kwargs(), similarity=sim, scratch=scratch,
                    progress=progress,
                )  # fmt: skip
                per_shard = _substitute(per_shard, merged)
                plan = replace(plan, merge=mplan)
            weight_map, bytes_out = rewrite_shards(
                ckpt.path,
                ckpt.shards,
                per_shard,
                tmp,
                metadata=ckpt.metadata,
                indexed=(ckpt.path / INDEX_NAME).exists(),
                progress=progress,
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        _validate_experts(weight_map, layout, plan.keep)
        copied = copy_extra_files(ckpt.path, tmp, remote_code="auto_map" in ckpt.config)
        write_json_atomic(tmp / "config.json", new_config, sort_keys=True)
        check = verify_checkpoint(tmp, **(verify_options or {})) if verify else None
        verified = True if verify else None
        manifest = _manifest(ckpt, layout, plan, fields, model_ref, trace_path, trace_summary, check, copied)
        for layer, share in removed_share(trace_load, plan).items():
            manifest["layers"][str(layer)].update(share)
        (tmp / "README.md").write_text(model_card(manifest))
        write_json_atomic(tmp / MANIFEST, manifest)  # the marker, last
    bytes_in = sum(t.nbytes for t in ckpt.tensors.values())
    n_out = sum(len(v) for v in per_shard.values())
    return PruneResult(resolve_output(out), plan, bytes_in, bytes_out, n_out, fields, verified)


def _substitute(
    per_shard: dict[str, list[OutTensor]], merged: dict[str, OutTensor]
) -> dict[str, list[OutTensor]]:
    """The planned tensors with the merged ones read from the scratch file instead.

    Raises:
        CheckpointError: a merged tensor the plan does not write, or of another shape (a bug).
    """
    out: dict[str, list[OutTensor]] = {}
    seen = set()
    for shard, tensors in per_shard.items():
        out[shard] = []
        for t in tensors:
            new = merged.get(t.name, t)
            if new.shape != t.shape or new.dtype != t.dtype:
                raise CheckpointError(
                    f"merged {t.name} is {new.dtype}{list(new.shape)}, planned "
                    f"{t.dtype}{list(t.shape)}; this is a moescope bug, please report."
                )
            seen.add(t.name)
            out[shard].append(new)
    missing = sorted(set(merged) - seen)
    if missing:
        raise CheckpointError(
            f"merged tensors {missing[:3]} are not in the pruned checkpoint; this is a moescope bug."
        )
    return out


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


def _validate_experts(weight_map: dict[str, str], layout: MoELayout, keep: int) -> None:
    """Per-expert names must run 0..keep-1 with the same suffixes (a gap loads silently compacted)."""
    seen: dict[tuple[str, str], set[int]] = {}
    for name in weight_map:
        m = PER_EXPERT_RE.search(name)
        if m and "shared" not in name[: m.start()]:
            seen.setdefault((name[: m.start(2)], name[m.end() :]), set()).add(int(m.group(2)))
    for (prefix, suffix), ids in seen.items():
        if ids != set(range(keep)):
            raise CheckpointError(
                f"{prefix}*.{suffix}: experts {sorted(ids)} after pruning, expected 0..{keep - 1}."
            )
