"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): routed experts plus one gated shared expert."""

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
    name="qwen2_moe",
    summary="Qwen1.5/Qwen2-MoE: sparse-step placement, softmax -> top-k, one sigmoid-gated shared expert",
    config_class="Qwen2MoeConfig",
    fields=Fields(
        experts=("num_experts", *(k for k in EXPERT_COUNT_KEYS if k != "num_experts")),
        top_k="num_experts_per_tok",
        width="moe_intermediate_size",
        shared_width="shared_expert_intermediate_size",
        norm_topk="norm_topk_prob",
    ),
    placement=Placement("sparse_step", ("decoder_sparse_step", "mlp_only_layers")),
    routing=Routing("softmax_topk", renormalise=False),
    tensors=Tensors(
        blocks=("mlp",), routers=("gate.weight",), shared=("mlp.shared_expert.", "mlp.shared_expert_gate.")
    ),
    hooks=Hooks("fused", "Qwen2MoeExperts", "gate.weight"),
    attention=Attention(sliding="max_window_layers"),
)
