"""Tiny transformers configs per family (hidden 32, 2 layers, 4 experts, vocab 99), for tests."""

from __future__ import annotations

from typing import Any

_HIDDEN = 32
_VOCAB = 99
_LAYERS = 2
_EXPERTS = 4

_COMMON: dict[str, Any] = dict(
    hidden_size=_HIDDEN,
    num_hidden_layers=_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=_VOCAB,
    max_position_embeddings=64,
    intermediate_size=48,
)

FAMILIES = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=_EXPERTS, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_experts=_EXPERTS,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_experts=_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            n_routed_experts=_EXPERTS,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=4,
            qk_nope_head_dim=8,
            v_head_dim=8,
            num_hidden_layers=3,
            head_dim=4,
            num_key_value_heads=4,
        ),
    ),
    "olmoe": ("OlmoeConfig", dict(num_experts=_EXPERTS, num_experts_per_tok=2)),
    "gpt_oss": (
        "GptOssConfig",
        dict(num_local_experts=_EXPERTS, num_experts_per_tok=2, head_dim=8, sliding_window=8),
    ),
    "llama": ("LlamaConfig", dict()),
}


def tiny_config(family: str, **overrides: Any) -> Any:
    """A tiny config object of the family, with ``overrides`` applied."""
    import transformers

    cls_name, extra = FAMILIES[family]
    kwargs = {**_COMMON, **extra, **overrides}
    return getattr(transformers, cls_name)(**kwargs)


def tiny_model(family: str, **overrides: Any) -> Any:
    """A randomly initialised tiny causal LM of the family (seeded by the caller)."""
    import transformers

    cfg = tiny_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model
