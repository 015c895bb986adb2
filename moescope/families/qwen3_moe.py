"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): as qwen2_moe without a shared expert, renormalised."""

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
    name="qwen3_moe",
    summary="Qwen3-MoE: sparse-step placement, softmax -> top-k -> renormalise (norm_topk_prob), no shared expert",
    config_class="Qwen3MoeConfig",
    fields=Fields(
        experts=("num_experts", *(k for k in EXPERT_COUNT_KEYS if k != "num_experts")),
        top_k="num_experts_per_tok",
        width="moe_intermediate_size",
        norm_topk="norm_topk_prob",
    ),
    placement=Placement("sparse_step", ("decoder_sparse_step", "mlp_only_layers")),
    routing=Routing("softmax_topk", renormalise=True),
    tensors=Tensors(blocks=("mlp",), routers=("gate.weight",)),
    hooks=Hooks("fused", "Qwen3MoeExperts", "gate.weight"),
    attention=Attention(sliding="max_window_layers"),
)
