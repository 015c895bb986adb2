"""Mixtral (Mixtral-8x7B, 8x22B): softmax top-2 of 8 experts in every layer, renormalised."""

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
    name="mixtral",
    summary="Mixtral 8x7B / 8x22B: every layer MoE, softmax -> top-k -> renormalise",
    config_class="MixtralConfig",
    fields=Fields(experts=EXPERT_COUNT_KEYS, top_k="num_experts_per_tok", width="intermediate_size"),
    placement=Placement("all"),
    routing=Routing("softmax_topk", renormalise=True),
    # save_pretrained writes the original block_sparse_moe.experts.{j}.w1/w2/w3 names
    tensors=Tensors(blocks=("block_sparse_moe", "mlp"), routers=("gate.weight",)),
    hooks=Hooks("fused", "MixtralExperts", "gate.weight"),
    attention=Attention(sliding="all_layers"),
)
