"""PhiMoE (Phi-3.5-MoE): sparsemixer routing, which always picks two experts."""

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
    name="phimoe",
    summary="Phi-3.5-MoE: every layer MoE, sparsemixer (two masked argmax steps; k is always 2)",
    config_class="PhimoeConfig",
    # sparsemixer selects exactly two experts whatever num_experts_per_tok says
    fields=Fields(experts=EXPERT_COUNT_KEYS, top_k=None, width="intermediate_size", fixed_top_k=2),
    placement=Placement("all"),
    routing=Routing("sparsemixer", renormalise=True),
    tensors=Tensors(blocks=("block_sparse_moe", "mlp"), routers=("gate.weight", "router.weight")),
    hooks=Hooks("fused", "PhimoeExperts", "router.weight"),
    attention=Attention(sliding="all_layers"),
)
