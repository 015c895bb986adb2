"""Jamba (Jamba-v0.1, 1.5): Mamba/attention hybrid with MoE every expert_layer_period-th layer."""

from moescope.families._base import (
    EXPERT_COUNT_KEYS,
    Attention,
    Family,
    Fields,
    Hooks,
    Placement,
    Routing,
    Tensors,
)

FAMILY = Family(
    name="jamba",
    summary="Jamba: MoE where i % expert_layer_period == expert_layer_offset, softmax -> top-k, no renorm",
    config_class="JambaConfig",
    fields=Fields(
        experts=("num_experts", *(k for k in EXPERT_COUNT_KEYS if k != "num_experts")),
        top_k="num_experts_per_tok",
        width="intermediate_size",
    ),
    # JambaConfig defaults: period 2, offset 1
    placement=Placement("period", ("expert_layer_period", "expert_layer_offset"), (2, 1)),
    routing=Routing("softmax_topk", renormalise=False),
    tensors=Tensors(blocks=("feed_forward",), routers=("router.weight",)),
    hooks=Hooks("fused", "JambaExperts", "router.weight"),
    attention=Attention(kind="hybrid"),
    closed_form=None,
    tie_default=True,
)
