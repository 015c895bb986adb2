"""DeepSeek-V3 / R1 and Kimi-K2: sigmoid scores, correction bias, group-limited top-k, MTP layers."""

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
    name="deepseek_v3",
    summary="DeepSeek-V3/R1, Kimi-K2: sigmoid + e_score_correction_bias, group-limited (top-2 sum) top-k, renorm, x scaling",
    config_class="DeepseekV3Config",
    fields=Fields(
        experts=("n_routed_experts", *(k for k in EXPERT_COUNT_KEYS if k != "n_routed_experts")),
        top_k="num_experts_per_tok",
        width="moe_intermediate_size",
        shared_count="n_shared_experts",
        mtp="num_nextn_predict_layers",
        norm_topk="norm_topk_prob",
    ),
    placement=Placement("dense_prefix", ("first_k_dense_replace", "moe_layer_freq")),
    routing=Routing("sigmoid_group_limited", renormalise=True, groups="always"),
    tensors=Tensors(
        blocks=("mlp",),
        routers=("gate.weight", "gate.e_score_correction_bias"),
        shared=("mlp.shared_experts.",),
    ),
    hooks=Hooks("fused", "DeepseekV3Experts", "gate.weight"),
    attention=Attention(kind="mla"),
    aliases=("kimi_k2",),
)
