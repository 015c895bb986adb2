"""Experts forwards that also keep each routed expert's output norm, for the trace's recorder.

:class:`moescope.execution.routing.RoutingRecorder` swaps these in for the experts' own forward (fused
families and DBRX) while it records: they compute what transformers' eager loop computes —
the fused one sums every expert's contribution in eager's order, so the outputs are the same
bit for bit (``tests/test_routing.py``) — and store ``[tokens, k]`` output norms in
``rec._norms[index]``. ``rec`` is the recorder (typed loosely: this module sits below it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["accumulate", "dbrx_forward_with_norms", "fused_forward_with_norms"]


def accumulate(out: Any, tok: Any, values: Any) -> None:
    """``out.index_add_(0, tok, values)`` for one expert's tokens, bit for bit, fast in bfloat16 on CPU.

    torch's CPU ``index_add_`` in bfloat16 runs element by element: 52 ms for 512 rows of
    1024 against 0.08 ms in float32 (measured, issue #19), most of a bf16 forward's experts
    time. One expert's ``tok`` never repeats (a token's top-k experts are distinct), so
    gathering, adding and scattering back rounds each sum once, as ``index_add_`` does.
    """
    import torch

    if out.dtype == torch.bfloat16 and out.device.type == "cpu":
        out[tok] = out[tok] + values
    else:
        out.index_add_(0, tok, values)


def fused_forward_with_norms(rec: Any, index: int) -> Callable[..., Any]:
    """An experts forward equivalent to transformers' eager loop that also keeps output norms.

    It follows the attributes ``use_experts_implementation`` sets (``has_gate``,
    ``has_bias``, ``is_transposed``, ``has_post_expert_norm``, ``_apply_gate``), as the
    library's own ``batched_mm``/``grouped_mm`` implementations do, so it serves every
    decorated family; tests check its output equals the eager one.
    """

    def forward(self: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
        import torch

        out = torch.zeros_like(hidden_states)
        n_exp = self.num_experts
        n_tok = top_k_index.shape[0]
        with torch.no_grad():
            # every (slot, token) assignment sorted by expert, stably: within an expert the
            # order is slot-major as torch.where over eager's one-hot mask gives it, so the
            # sums below are eager's, bit for bit, without a [tokens, k, E+1] one-hot mask
            flat = top_k_index.t().reshape(-1)  # entry slot * tokens + token
            order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=n_exp + 1).tolist()
            pos_all, tok_all = order // n_tok, order % n_tok
        # Each expert's rows run gate-up, activation and down back to back while they are in
        # cache (one pass over all routed rows per op mapped a fresh [rows, 2I] buffer, 58 MB
        # at 2,048 tokens, and sent it out to memory between ops: a first 4,096-token trace
        # of the roofline model took 11.7-17.0 s against 10.6-13.7 s), on exactly eager's row
        # sets, so every value is eager's. The per-token sums are then added in ascending
        # expert order, as eager's loop over experts adds them: k vectorised adds instead of
        # one index_add_ per expert (bf16 index_add_ is slow on CPU). Id n_exp marks a
        # dropped slot, as in eager.
        routed = sum(counts[:n_exp])
        tok_r, pos_r = tok_all[:routed], pos_all[:routed]
        w_in_all = self.gate_up_proj if self.has_gate else self.up_proj
        w_out_all = self.down_proj
        y = hidden_states.new_empty((routed, hidden_states.shape[-1]))
        lo = 0
        for e, count in enumerate(counts[:n_exp]):
            hi = lo + count
            if count:
                w_in, w_out = w_in_all[e], w_out_all[e]
                h = torch.mm(hidden_states[tok_r[lo:hi]], w_in if self.is_transposed else w_in.t())
                if self.has_bias:
                    h = h + (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[e]
                h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
                torch.mm(h, w_out if self.is_transposed else w_out.t(), out=y[lo:hi])
                if self.has_bias:
                    y[lo:hi] += self.down_proj_bias[e]
            lo = hi
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        norms = torch.zeros(top_k_index.shape, dtype=torch.float32, device=hidden_states.device)
        norms.index_put_((tok_r, pos_r), torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32))
        # each routed row goes to its rank among its token's slots in ascending expert order
        # (dropped slots, id n_exp, sort last and stay zero), so the slot sums run in eager's
        # order without gathering a [tokens, k, hidden] copy
        k = top_k_index.shape[1]
        with torch.no_grad():
            by_expert = torch.argsort(top_k_index, dim=1, stable=True)
            rank = torch.empty_like(by_expert)
            rank.scatter_(1, by_expert, torch.arange(k, device=rank.device).expand_as(by_expert))
        contrib = hidden_states.new_zeros((n_tok, k, hidden_states.shape[-1]))
        contrib.index_put_((tok_r, rank[tok_r, pos_r]), (y * top_k_weights[tok_r, pos_r, None]).to(out.dtype))
        if k:
            out = contrib[:, 0].clone()
            for j in range(1, k):
                out = out + contrib[:, j]
        rec._norms[index] = norms
        return out

    return forward


def dbrx_forward_with_norms(rec: Any, index: int) -> Callable[..., Any]:
    """DBRX's experts loop (2-D ``[E*I, H]`` weights) with output norms kept."""

    def forward(self: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
        import torch
        import torch.nn.functional as F

        batch = hidden_states.shape[0]
        hidden = hidden_states.reshape(-1, self.hidden_size)
        out = torch.zeros_like(hidden)
        norms = torch.zeros(top_k_index.shape, dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        shape = (-1, self.ffn_hidden_size, self.hidden_size)
        for row in hit.tolist():
            e = row[0]
            if e >= self.num_experts:
                continue
            pos, tok = torch.where(mask[e])
            w1 = self.mlp.w1.view(shape)[e]
            v1 = self.mlp.v1.view(shape)[e]
            w2 = self.mlp.w2.view(shape)[e]
            y = self.mlp(hidden[tok], w1, v1, w2).view(-1, self.hidden_size)
            norms[tok, pos] = y.float().norm(dim=-1)
            accumulate(out, tok, y * top_k_weights[tok, pos, None])
        rec._norms[index] = norms
        return out.view(batch, -1, self.hidden_size)

    return forward
