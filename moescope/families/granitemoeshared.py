"""IBM Granite MoE with a shared expert (granitemoeshared): granitemoe plus shared_mlp in every layer."""

from dataclasses import replace

from moescope.families._base import Hooks
from moescope.families.granitemoe import FAMILY as _GRANITE

FAMILY = replace(
    _GRANITE,
    name="granitemoeshared",
    summary="Granite MoE + shared expert: granitemoe routing and layout, shared_mlp.input/output_linear beside the block",
    config_class="GraniteMoeSharedConfig",
    fields=replace(_GRANITE.fields, shared_width="shared_intermediate_size"),
    tensors=replace(_GRANITE.tensors, shared=("shared_mlp.",)),
    hooks=Hooks("fused", "GraniteMoeSharedExperts", "router.weight"),
)
