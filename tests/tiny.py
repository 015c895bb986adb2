"""Tiny transformers configs per family (hidden 32, 2 layers, 4 experts, vocab 99), for tests.

One entry per MoE family of the registry (``moescope/families/``); tests/test_families.py
builds each one, saves it, accounts, traces and prunes it. The group-limited families
deepseek_v2 and glm4_moe have 8 experts in 2 groups so that pruning can keep 2 per group;
dbrx, switch_transformers and nllb_moe name their dimensions their own way (``_OWN_DIMS``).
"""

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

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
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
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.0,
            kv_lora_rank=8,
            q_lora_rank=None,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        ),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
            norm_topk_prob=True,
            head_dim=8,
        ),
    ),
    "phimoe": ("PhimoeConfig", dict(num_local_experts=_EXPERTS, num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=_EXPERTS, num_experts_per_tok=2)),
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        dict(num_local_experts=_EXPERTS, num_experts_per_tok=2, shared_intermediate_size=24),
    ),
    "dbrx": (
        "DbrxConfig",
        dict(
            d_model=_HIDDEN,
            n_heads=4,
            n_layers=_LAYERS,
            max_seq_len=64,
            vocab_size=_VOCAB,
            ffn_config=dict(
                moe_num_experts=_EXPERTS, moe_top_k=2, ffn_hidden_size=16, moe_normalize_expert_weights=1.0
            ),
            # transformers 5.23's default attn_config crashes (docs/TRANSFORMERS_MOE.md)
            attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0),
        ),
    ),
    "llama4": (
        "Llama4TextConfig",
        dict(
            num_local_experts=_EXPERTS,
            num_experts_per_tok=2,
            intermediate_size=16,
            intermediate_size_mlp=48,
            head_dim=8,
            interleave_moe_layer_step=1,
        ),
    ),
    "jamba": (
        "JambaConfig",
        dict(
            num_experts=_EXPERTS,
            num_experts_per_tok=2,
            expert_layer_period=1,
            expert_layer_offset=0,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=4,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=4,
        ),
    ),
    "switch_transformers": (
        "SwitchTransformersConfig",
        dict(
            vocab_size=_VOCAB,
            d_model=_HIDDEN,
            d_kv=8,
            d_ff=37,
            num_layers=_LAYERS,
            num_decoder_layers=_LAYERS,
            num_heads=4,
            num_experts=_EXPERTS,
            expert_capacity=6,
            encoder_sparse_step=1,
            decoder_sparse_step=1,
        ),
    ),
    # every layer sparse; the eval capacity (a fraction of the batch's tokens) binds at 0.3;
    # a nonzero moe_token_dropout scales the experts' outputs in eval
    "nllb_moe": (
        "NllbMoeConfig",
        dict(
            vocab_size=_VOCAB,
            d_model=_HIDDEN,
            encoder_layers=_LAYERS,
            decoder_layers=_LAYERS,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            max_position_embeddings=64,
            num_experts=_EXPERTS,
            encoder_sparse_step=1,
            decoder_sparse_step=1,
            expert_capacity=6,
            moe_eval_capacity_token_fraction=0.3,
            moe_token_dropout=0.2,
        ),
    ),
}

#: families whose config classes name the common dimensions their own way
_OWN_DIMS = {"dbrx", "switch_transformers", "nllb_moe"}

#: families that are not causal LMs: the auto class that builds them
_AUTO_CLASS = {"switch_transformers": "AutoModelForSeq2SeqLM", "nllb_moe": "AutoModelForSeq2SeqLM"}

#: the encoder-decoder families (their decoder is fed ``decoder_input_ids``)
ENCODER_DECODER = frozenset(_AUTO_CLASS)


def tiny_config(family: str, **overrides: Any) -> Any:
    """A tiny config object of the family, with ``overrides`` applied."""
    import transformers

    cls_name, extra = FAMILIES[family]
    kwargs = {**({} if family in _OWN_DIMS else _COMMON), **extra, **overrides}
    return getattr(transformers, cls_name)(**kwargs)


def auto_class(family: str) -> Any:
    """The transformers auto class that builds the family (causal LM unless encoder-decoder)."""
    import transformers

    return getattr(transformers, _AUTO_CLASS.get(family, "AutoModelForCausalLM"))


def tiny_model(family: str, **overrides: Any) -> Any:
    """A randomly initialised tiny model of the family (seeded by the caller), in eval mode."""
    cfg = tiny_config(family, **overrides)
    model = auto_class(family).from_config(cfg)
    model.eval()
    return model


def meta_model(config: Any, family: str) -> Any:
    """The family's model built on the meta device from ``config`` (no memory, no init)."""
    import torch

    with torch.device("meta"):
        return auto_class(family).from_config(config)


def char_tokenizer() -> Any:
    """A character-level fast tokenizer: <pad> <s> </s> <unk> (ids 0-3), then a-z, 0-9, punctuation."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = string.ascii_lowercase + string.digits + " .,:()=+\n"
    vocab = {t: i for i, t in enumerate([*specials, *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
