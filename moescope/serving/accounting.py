"""Bytes of a checkpoint as a server places them: dense weights, each routed expert, KV cache.

What: :func:`model_bytes` splits the weights that :mod:`moescope.accounting.params` accounts into the
routed experts (per MoE layer, bytes of one expert) and everything else ("dense": embedding,
attention, dense MLPs, shared experts, routers, norms, head), in the stored dtype or as bf16,
fp8 or int4, and carries the KV cache per token and at a context from the same accounting.
The parts add up to ``params``'s figures exactly: ``dense + routed = weight_bytes`` (stored)
or ``memory_bytes[dtype]``.

How: the checkpoint is opened once (headers only) and accounted with
:func:`moescope.accounting.params.account`; routed-expert parameters per layer come from the same
classified sums. Stored bytes of the experts are the ``nbytes`` of the tensors classified
``routed_experts`` (quantisation scales included), or, for a config without tensors, the
parameters times the config's dtype, as ``params`` estimates ``weight_bytes``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from moescope.errors import ConfigError

__all__ = ["DTYPES", "ModelBytes", "model_bytes"]

#: weight formats of :func:`model_bytes`: bytes per parameter (``stored``: as the checkpoint holds them)
DTYPES: dict[str, float | None] = {"stored": None, "bf16": 2.0, "fp8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class ModelBytes:
    """A checkpoint's bytes as a server places them (see the module docstring).

    Attributes:
        model: the reference.
        dtype: ``stored``, ``bf16``, ``fp8`` or ``int4``.
        total_bytes: all weights (``params``'s ``weight_bytes`` or ``memory_bytes[dtype]``).
        dense_bytes: everything but the routed experts.
        routed_bytes: the routed experts, all layers.
        expert_bytes: per MoE layer, bytes of one routed expert.
        num_experts: routed experts per MoE layer (0: dense model).
        top_k: experts per token.
        moe_layers: MoE layer indices.
        context: keys each token attends to, for the KV cache and FLOPs.
        kv_bytes_per_token: bf16 KV cache per token (``params``'s).
        kv_bytes_at_context: KV cache of one sequence at ``context`` (sliding windows respected).
        flops_per_token: forward FLOPs of one token at ``context`` (``params``'s).
        total_params: parameters.
        active_params: parameters per token.
    """

    model: str
    dtype: str
    total_bytes: float
    dense_bytes: float
    routed_bytes: float
    expert_bytes: dict[int, float]
    num_experts: int
    top_k: int
    moe_layers: list[int]
    context: int
    kv_bytes_per_token: int
    kv_bytes_at_context: int
    flops_per_token: int
    total_params: int
    active_params: int

    @property
    def is_moe(self) -> bool:
        """Has routed experts."""
        return self.num_experts > 0 and bool(self.moe_layers)

    @property
    def one_expert_per_layer(self) -> float:
        """Bytes of one expert in every MoE layer (the unit experts are placed in)."""
        return float(sum(self.expert_bytes.values()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        d = asdict(self)
        d["expert_bytes"] = {str(k): v for k, v in self.expert_bytes.items()}
        return d


def model_bytes(
    ref: str, *, dtype: str = "stored", context: int = 4096, revision: str | None = None
) -> ModelBytes:
    """Dense, per-expert and KV-cache bytes of a model reference (headers or config only).

    Args:
        ref: anything ``moescope params`` takes (``demo``, a directory, a config ``.json``, a hub id).
        dtype: ``stored`` (the checkpoint's own bytes), ``bf16``, ``fp8`` or ``int4``.
        context: keys per token, for the KV cache at context and FLOPs.
        revision: hub revision.

    Raises:
        ConfigError: an unknown ``dtype``, a config whose stored bytes are unknown
            (no tensors and no ``torch_dtype``: pass a dtype), or no KV-cache or FLOPs figure.
    """
    from moescope.accounting.params import _accumulate, _resolve, account
    from moescope.arch.tensorclasses import classify_groups
    from moescope.checkpoint.ref import open_checkpoint

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    ck = open_checkpoint(ref, revision)
    rep = account(ck, context)
    _cfg, spec, tensors, where, _notes = _resolve(ck)
    groups = classify_groups(tensors, spec)
    acc = _accumulate(tensors, spec, where, groups)
    per_param = DTYPES[dtype]
    routed_layer: dict[int, float] = defaultdict(float)
    if per_param is not None:
        total = float(rep.memory_bytes[dtype] or 0)
        for layer, n in acc.routed_by_layer.items():
            routed_layer[layer] = n * per_param
    elif ck.tensors:
        total = float(rep.weight_bytes or 0)
        for g in groups:
            if g.cls.component == "routed_experts":
                layer = g.cls.layer if g.cls.layer is not None else -1
                routed_layer[layer] += float(sum(tensors.nbytes[i] for i in g.positions))
    else:
        if rep.weight_bytes is None:
            raise ConfigError(
                f"{ref}: the config has no torch_dtype, so its stored bytes are unknown; pass --dtype bf16."
            )
        total = float(rep.weight_bytes)
        factor = total / rep.total_params if rep.total_params else 0.0
        for layer, n in acc.routed_by_layer.items():
            routed_layer[layer] = n * factor
    if (
        rep.kv_cache_bytes_per_token is None
        or rep.kv_cache_bytes_at_context is None
        or rep.flops_per_token is None
    ):
        raise ConfigError(
            f"{ref}: no KV-cache or FLOPs figure (attention or top-k unknown); pass a config.json."
        )
    e_n = rep.num_experts if rep.is_moe else 0
    per_expert = {layer: v / e_n for layer, v in sorted(routed_layer.items())} if e_n else {}
    routed = float(sum(routed_layer.values()))
    return ModelBytes(
        model=ref,
        dtype=dtype,
        total_bytes=total,
        dense_bytes=total - routed,
        routed_bytes=routed,
        expert_bytes=per_expert,
        num_experts=e_n,
        top_k=rep.top_k,
        moe_layers=list(rep.moe_layers),
        context=context,
        kv_bytes_per_token=int(rep.kv_cache_bytes_per_token),
        kv_bytes_at_context=int(rep.kv_cache_bytes_at_context),
        flops_per_token=int(rep.flops_per_token),
        total_params=rep.total_params,
        active_params=int(rep.active_params or rep.total_params),
    )
