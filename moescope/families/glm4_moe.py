"""GLM-4.5 / GLM-4.6 (glm4_moe): DeepSeek-V3 routing with standard GQA attention."""

from dataclasses import replace

from moescope.families._base import Attention, Hooks
from moescope.families.deepseek_v3 import FAMILY as _V3

FAMILY = replace(
    _V3,
    name="glm4_moe",
    summary="GLM-4.5/4.6: DeepSeek-V3 routing (sigmoid, correction bias, groups), GQA attention",
    config_class="Glm4MoeConfig",
    hooks=Hooks("fused", "Glm4MoeExperts", "gate.weight"),
    attention=Attention(kind="gqa"),
    aliases=("glm4v_moe_text",),
)
