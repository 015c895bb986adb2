"""Llama 4 (Scout, Maverick): sigmoid of the top-k logits, a shared expert, interleaved MoE layers."""

from moescope.families._base import EXPERT_COUNT_KEYS, Family, Fields, Hooks, Placement, Routing, Tensors

FAMILY = Family(
    name="llama4",
    summary="Llama 4: moe_layers or every interleave_moe_layer_step-th layer, top-k of logits -> sigmoid, shared expert",
    config_class="Llama4TextConfig",
    fields=Fields(
        experts=EXPERT_COUNT_KEYS,
        top_k="num_experts_per_tok",
        width="intermediate_size",
        shared_always=True,
        text_config=True,
    ),
    placement=Placement("interleave", ("moe_layers", "interleave_moe_layer_step")),
    routing=Routing("topk_sigmoid", renormalise=False),
    # experts run on every token with the score folded into their input (not decorated)
    tensors=Tensors(
        blocks=("feed_forward",),
        routers=("router.weight",),
        shared=("feed_forward.shared_expert.",),
        stored="fused",
        transposed=True,
    ),
    hooks=Hooks("llama4", "Llama4TextExperts", "router.weight"),
    aliases=("llama4_text",),
    closed_form=None,
    experts_implementation=False,
)
