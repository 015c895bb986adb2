"""gpt-oss (20b, 120b): top-k of biased router logits, softmax over the k; MXFP4 experts on the hub."""

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
    name="gpt_oss",
    summary="gpt-oss: every layer MoE, top-k of logits + bias -> softmax over the k; fused, transposed experts with biases",
    config_class="GptOssConfig",
    fields=Fields(experts=EXPERT_COUNT_KEYS, top_k="num_experts_per_tok", width="intermediate_size"),
    placement=Placement("all"),
    routing=Routing("topk_softmax", renormalise=True),
    # gate_up_proj [E, H, 2I] with gate/up interleaved; MXFP4 *_blocks/*_scales keep E first
    tensors=Tensors(
        blocks=("mlp",), routers=("router.weight", "router.bias"), stored="fused", transposed=True
    ),
    hooks=Hooks("fused", "GptOssExperts", "router.weight"),
    attention=Attention(sliding="layer_types"),
)
