"""DBRX (dbrx-base/instruct): nested ffn_config, experts packed as [E*ffn_hidden_size, H] rows."""

from moescope.families._base import Family, Fields, Hooks, Placement, Routing, Tensors

FAMILY = Family(
    name="dbrx",
    summary="DBRX: every layer MoE, softmax -> top-k -> divide by the p-norm; experts packed in 2-D rows",
    config_class="DbrxConfig",
    # DbrxFFNConfig defaults: 4 experts, top-1
    fields=Fields(
        experts=("ffn_config.moe_num_experts",),
        top_k="ffn_config.moe_top_k",
        width="ffn_config.ffn_hidden_size",
        experts_default=4,
        top_k_default=1,
    ),
    placement=Placement("all"),
    routing=Routing("softmax_topk_pnorm", renormalise=True),
    # ffn.experts.mlp.w1 / v1 / w2 are [E*I, H]: expert j owns rows j*I .. (j+1)*I
    tensors=Tensors(blocks=("ffn",), routers=("router.layer.weight",), stored="packed"),
    hooks=Hooks("dbrx", "DbrxExperts", "router.layer.weight"),
    closed_form="dbrx",
    experts_implementation=False,
)
