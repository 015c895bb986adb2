"""NLLB-MoE (facebook/nllb-moe-54b): encoder-decoder, top-2 under an expert capacity.

``model_type`` is ``nllb-moe`` (a hyphen; the record is ``nllb_moe``, the config's type an
alias). Layer i of each stack is sparse when ``(i + 1) % *_sparse_step == 0``; its
``ffn`` holds ``router.classifier`` and ``experts.expert_{j}.fc1/fc2`` (with biases). The
router (``NllbMoeTop2Router``) takes the softmax's top-1 and, by ``second_expert_policy``,
its second choice (``all``: always; ``sampling``: the argmax of Gumbel-noised logits;
``random``: kept with probability 2 p2 -- both draw noise in eval mode too), drops
assignments past the capacity (in eval ``ceil(moe_eval_capacity_token_fraction * T)`` over
the batch's T tokens, else ``expert_capacity``) and normalises the two gates.
"""

from moescope.families._base import Family, Fields, Hooks, Placement, Routing, Tensors

FAMILY = Family(
    name="nllb_moe",
    summary="NLLB-MoE: encoder-decoder, every *_sparse_step-th layer sparse, top-2, capacity drops",
    config_class="NllbMoeConfig",
    # NllbMoeConfig defaults: 128 experts; the router always takes two (top-1 and top-2).
    # encoder_ffn_dim is the encoder experts' width (decoder_ffn_dim the decoder's)
    fields=Fields(
        experts=("num_experts",), top_k=None, width="encoder_ffn_dim", experts_default=128, fixed_top_k=2
    ),
    placement=Placement("nllb"),
    routing=Routing("capacity_top2", renormalise=True, drops_tokens=True),
    tensors=Tensors(blocks=("ffn",), routers=("router.classifier.weight",), stored="modules"),
    hooks=Hooks("nllb", "NllbMoeExperts", "router.classifier.weight"),
    aliases=("nllb-moe",),
    closed_form=None,
    tie_default=True,
    experts_implementation=False,
    causal_lm=False,
)
