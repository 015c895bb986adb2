"""Run a MoE model over a corpus with routing hooks and write a trace directory.

What: :func:`run_trace` loads a model and reads a corpus (the built-in corpus's held-out
split by default, :func:`moescope.corpus.packing.resolve_split`); :func:`trace_model` runs an
already-loaded model over documents. Both aggregate routing online
(:class:`~moescope.tracing.reduce.Reducer`) and write the directory with
:func:`~moescope.tracing.write.write_trace_dir`, atomically
(:func:`moescope.outdir.atomic_output`).

How:

- **Packing**: :mod:`moescope.corpus.packing` (documents encoded with the tokenizer's special
  tokens and EOS, concatenated, cut into consecutive ``seq_len`` windows; the last one
  padded and masked).
- **Batches and shards**: windows are grouped ``batch_size`` at a time; batch ``b`` belongs
  to shard ``b mod n``. Every shard reads and tokenises the whole stream (cheap next to the
  forward passes) but runs only its batches, so each batch is bit-identical to the same
  batch of an unsharded run and per-batch quantities (the busiest device) merge exactly.
  Each batch is reduced with its first token's index in the stream, so capacity groups
  (``capacity_group`` consecutive tokens, :mod:`moescope.tracing.reduce`) are the same
  whatever the batch size or the shard; a whole run closes its last, short group.
- **Hooks**: :class:`moescope.execution.routing.RoutingRecorder` records each MoE layer's ids,
  weights and routed-expert output norms for one batch; the batch is reduced, then dropped.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moescope import __version__
from moescope.corpus.packing import (
    PACKING,
    PackStats,
    batched,
    collate,
    pack_windows,
    pad_token_id,
    resolve_split,
)
from moescope.errors import CorpusError, TraceError
from moescope.outdir import atomic_output, check_destination
from moescope.tracedir.files import KIND, ROUTES
from moescope.tracedir.state import CAPACITY_GROUP, TraceState
from moescope.tracing.loop import Loop, Target
from moescope.tracing.ranks import combine_ranks, current_ranks, scratch_dir
from moescope.tracing.reduce import Reducer
from moescope.tracing.routes import RoutesWriter
from moescope.tracing.write import write_trace_dir


@dataclass
class TraceResult:
    """What a trace wrote.

    Attributes:
        out_dir: the trace directory.
        tokens: traced tokens (padding excluded).
        seconds: wall time of the forward passes and aggregation.
        tokens_per_second: ``tokens / seconds``.
        layers: MoE layer indices.
        num_experts: routed experts per layer.
        top_k: experts per token.
        summary: the ``summary.json`` content.
    """

    out_dir: Path
    tokens: int
    seconds: float
    tokens_per_second: float
    layers: list[int]
    num_experts: int
    top_k: int
    summary: dict[str, Any]

    @classmethod
    def of(cls, out_dir: Path, state: TraceState, seconds: float, summary: dict[str, Any]) -> TraceResult:
        """The result of a trace that wrote ``summary`` from ``state`` in ``seconds``."""
        rate = state.tokens / seconds if seconds > 0 else 0.0
        return cls(
            out_dir, state.tokens, seconds, rate, state.layers, state.num_experts, state.top_k, summary
        )


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)``; ``"env"`` → ``($RANK, $WORLD_SIZE)``; ``None`` → ``(0, 1)``.

    Raises:
        ValueError: malformed spec or ``i`` outside ``0..n-1``.
    """
    if spec is None:
        return 0, 1
    if spec == "env":
        # torchrun / SLURM-style launchers export the rank and world size
        try:
            return parse_shard(f"{os.environ['RANK']}/{os.environ['WORLD_SIZE']}")
        except KeyError:
            raise ValueError(
                "--shard env needs RANK and WORLD_SIZE in the environment (set by torchrun)."
            ) from None
    try:
        i_s, n_s = spec.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise ValueError(f"--shard {spec!r}: expected i/n, e.g. 0/4.") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {spec!r}: need 0 <= i < n, e.g. 0/4 … 3/4.")
    return i, n


# --------------------------------------------------------------------------- the model side


def _target(model: Any, model_ref: str) -> Target:
    """The MoE sites to hook and the module to run (the encoder of an encoder-decoder).

    ``model`` may be a :class:`moescope.execution.stream.StreamedModel`: its skeleton is hooked and
    the streamer is the runner.

    Raises:
        NotMoEError: no routed experts; TraceError: a layout the trace cannot record.
    """
    from moescope.execution.routing import config_top_k, require_moe_sites

    streamer = model if _is_streamed(model) else None
    if streamer is not None:
        model = streamer.model
    sites = require_moe_sites(model, model_ref)
    runner: Any
    if model.config.is_encoder_decoder:
        # both stacks: the decoder is teacher-forced on the same text (TeacherForced); its
        # layers are numbered after the encoder's, as params and prune number them
        from moescope.execution.load import TeacherForced, number_stacks

        sites = number_stacks(sites, model.config)
        runner = model if streamer is not None else TeacherForced(model)
    else:
        runner = getattr(model, "base_model", model)
    layers = [s.layer for s in sites]
    if len(set(layers)) != len(layers):
        raise TraceError(f"{model_ref}: two MoE blocks share a layer index ({layers}); not supported.")
    n_exp = {s.num_experts for s in sites}
    if len(n_exp) != 1:
        raise TraceError(
            f"{model_ref}: MoE layers have different expert counts {sorted(n_exp)}; not supported."
        )
    top_k = config_top_k(model.config)
    if top_k is None:
        raise TraceError(f"{model_ref}: cannot tell experts per token from the config.")
    device = streamer.device if streamer is not None else next(model.parameters()).device
    return Target(streamer or runner, sites, layers, n_exp.pop(), top_k, device)


def _is_streamed(model: Any) -> bool:
    from moescope.execution.stream import StreamedModel

    return isinstance(model, StreamedModel)


def _hidden_size(config: Any) -> int | None:
    text = getattr(config, "text_config", None) or config
    for key in ("hidden_size", "d_model"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            return value
    return None


def _run_meta(model: Any, model_ref: str, settings: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The run description stored in the state (and the summary)."""
    from moescope.checkpoint.identity import checkpoint_dtype, model_fingerprint

    if _is_streamed(model):
        model = model.model
    param = next(p for p in model.parameters() if p.device.type != "meta")
    run_meta: dict[str, Any] = {
        "model": model_ref,
        "model_type": getattr(model.config, "model_type", None),
        "hidden_size": _hidden_size(model.config),
        "dtype": str(param.dtype).replace("torch.", ""),
        "device": str(param.device),
        **settings,
        "packing": PACKING,
        "shard": {"index": settings["shard"][0], "count": settings["shard"][1]},
        "moescope_version": __version__,
        "run_id": uuid.uuid4().hex,
        **meta,
    }
    name_or_path = str(getattr(model, "name_or_path", "") or "")
    if run_meta.get("fingerprint") is None and name_or_path and Path(name_or_path).is_dir():
        run_meta["fingerprint"] = model_fingerprint(name_or_path)
    run_meta.setdefault("checkpoint_dtype", checkpoint_dtype(name_or_path))
    return run_meta


# --------------------------------------------------------------------------- the loop


def _run_batches(loop: Loop, windows: Iterable[Any], batch_size: int, seq_len: int) -> str:
    """Run this shard's batches; returns the corpus fingerprint of the whole stream."""
    import torch

    from moescope.checkpoint.identity import StreamHasher
    from moescope.execution.routing import RoutingRecorder

    if _is_streamed(loop.target.runner):
        from moescope.tracing.streamed import run_batches_streamed

        return run_batches_streamed(loop, windows, batch_size, seq_len)
    reducer = Reducer(loop.state, whole=loop.shard[1] == 1)
    hasher = StreamHasher(seq_len)
    window0 = token0 = 0
    with torch.inference_mode(), RoutingRecorder(loop.target.sites) as rec:
        for b, group in enumerate(batched(windows, batch_size)):
            for w in group:
                hasher.update(w.tokens.tobytes(), w.domains.tobytes())
            start, token0 = token0, token0 + sum(len(w.tokens) for w in group)
            if b % loop.shard[1] != loop.shard[0]:
                window0 += len(group)
                continue
            batch = collate(group, loop.pad_id)
            f0 = time.perf_counter()
            rec.clear()
            loop.target.runner(
                input_ids=batch.tokens.to(loop.target.device),
                attention_mask=batch.mask.long().to(loop.target.device),
                use_cache=False,
            )
            loop.forward_s += time.perf_counter() - f0
            records = rec.records
            if any(r is None for r in records):
                raise TraceError(f"{loop.model_ref}: a MoE layer did not run in the forward pass.")
            reducer.update(records, batch.mask, batch.docs, batch.domains, token0=start)
            if loop.routes is not None:
                loop.routes.add(b, window0, batch.tokens, batch.mask, batch.docs, records, batch.domains)
            window0 += len(group)
            if loop.progress is not None:
                loop.traced += int(batch.mask.sum())
                loop.progress(loop.traced, None)
    reducer.flush()
    if loop.routes is not None:
        loop.routes.flush()
    if reducer.lacks_norms:
        loop.state.meta["lacks"] = sorted({*loop.state.meta.get("lacks", []), "out_norms"})
    return hasher.hexdigest()


def _corpus_stats(pack: PackStats, stats: Any | None) -> dict[str, Any]:
    """``corpus_stats`` of the summary: what was packed, and what the corpus reader counted."""
    read = (
        {
            "documents": stats.documents,
            "empty_documents": stats.empty_documents,
            "non_utf8_documents": stats.non_utf8_documents,
            "bytes": stats.bytes,
        }
        if stats is not None
        else {}
    )
    return {"documents_used": pack.documents, "stream_tokens": pack.tokens, **read}


def trace_model(
    model: Any,
    tokenizer: Any,
    documents: Iterable[Any],
    out_dir: str | Path,
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    shard: tuple[int, int] = (0, 1),
    save_routes: bool = False,
    plots: bool = True,
    plot_format: str = "png",
    meta: dict[str, Any] | None = None,
    corpus_stats: Any | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    model_ref: str = "model",
    inputs: Sequence[str | Path] = (),
    hidden_budget: int | None = None,
    on_start: Callable[[], None] | None = None,
    capacity_group: int = CAPACITY_GROUP,
) -> TraceResult:
    """Run ``model`` over ``documents`` with routing hooks and write a trace directory.

    ``model`` may be a :class:`moescope.execution.stream.StreamedModel` (layer-major execution; the
    sums are the in-memory run's). Under ``torchrun`` (a ``torch.distributed`` process group
    is up), rank ``r`` of ``n`` runs batches ``b mod n == r``, the sums are all-reduced and
    rank 0 alone writes ``out_dir``: the same directory a single process writes.

    Args:
        model: a loaded transformers model (eval mode) with routed experts.
        tokenizer: its tokenizer.
        documents: objects with ``text`` and ``domain`` (``moescope.corpus.read.Document``).
        out_dir: trace directory to create (replaced if it already holds a trace).
        seq_len: tokens per window; None: 512, or the model's context when shorter.
        batch_size: windows per forward pass.
        max_tokens: stop after this many stream tokens (all shards count the same stream).
        shard: ``(i, n)``: run only batches ``b`` with ``b mod n == i``.
        save_routes: also write per-token routes as Parquet under ``routes/``.
        plots: write ``plots/*.png``.
        plot_format: ``png``, ``svg`` or ``pdf``: the format of those plots.
        meta: extra run description stored in the state and summary.
        corpus_stats: a ``CorpusStats`` filled while ``documents`` is consumed.
        progress: called as ``progress(tokens_done, total_or_None)`` after every batch.
        model_ref: how to name the model in errors and the summary.
        inputs: paths read for this trace (checkpoint, corpus files); ``out_dir`` may not
            be one of them or an ancestor of one.
        hidden_budget: streamed runs keep at most this many bytes of hidden states
            between layers (more batches run in further passes).
        on_start: called once the model is known to be traceable, before the corpus runs.
        capacity_group: tokens per capacity group of the capacity-factor what-if
            (consecutive tokens of the stream, whatever the batch size).

    Returns:
        A :class:`TraceResult` (on ranks other than 0 of a process group: not written,
        ``summary`` empty).

    Raises:
        NotMoEError: the model has no routed experts.
        CorpusError: the corpus yields no tokens.
        OutputError: ``out_dir`` is refused (see :func:`moescope.outdir.check_destination`).
    """
    if seq_len is None:
        from moescope.corpus.packing import default_seq_len

        # windows inside the model's context: routing at positions it was never trained on
        # is not the routing it does (the demo, trained on 128 tokens, was traced at 512)
        seq_len = default_seq_len(getattr(model, "config", None))
    if seq_len < 1 or batch_size < 1:
        raise ValueError("seq_len and batch_size must be positive.")
    if plots:
        from moescope.stats.plots import check_plot_format

        plot_format = check_plot_format(plot_format)  # before the corpus runs, not after
    name_or_path = str(getattr(model, "name_or_path", "") or "")
    inputs = [*inputs, *([name_or_path] if name_or_path else [])]
    out = check_destination(out_dir, KIND, inputs=inputs)
    target = _target(model, model_ref)
    if on_start is not None:
        on_start()
    ranks = current_ranks()
    if ranks is not None and shard != (0, 1):
        raise TraceError("--shard and torchrun both split the corpus; pass only one of them.")
    if capacity_group < 1:
        raise ValueError("capacity_group must be a positive number of tokens.")
    settings = {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "max_tokens": max_tokens,
        "shard": shard,
        "capacity_group": capacity_group,
    }
    run_meta = _run_meta(model, model_ref, settings, meta or {})
    state = TraceState(
        target.layers, target.num_experts, target.top_k, meta=run_meta, capacity_group=capacity_group
    )
    writer = atomic_output(out, KIND, inputs=inputs) if ranks is None or ranks[0] == 0 else scratch_dir()
    with writer as tmp:
        loop = Loop(target, state, ranks or shard, pad_token_id(tokenizer), model_ref, progress=progress)
        loop.hidden_budget = hidden_budget
        if save_routes:
            loop.routes = RoutesWriter(tmp / ROUTES, target.layers, target.top_k, domains=state.domains)
        windows = pack_windows(
            documents,
            tokenizer,
            seq_len,
            max_tokens=max_tokens,
            domain_index=state.domain_index,
            stats=loop.pack,
        )
        t0 = time.perf_counter()
        fingerprint = _run_batches(loop, windows, batch_size, seq_len)
        seconds = time.perf_counter() - t0
        if loop.pack.tokens == 0:
            raise CorpusError(
                "the corpus produced no tokens (all documents empty?); pass a non-empty corpus."
            )
        state.meta["corpus_fingerprint"] = fingerprint
        state.meta["corpus_stats"] = _corpus_stats(loop.pack, corpus_stats)
        timings = {"trace_seconds": seconds, "forward_seconds": loop.forward_s}
        if ranks is not None:
            timings = combine_ranks(state, timings, tmp / ROUTES if save_routes else None)
            if ranks[0] != 0:
                return TraceResult.of(out, state, seconds, {})
        summary = write_trace_dir(tmp, state, timings=timings, plots=plots, plot_format=plot_format)
    return TraceResult.of(out, state, seconds, summary)


def run_trace(
    model_ref: str,
    corpus: str | Sequence[str],
    out_dir: str | Path,
    *,
    split: str | None = None,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    max_memory: str | None = None,
    stream: bool | None = None,
    device_map: str | None = None,
    on_plan: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> TraceResult:
    """Load ``model_ref``, read ``corpus`` and trace it (see :func:`trace_model` for ``kwargs``).

    The model is loaded whole when its weights fit ``max_memory`` in ``dtype``, else
    streamed layer by layer (:mod:`moescope.execution.stream`); ``stream`` forces either, and
    ``device_map="auto"`` hands placement to accelerate. Under ``torchrun`` the process
    joins the launcher's group and the ranks split the corpus (:mod:`moescope.execution.distributed`).

    Args:
        model_ref: ``demo``, a local directory or a hub id.
        corpus: corpus spec(s) for :func:`moescope.corpus.read.read_corpus`.
        out_dir: trace directory.
        split: split of the built-in corpus: ``train``, ``heldout`` or ``all``; by default
            ``heldout`` when every spec is built-in (:func:`moescope.corpus.packing.resolve_split`).
            Files ignore it.
        revision: hub revision.
        dtype: ``auto``, ``float32``, ``bfloat16``, ``float16``.
        device: torch device.
        trust_remote_code: allow a checkpoint's own modelling code.
        max_memory: memory budget (``20GiB``; accelerate's per-device form with ``device_map``).
        stream: True streams, False loads whole, None decides by size.
        device_map: ``auto``: accelerate's placement across GPUs, CPU and disk.
        on_plan: receives the one line saying how the model runs and why.
        **kwargs: passed to :func:`trace_model`.

    Returns:
        A :class:`TraceResult` (timings include model loading).

    Raises:
        NotMoEError, ModelNotFoundError, CorpusError, TraceError: see the message.
    """
    from moescope.checkpoint.identity import fingerprint_ref
    from moescope.checkpoint.ref import resolve_ref
    from moescope.corpus.read import CorpusStats, read_corpus
    from moescope.execution import distributed
    from moescope.execution.plan import HIDDEN_SHARE, load_runner, plan_execution

    stats = CorpusStats()
    specs = [corpus] if isinstance(corpus, str) else list(corpus)
    split = resolve_split(specs, split)
    mref = resolve_ref(model_ref, revision)
    inputs = [*specs, *([mref.path_or_id] if mref.is_local else [])]
    check_destination(out_dir, KIND, inputs=inputs)
    device = distributed.local_device(device)
    plan = plan_execution(
        mref,
        revision=revision,
        dtype=dtype,
        device=device,
        max_memory=max_memory,
        stream=stream,
        device_map=device_map,
    )
    if on_plan is not None and distributed.rank_world()[0] == 0:
        # said once the model is known to be traceable (a dense model's error stays one line)
        kwargs["on_start"] = lambda: on_plan(plan.message)
    docs = read_corpus(specs, split=split, stats=stats)  # bad specs fail here, before the model loads
    t0 = time.perf_counter()
    model, tokenizer = load_runner(
        mref, plan.mode, revision, dtype, device, trust_remote_code, max_memory, device_map
    )
    execution = {"mode": plan.mode, "budget": plan.budget, "model_bytes": plan.model_bytes}
    meta = {
        "corpus": specs,
        "split": split,
        "load_seconds": time.perf_counter() - t0,
        "fingerprint": fingerprint_ref(mref),
        "execution": execution,
        **kwargs.pop("meta", {}),
    }
    if plan.mode == "stream":
        kwargs.setdefault("hidden_budget", int(plan.budget * HIDDEN_SHARE))
    # --shard (env) keeps the old way: one directory per shard, `moescope merge` later
    joined = (
        distributed.process_group(device) if kwargs.get("shard", (0, 1)) == (0, 1) else nullcontext((0, 1))
    )
    with joined:
        try:
            return trace_model(
                model,
                tokenizer,
                docs,
                out_dir,
                meta=meta,
                corpus_stats=stats,
                model_ref=model_ref,
                inputs=inputs,
                **kwargs,
            )
        finally:
            if plan.mode == "stream":
                model.close()
