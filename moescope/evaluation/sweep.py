"""Quality versus compute as routing changes: perplexity, experts per token and FLOPs per setting.

What: :func:`sweep` loads a model once and measures, for each routing setting, held-out
perplexity overall and per domain (exactly as :func:`moescope.evaluation.perplexity.evaluate` does:
same packing, split, windows and batches), the mean number of experts each token actually
took (per MoE layer, and overall), and the active parameters and FLOPs per token that
number implies. The model's own routing (``native``) is always measured first, with no
override, so its numbers equal ``moescope eval``'s; the other settings run under
:class:`moescope.evaluation.override.RoutingOverride`.

Settings (:func:`parse_settings`):

- ``top_k``: ``"1,2,4"`` (one setting per value, every MoE layer alike) or a per-layer
  setting ``"0-11:1,12-:2"`` (inclusive layer ranges in the checkpoint's numbering, ``A-``
  open-ended; MoE layers no range names keep the native k). Several per-layer settings:
  pass a list, or separate them with ``;``.
- ``top_p``: ``"0.5,0.9"``, or per layer in the same form (``"0-1:0.5,2-:0.9"``).
- Neither: ``k`` in {1, native/2, native, 2 x native}, capped at the experts a token can
  choose from.

Accounting: the same as :func:`moescope.accounting.params.account` (``moescope params``), with each MoE
layer's k replaced by the mean experts per token measured there: routed-expert parameters x
(1 - k_l / E) are left out of ``active_params``, and the routed matmul FLOPs scale by
k_l / E. At the native setting the figures equal ``moescope params`` (``context`` keys
for the attention term, 4096 by default). :func:`moescope.evaluation.sweep_plot.write_plot` draws perplexity versus FLOPs
per token with the native setting marked.

Modules: :mod:`moescope.evaluation.settings` (parsing, checks), :mod:`moescope.evaluation.sweep_plot`
(the figure), :mod:`moescope.evaluation.override` (the routing overrides themselves).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from moescope.errors import NotMoEError
from moescope.evaluation.override import RoutingOverride, RoutingSettingError
from moescope.evaluation.settings import (
    Setting,
    candidates_of,
    default_settings,
    labels,
    parse_settings,
    validate_settings,
)

__all__ = [
    "RoutingSettingError",
    "Setting",
    "SweepRecord",
    "SweepResult",
    "default_settings",
    "parse_settings",
    "sweep",
]

# --------------------------------------------------------------------------- accounting


@dataclass
class _Accounting:
    """``moescope params`` figures as a function of each MoE layer's experts per token."""

    active: int
    active_no_embedding: int
    flops: int
    num_experts: int
    native_k: int
    routed: dict[int, int]
    routed_matmul: dict[int, int]

    @classmethod
    def of(cls, ck: Any, context: int) -> tuple[_Accounting, Any]:
        """The accounting of an opened checkpoint, and its ``MoESpec``."""
        from moescope.accounting import params as pm

        ref = ck.ref
        report = pm.account(ck, context)
        if not report.is_moe:
            raise NotMoEError(f"{ref} ({report.model_type}) has no routed experts; nothing to sweep.")
        _cfg, spec, tensors, where, _notes = pm._resolve(ck)
        acc = pm._accumulate(tensors, spec, where)
        if report.active_params is None or report.flops_per_token is None:
            raise NotMoEError(f"{ref}: its top-k is unknown, so active parameters cannot be computed.")
        native = cls(
            report.active_params,
            report.active_params_no_embedding or 0,
            report.flops_per_token,
            report.num_experts,
            report.top_k,
            dict(acc.routed_by_layer),
            dict(acc.matmul_routed_by_layer),
        )
        return native, spec

    def at(self, k: dict[int, float]) -> tuple[int, int, int]:
        """(active params, active params without the input embedding, FLOPs per token)."""
        n, k0 = self.num_experts, self.native_k
        d_active = sum(
            int(round(v * (1 - k0 / n))) - int(round(v * (1 - k.get(layer, k0) / n)))
            for layer, v in self.routed.items()
        )
        d_mm = sum(
            int(round(v * k.get(layer, k0) / n)) - int(round(v * k0 / n))
            for layer, v in self.routed_matmul.items()
        )
        return self.active + d_active, self.active_no_embedding + d_active, self.flops + 2 * d_mm


# --------------------------------------------------------------------------- results


@dataclass
class SweepRecord:
    """One setting's measurements. JSON keys = field names.

    Attributes:
        setting: ``native``, ``k=1``, ``p=0.9``, ``k=0-11:1,12-:2``.
        top_k: k of every MoE layer (int), per layer (``{"layer": k}``), or None (top-p).
        top_p: p of every MoE layer, per layer, or None.
        experts_per_token: mean over MoE layers of the experts each token took.
        active_params: parameters one token uses, at the measured experts per token.
        flops_per_token: forward FLOPs of one token (``moescope params`` accounting).
        perplexity: held-out perplexity over every scored token.
        domains: domain -> perplexity (empty without domains).
        native: the model's own routing.
        loss: mean NLL per token (nats).
        tokens: scored tokens.
        experts_per_token_by_layer: ``{"layer": mean}``.
        active_params_no_embedding: ``active_params`` less the input embedding.
        seconds: wall time of the setting's pass over the corpus.
    """

    setting: str
    top_k: int | dict[str, int] | None
    top_p: float | dict[str, float] | None
    experts_per_token: float
    active_params: int
    flops_per_token: int
    perplexity: float
    domains: dict[str, float]
    native: bool
    loss: float
    tokens: int
    experts_per_token_by_layer: dict[str, float]
    active_params_no_embedding: int
    seconds: float


@dataclass
class SweepResult:
    """Every setting of a sweep, native first.

    Attributes:
        model: model reference.
        corpus: corpus specs.
        records: one :class:`SweepRecord` per setting.
        num_experts: routed experts per MoE layer.
        native_top_k: the model's own experts per token.
        moe_layers: MoE layer indices.
        seq_len: window length.
        stride: window step.
        context: keys per token in the attention FLOPs term.
        execution: ``whole``, ``stream`` or ``device_map``.
    """

    model: str
    corpus: list[str]
    records: list[SweepRecord]
    num_experts: int
    native_top_k: int
    moe_layers: list[int]
    seq_len: int
    stride: int
    context: int
    execution: str = "whole"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: the fields, ``records`` as a list of objects."""
        return asdict(self)

    def to_frame(self) -> Any:
        """The records as a pandas DataFrame (one row per setting; columns = record fields)."""
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.records])

    @property
    def native(self) -> SweepRecord:
        """The native setting's record."""
        return next(r for r in self.records if r.native)


# --------------------------------------------------------------------------- the sweep


def sweep(
    model_ref: str,
    corpus: str | Sequence[str],
    *,
    top_k: Any = None,
    top_p: Any = None,
    split: str | None = None,
    seq_len: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = 50_000,
    batch_size: int = 4,
    context: int = 4096,
    dtype: str = "auto",
    device: str = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
    max_memory: str | None = None,
    stream: bool | None = None,
    device_map: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_plan: Callable[[str], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> SweepResult:
    """Measure perplexity, experts per token, active parameters and FLOPs per routing setting.

    The model is loaded once (whole, streamed or accelerate-placed, as ``eval`` decides);
    the native setting runs first with the model's own routing, then each override.

    Args:
        model_ref: ``demo``, a checkpoint directory or a hub id.
        corpus: corpus specs (see :func:`moescope.corpus.read.read_corpus`).
        top_k: k settings (see :func:`parse_settings`).
        top_p: p settings.
        split, seq_len, stride, max_tokens, batch_size, dtype, device, revision,
        trust_remote_code, max_memory, stream, device_map: as for
            :func:`moescope.evaluation.perplexity.evaluate`.
        context: keys per token for the attention FLOPs (as ``moescope params --context``).
        progress: ``progress(done, total)`` over the windows of every setting.
        on_plan: receives the line saying how the model runs.
        on_warning: receives context warnings (see :func:`moescope.evaluation.perplexity.context_warnings`).

    Returns:
        A :class:`SweepResult`, native setting first.

    Raises:
        RoutingSettingError: a setting that does not fit the model (checked before loading).
        NotMoEError: a dense model.
    """
    corpus = [corpus] if isinstance(corpus, str) else list(corpus)  # one spec: not its letters
    from moescope.corpus.packing import resolve_split, resolve_windows
    from moescope.corpus.read import read_corpus
    from moescope.evaluation.perplexity import context_warnings, perplexity
    from moescope.execution.plan import HIDDEN_SHARE, open_model
    from moescope.execution.routing import require_moe_sites

    asked = parse_settings(top_k, top_p)
    from moescope.checkpoint.ref import open_checkpoint

    accounting, spec = _Accounting.of(open_checkpoint(model_ref, revision), context)
    native_k, layers = spec.top_k, list(spec.moe_layers)
    validate_settings(asked, spec, model_ref)
    settings = asked or default_settings(native_k, candidates_of(spec))
    native = Setting("native", "native")
    same = Setting(f"k={native_k}", "top_k", ((0, None, float(native_k)),))
    settings = [native] + [s for s in settings if s != same]

    plan, model, tokenizer = open_model(
        model_ref,
        revision=revision,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        max_memory=max_memory,
        stream=stream,
        device_map=device_map,
        on_plan=on_plan,
    )
    records: list[SweepRecord] = []
    try:
        seq_len, stride = resolve_windows(model.config, seq_len, stride)
        for line in context_warnings(model.config, seq_len, model_ref):
            if on_warning is not None:
                on_warning(line)
        docs = list(read_corpus(list(corpus), split=resolve_split(corpus, split)))
        sites = require_moe_sites(model.model if plan.mode == "stream" else model, model_ref)
        budget = int(plan.budget * HIDDEN_SHARE) if plan.mode == "stream" else None
        for i, s in enumerate(settings):

            def tick(done: int, total: int, _i: int = i) -> None:
                if progress is not None:
                    progress(_i * total + done, len(settings) * total)

            def run() -> Any:
                return perplexity(
                    model,
                    tokenizer,
                    docs,
                    seq_len=seq_len,
                    stride=stride,
                    max_tokens=max_tokens,
                    batch_size=batch_size,
                    progress=tick,
                    hidden_budget=budget,
                )

            start = time.perf_counter()
            if s.kind == "native":
                result = run()
                per_layer = {layer: float(native_k) for layer in layers}
            else:
                with RoutingOverride(sites, s.rules(layers, native_k)) as ov:
                    result = run()
                per_layer = {layer: c.mean for layer, c in ov.counts.items()}
            seconds = time.perf_counter() - start
            records.append(_record(s, result, per_layer, accounting, layers, native_k, seconds))
    finally:
        if plan.mode == "stream":
            model.close()
    return SweepResult(
        model_ref,
        list(corpus),
        records,
        spec.num_experts,
        native_k,
        layers,
        seq_len,
        stride,
        context,
        plan.mode,
    )


def _record(
    s: Setting,
    result: Any,
    per_layer: dict[int, float],
    accounting: _Accounting,
    layers: list[int],
    native_k: int,
    seconds: float,
) -> SweepRecord:
    active, active_no_emb, flops = accounting.at(per_layer)
    k_value, p_value = labels(s, layers, native_k)
    finite = [v for v in per_layer.values() if not math.isnan(v)]
    return SweepRecord(
        setting=s.name,
        top_k=k_value,
        top_p=p_value,
        experts_per_token=sum(finite) / len(finite) if finite else float("nan"),
        active_params=active,
        flops_per_token=flops,
        perplexity=result.perplexity,
        domains={d: r.perplexity for d, r in result.domains.items()},
        native=s.kind == "native",
        loss=result.loss,
        tokens=result.tokens,
        experts_per_token_by_layer={str(layer): v for layer, v in per_layer.items()},
        active_params_no_embedding=active_no_emb,
        seconds=seconds,
    )
