"""flops_per_token agrees with torch.utils.flop_counter.FlopCounterMode on real forward passes.

How the two are lined up: one sequence of S tokens runs through the model with eager
attention (the score and value matmuls are counted in full: the causal mask is applied,
not skipped, so every token is charged S keys) and eager experts (each expert runs only on
the tokens routed to it, so exactly top_k experts per token are counted). moescope's figure
at --context S times S must then equal the counted total.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moescope.accounting.params import account
from moescope.checkpoint.ref import Checkpoint
from tests.tiny import tiny_model

SEQ = 24


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "olmoe", "llama"])
def test_flops_match_flop_counter(family: str) -> None:
    torch.manual_seed(0)
    model = tiny_model(family, attn_implementation="eager")
    if hasattr(model, "set_experts_implementation") and family != "llama":
        model.set_experts_implementation("eager")
    ids = torch.randint(0, model.config.vocab_size, (1, SEQ))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(ids)
    counted = fc.get_total_flops()
    cfg = model.config.to_dict()
    report = account(Checkpoint("tiny", "config", cfg), context=SEQ)
    predicted = report.flops_per_token * SEQ
    assert abs(predicted - counted) / counted < 0.02, (predicted, counted)


def test_attention_term_grows_with_context() -> None:
    cfg = tiny_model("mixtral").config.to_dict()
    short = account(Checkpoint("t", "config", cfg), context=16).flops_per_token
    long = account(Checkpoint("t", "config", cfg), context=32).flops_per_token
    # 2 layers x 4 heads x (8 + 8) dims x 2 FLOPs x 16 more keys
    assert long - short == 2 * 4 * 16 * 2 * 16


def test_sliding_window_caps_attention() -> None:
    cfg = tiny_model("gpt_oss").config.to_dict()  # sliding_window=8 on alternate layers
    a = account(Checkpoint("t", "config", cfg), context=1000)
    b = account(Checkpoint("t", "config", cfg), context=2000)
    full_layers = sum(1 for t in cfg["layer_types"] if t == "full_attention")
    heads, hd = cfg["num_attention_heads"], cfg["head_dim"]
    assert b.flops_per_token - a.flops_per_token == full_layers * 2 * heads * 2 * hd * 1000
    assert "sliding" in (a.kv_cache_layout or "")
