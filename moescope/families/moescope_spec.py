"""moescope's own spec format (GLaM, GShard, ...): published dimensions, no weights, no model to run."""

from moescope.families._base import EXPERT_COUNT_KEYS, Family, Fields, Placement, Routing, Tensors

FAMILY = Family(
    name="moescope_spec",
    summary="a moescope spec file (see moescope.arch.specfile): dimensions from a paper, accounted in closed form",
    config_class=None,
    fields=Fields(
        experts=("num_experts", *(k for k in EXPERT_COUNT_KEYS if k != "num_experts")),
        top_k="num_experts_per_tok",
        width="moe_intermediate_size",
        shared_count="n_shared_experts",
    ),
    placement=Placement("listed", ("moe_layers", "encoder_layers")),
    routing=Routing("softmax_topk", renormalise=None),
    tensors=Tensors(blocks=("mlp",), routers=("gate.weight",), stored="fused"),
    hooks=None,
    closed_form="spec",
    tie_default=True,
    causal_lm=False,
    prune="a spec file has no weights",
)
