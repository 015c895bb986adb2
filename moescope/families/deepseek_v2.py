"""DeepSeek-V2 (V2, V2-Lite): MLA attention, shared experts, optionally group-limited softmax routing."""

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
    name="deepseek_v2",
    summary="DeepSeek-V2: dense first layers, softmax -> (group-limited) top-k x routed_scaling_factor, no renorm",
    config_class="DeepseekV2Config",
    fields=Fields(
        experts=("n_routed_experts", *(k for k in EXPERT_COUNT_KEYS if k != "n_routed_experts")),
        top_k="num_experts_per_tok",
        width="moe_intermediate_size",
        shared_count="n_shared_experts",
        mtp="num_nextn_predict_layers",
    ),
    placement=Placement("dense_prefix", ("first_k_dense_replace", "moe_layer_freq")),
    # groups limit routing only with topk_method="group_limited_greedy" (group score = max)
    routing=Routing("softmax_group_limited", renormalise=False, groups="topk_method"),
    tensors=Tensors(blocks=("mlp",), routers=("gate.weight",), shared=("mlp.shared_experts.",)),
    hooks=Hooks("fused", "DeepseekV2Experts", "gate.weight"),
    attention=Attention(kind="mla"),
)
