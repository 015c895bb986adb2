"""IBM Granite MoE (granite-3.0-1b-a400m, 3b-a800m): experts stored as block_sparse_moe.input_linear/output_linear."""

from moescope.families._base import EXPERT_COUNT_KEYS, Family, Fields, Hooks, Placement, Routing, Tensors

FAMILY = Family(
    name="granitemoe",
    summary="Granite MoE: every layer MoE, top-k of logits -> softmax over the k; fused experts named input/output_linear",
    config_class="GraniteMoeConfig",
    fields=Fields(experts=EXPERT_COUNT_KEYS, top_k="num_experts_per_tok", width="intermediate_size"),
    placement=Placement("all"),
    routing=Routing("topk_softmax", renormalise=True),
    # stored: block_sparse_moe.input_linear.weight [E, 2I, H], output_linear.weight [E, H, I],
    # router.layer.weight; in memory: experts.gate_up_proj / down_proj and router.weight
    tensors=Tensors(
        blocks=("block_sparse_moe",),
        routers=("router.layer.weight", "router.weight"),
        experts=("input_linear.", "output_linear.", "experts."),
        stored="fused",
    ),
    hooks=Hooks("fused", "GraniteMoeExperts", "router.weight"),
    tie_default=True,
)
