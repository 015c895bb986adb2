"""OLMoE (OLMoE-1B-7B): 64 experts, top-8, every layer; intermediate_size is the expert width."""

from moescope.families._base import EXPERT_COUNT_KEYS, Family, Fields, Hooks, Placement, Routing, Tensors

FAMILY = Family(
    name="olmoe",
    summary="OLMoE: every layer MoE, softmax -> top-k (-> renormalise with norm_topk_prob)",
    config_class="OlmoeConfig",
    fields=Fields(
        experts=("num_experts", *(k for k in EXPERT_COUNT_KEYS if k != "num_experts")),
        top_k="num_experts_per_tok",
        width="intermediate_size",
        norm_topk="norm_topk_prob",
    ),
    placement=Placement("all"),
    routing=Routing("softmax_topk", renormalise=True),
    tensors=Tensors(blocks=("mlp",), routers=("gate.weight",)),
    hooks=Hooks("fused", "OlmoeExperts", "gate.weight"),
)
