"""Switch Transformers (google/switch-base-8 ... c-2048): encoder-decoder, top-1 with expert capacity."""

from moescope.families._base import Family, Fields, Hooks, Placement, Routing, Tensors

FAMILY = Family(
    name="switch_transformers",
    summary="Switch Transformers: encoder-decoder, sparse every *_sparse_step-th block, top-1, capacity drops",
    config_class="SwitchTransformersConfig",
    fields=Fields(experts=("num_experts",), top_k=None, width="d_ff", experts_default=8, fixed_top_k=1),
    placement=Placement("switch"),
    routing=Routing("capacity_top1", renormalise=False, drops_tokens=True),
    tensors=Tensors(blocks=("mlp",), routers=("router.classifier.weight",), stored="modules"),
    hooks=Hooks("switch", "SwitchTransformersExperts", "router.classifier.weight"),
    closed_form=None,
    tie_default=True,
    experts_implementation=False,
    causal_lm=False,
)
