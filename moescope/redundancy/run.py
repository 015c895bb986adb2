"""Expert-to-expert similarity per MoE layer: which experts are redundant.

Five measures, each an ``[E, E]`` matrix per layer:

- ``weights``: cosine of the experts' flattened parameters after aligning their hidden
  neurons (:mod:`moescope.redundancy.align`: the permutation of B's neurons that best matches A's, a
  linear assignment, as ``prune --method merge`` uses). Permuting an expert's neurons does
  not change what it computes, so a permuted copy scores 1 here. Unrelated random experts
  score about 0.1-0.2, not 0: the best of all permutations is a maximum.
- ``weight_raw``: the same cosine without alignment, as stored (every experts tensor whose
  first dimension is E, sliced per expert and concatenated; DBRX's packed ``[E*I, H]``
  rows reshape the same way). A permuted copy scores near 0 here. Not in the redundancy.
- ``router``: cosine of the router rows (experts the router cannot tell apart).
- ``outputs``: mean over sampled tokens of the cosine between two experts' outputs on
  the same input. Inputs are hidden states captured by a forward pre-hook at the MoE
  block input while the model reads a corpus; at most ``samples`` tokens per layer are
  kept (a seeded random subset of the tokens seen), and every expert is run on them
  through the experts module itself (``experts(x, ids=j, weights=1)``), so the
  family's own activation and layout are used (:mod:`moescope.redundancy.outputs`).
- ``coactivation``: from a trace, Jaccard overlap of the token sets two experts serve
  (``count_ab / (count_a + count_b - count_ab)``). Reported, but not part of the
  redundancy score: experts that fire together are combined, not interchangeable.

``redundancy`` of a pair is the mean of the available measures among weights, router and
outputs; a layer's redundancy score is the mean over experts of each one's highest
redundancy with any other expert (how replaceable the typical expert is), beside the
single most redundant pair. Plots are written with matplotlib's Agg backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope.corpus.packing import resolve_split, token_batches  # one packing rule (trace, eval)
from moescope.errors import TraceError
from moescope.execution.routing import expert_weight_gram, router_rows
from moescope.outdir import check_destination
from moescope.redundancy.files import write_report
from moescope.redundancy.outputs import (
    capture_hook,
    capture_inputs,
    expert_outputs,
    output_similarity,
    sample_tokens,
)
from moescope.redundancy.report import LayerSimilarity, SimilarityReport


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """Pairwise cosine of the rows of ``vectors`` (zero rows give 0, diagonal 1)."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = v / safe[:, None]
    sim = unit @ unit.T
    np.fill_diagonal(sim, 1.0)
    return np.clip(sim, -1.0, 1.0)


def cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    """Pairwise cosine from a Gram matrix of the vectors (zero vectors give 0, diagonal 1)."""
    g = np.asarray(gram, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    safe = np.where(norms > 0, norms, 1.0)
    sim = g / safe[:, None] / safe[None, :]
    np.fill_diagonal(sim, 1.0)
    return np.clip(sim, -1.0, 1.0)


def coactivation_similarity(trace: Any, layer: int, num_experts: int) -> np.ndarray:
    """Jaccard overlap of the tokens two experts serve, from a trace's coactivation.csv."""
    mat = np.zeros((num_experts, num_experts))
    load = trace.expert_load[trace.expert_load["layer"] == layer]
    counts = np.zeros(num_experts)
    counts[load["expert"].to_numpy(dtype=int)] = load["count"].to_numpy(dtype=float)
    co = trace.coactivation[trace.coactivation["layer"] == layer]
    for a, b, c in co[["expert_a", "expert_b", "count"]].itertuples(index=False):
        a, b = int(a), int(b)
        if a == b:
            continue
        union = counts[a] + counts[b] - c
        value = c / union if union > 0 else 0.0
        mat[a, b] = mat[b, a] = value
    np.fill_diagonal(mat, 1.0)
    return mat


def similarity_report(
    model: Any,
    *,
    model_ref: str = "",
    batches: Iterable[Any] | None = None,
    samples: int = 512,
    trace: Any | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    align_weights: bool = True,
) -> SimilarityReport:
    """Compute every available measure for every MoE layer of a loaded model.

    Args:
        model: a transformers model (eval mode).
        model_ref: recorded in the report.
        batches: token-id tensors for the ``outputs`` measure (None: skip it).
        samples: tokens per layer for ``outputs``.
        trace: a :class:`moescope.tracedir.files.TraceDir` for ``coactivation`` (None: skip).
        seed: seed of the sampled tokens.
        progress: called as ``progress(layers_done, layers_total)``.
        align_weights: compute the aligned ``weights`` measure (``E (E - 1) / 2`` linear
            assignments of size I per layer; off for very large models: ``weight_raw`` stays).

    Returns:
        A :class:`SimilarityReport`.

    Raises:
        NotMoEError: the model has no routed experts.
        TraceError: the trace's experts or layers do not match the model.
    """
    from moescope.execution.load import number_stacks
    from moescope.execution.routing import require_moe_sites
    from moescope.execution.stream import StreamedModel

    skeleton = model.model if isinstance(model, StreamedModel) else model
    # an encoder-decoder's two stacks, numbered as trace and prune number them
    sites = number_stacks(require_moe_sites(skeleton, model_ref or "the model"), skeleton.config)
    if trace is not None:
        layers = sorted(s.layer for s in sites)
        if trace.num_experts != sites[0].num_experts or trace.layers != layers:
            raise TraceError(
                f"{trace.path} was traced on a model with {trace.num_experts} experts in layers {trace.layers}; "
                f"{model_ref} has {sites[0].num_experts} in {layers}; re-run `moescope trace {model_ref} ...`."
            )
    if isinstance(model, StreamedModel):
        return _streamed_report(
            model, sites, model_ref, batches, samples, trace, seed, progress, align_weights
        )
    inputs = capture_inputs(model, sites, batches, samples=samples, seed=seed) if batches is not None else {}
    out = []
    for i, site in enumerate(sites):
        out.append(_layer_similarity(site, inputs.get(site.layer), trace, align_weights))
        if progress:
            progress(i + 1, len(sites))
    used = max((int(x.shape[0]) for x in inputs.values()), default=0)
    return SimilarityReport(model_ref, out, used, str(trace.path) if trace is not None else None)


def aligned_weight_similarity(experts: Any, num_experts: int, family: str | None) -> np.ndarray | None:
    """``[E, E]`` cosine of the flattened experts after neuron alignment (:mod:`moescope.redundancy.align`).

    Returns None when the experts module's layout is not one :mod:`moescope.redundancy.align` knows.
    """
    from moescope.errors import PruneError
    from moescope.redundancy.align import aligned_cosine_matrix, expert_axes, module_experts

    try:
        experts_list = module_experts(experts, num_experts, family)
        axes = expert_axes(experts_list[0], family)
    except PruneError:
        return None
    return aligned_cosine_matrix(experts_list, axes)[0]


def _layer_similarity(
    site: Any, x: Any | None, trace: Any | None, align_weights: bool = True
) -> LayerSimilarity:
    """Every measure of one MoE layer (its weights must be resident)."""
    num = site.num_experts
    ls = LayerSimilarity(site.layer, num)
    aligned = aligned_weight_similarity(site.experts, num, site.family) if align_weights else None
    if aligned is not None:
        ls.matrices["weights"] = aligned
    ls.matrices["weight_raw"] = cosine_from_gram(expert_weight_gram(site.experts, num, site.family))
    if site.family is not None:
        rows = router_rows(site.block, num, site.family)
    else:
        rows = router_rows(site.router if site.router is not None else site.block, num)
    if rows is not None:
        ls.matrices["router"] = cosine_matrix(rows)
    if x is not None and site.kind in ("fused", "dbrx", "switch", "nllb"):
        ls.matrices["outputs"] = output_similarity(expert_outputs(site.experts, x, num))
    if trace is not None:
        ls.matrices["coactivation"] = coactivation_similarity(trace, site.layer, num)
    return ls


def _streamed_report(
    sm: Any,
    sites: Sequence[Any],
    model_ref: str,
    batches: Iterable[Any] | None,
    samples: int,
    trace: Any | None,
    seed: int,
    progress: Callable[[int, int], None] | None,
    align_weights: bool = True,
) -> SimilarityReport:
    """The report of a model streamed layer by layer: each layer is measured while resident.

    The sampled inputs and the seeded subset are the in-memory path's (same batches, same
    generator consumed in layer order), so the matrices are the same.
    """
    import torch

    by_layer = {s.layer: s for s in sites}
    cap = 4 * samples
    pools: dict[int, list[Any]] = {s.layer: [] for s in sites}
    seen: dict[int, list[int]] = {s.layer: [0] for s in sites}
    handles = [s.block.register_forward_pre_hook(capture_hook(pools[s.layer], seen[s.layer], cap), with_kwargs=True) for s in sites]  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    done: list[LayerSimilarity] = []
    used = [0]

    def measure(layer: int) -> None:
        site = by_layer.get(layer)
        if site is None:
            return
        x = sample_tokens(pools[layer], gen, samples) if pools[layer] else None
        done.append(_layer_similarity(site, x, trace, align_weights))
        used[0] = max(used[0], int(x.shape[0]) if x is not None else 0)
        if progress:
            progress(len(done), len(sites))

    inputs = [{"input_ids": ids} for ids in (batches or [])]
    try:
        if inputs:
            sm.run(inputs, on_layer_done=measure)
        else:  # weights and router only: load each MoE layer once
            for layer in sorted(by_layer):
                sm.load_layer(layer)
                measure(layer)
    finally:
        for h in handles:
            h.remove()
        sm.close()
    return SimilarityReport(model_ref, done, used[0], str(trace.path) if trace is not None else None)


def similarity(
    model_ref: str,
    out: str | Path | None,
    *,
    trace: str | Path | None = None,
    corpus: str | Sequence[str] = ("demo",),
    split: str | None = None,
    samples: int = 512,
    seq_len: int = 128,
    outputs: bool = True,
    plots: bool = True,
    plot_format: str = "png",
    seed: int = 0,
    dtype: str = "auto",
    device: str = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[int, int], None] | None = None,
    max_memory: str | None = None,
    stream: bool | None = None,
    device_map: str | None = None,
    on_plan: Callable[[str], None] | None = None,
    align_weights: bool = True,
) -> SimilarityReport:
    """Load a model (and trace, corpus), compute the report, write it to ``out`` (the CLI's API).

    A model that does not fit ``max_memory`` is streamed: each MoE layer is measured while it
    is the one layer in memory (:mod:`moescope.execution.stream`).

    Args:
        model_ref: ``demo``, a checkpoint directory or a hub id.
        out: directory for tables and plots (None: write nothing).
        trace: a complete trace directory (:func:`moescope.tracedir.files.read_trace_dir`) for
            ``coactivation``.
        corpus: corpus specs for the ``outputs`` measure's sample tokens.
        split: corpus split.
        samples: tokens per layer for ``outputs``.
        seq_len: tokens per sampled sequence.
        outputs: measure ``outputs`` (runs the model on the corpus).
        plots: write heatmaps.
        plot_format: their file format, ``png``, ``svg`` or ``pdf``.
        seed: seed of the sampled tokens.
        dtype: model dtype.
        device: torch device.
        revision: hub revision.
        trust_remote_code: allow the checkpoint's own modelling code.
        progress: per-layer callback.
        max_memory: memory budget (default about 85% of what is available).
        stream: True streams, False loads whole, None decides by size.
        device_map: ``auto``: accelerate's placement.
        on_plan: receives the line saying how the model runs and why.
        align_weights: compute the aligned ``weights`` measure (see :func:`similarity_report`).

    Returns:
        The :class:`SimilarityReport`.
    """
    from moescope.checkpoint.identity import check_trace_model, fingerprint_ref
    from moescope.checkpoint.ref import resolve_ref
    from moescope.execution.plan import open_model
    from moescope.tracedir.files import read_trace_dir

    mref = resolve_ref(model_ref, revision)
    inputs = [*corpus, *([mref.path_or_id] if mref.is_local else []), *([trace] if trace else [])]
    if out is not None:
        check_destination(out, "similarity", inputs=inputs)
        if plots:
            from moescope.stats.plots import check_plot_format

            plot_format = check_plot_format(plot_format)  # before the model runs
    tr = read_trace_dir(trace) if trace is not None else None
    proven = tr is not None and check_trace_model(
        tr.summary.get("fingerprint"), fingerprint_ref(mref), str(tr.path), model_ref
    )
    if tr is not None and not proven and tr.model and tr.model != model_ref:
        from moescope.checkpoint.identity import same_model
        from moescope.checkpoint.ref import local_dir

        if not same_model(tr.model, model_ref, local_dir(mref)):
            raise TraceError(
                f"{tr.path} was traced on {tr.model}, not {model_ref}; re-run `moescope trace {model_ref} ...`."
            )
    plan, model, tokenizer = open_model(
        mref,
        revision=revision,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        max_memory=max_memory,
        stream=stream,
        device_map=device_map,
        on_plan=on_plan,
    )
    batches = None
    if outputs:
        from moescope.corpus.read import read_corpus

        specs = [corpus] if isinstance(corpus, str) else list(corpus)  # one spec: not its letters
        docs = read_corpus(specs, split=resolve_split(specs, split))
        # Enough sequences for a random subset of `samples` tokens from varied text.
        batches = list(
            token_batches(tokenizer, (d.text for d in docs), seq_len=seq_len, max_tokens=4 * samples)
        )
    report = similarity_report(
        model,
        model_ref=model_ref,
        batches=batches,
        samples=samples,
        trace=tr,
        seed=seed,
        progress=progress,
        align_weights=align_weights,
    )
    if out is not None:
        write_report(report, out, plots=plots, inputs=inputs, plot_format=plot_format)
    return report
