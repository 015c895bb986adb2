"""NLLB-MoE's sparse MLP run as its router dispatches, with the routing recorded.

What: :func:`dispatch_forward` is a forward for ``NllbMoeSparseMLP`` that calls the block's
own router (``NllbMoeTop2Router``: top-1 and top-2 of the softmax, ``second_expert_policy``,
padding, the capacity limit, gate normalisation, all unchanged) and then sends each token
to the experts with a nonzero combine weight in the router's ``router_probs``, weighted by
it, scaled by ``1 - moe_token_dropout`` in eval mode (a dropout in training): the
computation of fairseq's NLLB-MoE and of transformers 4.x's ``NllbMoeSparseMLP``.
:func:`install` puts it on every sparse MLP of a model (``load_model`` does, for nllb-moe),
:func:`decode` turns the router's outputs into ``[T, 2]`` ids (top-1 slot, top-2 slot;
``-1`` where the capacity limit, padding or the ``random`` policy dropped the assignment)
and gates.

Why: in transformers 5.x (measured on 5.25) ``NllbMoeSparseMLP`` passes the router's
one-hot top-1 mask to ``NllbMoeExperts``, which one-hots it again: every token then goes
through ``expert_0`` (weighted by the gates of its non-top-1 columns) and ``expert_1``
(weighted by its top-1 gate), whatever the router chose, and experts 2..E-1 never run. A
trace of that would say nothing about the checkpoint, and pruning would not change its
perplexity, so moescope runs the router's dispatch instead; where transformers computes
the dispatch itself (4.x, or a fixed 5.x) the two agree.

What is recorded is what this forward applies: the experts that receive each token after
the capacity drops, and the weights their outputs are added with (the router's gate times
``1 - moe_token_dropout`` in eval). With ``second_expert_policy`` ``sampling`` or ``random``
the router draws noise even in eval mode: the trace records that forward's own draw, so
two runs differ (as the model's outputs do).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

__all__ = ["SPARSE_MLP_CLASS", "decode", "dispatch_forward", "install"]

#: the transformers class whose forward is replaced
SPARSE_MLP_CLASS = "NllbMoeSparseMLP"

#: receives ``(ids [T, 2], weights [T, 2], norms [T, 2] or None)`` after each forward
Sink = Callable[[Any, Any, Any], None]


def decode(top_1_mask: Any, router_probs: Any, scale: float = 1.0) -> tuple[Any, Any]:
    """``(ids, weights)``, both ``[T, 2]``, from the router's top-1 mask and combine weights.

    Column 0 is the top-1 expert where its assignment survived the capacity limit, column 1
    the second expert where it survived; ``-1`` (weight 0) where dropped.

    Args:
        top_1_mask: ``[T, E]`` one-hot top-1 choice after the capacity limit (the router's).
        router_probs: ``[T, E]`` combine weights (nonzero at the kept top-1 and top-2).
        scale: factor on the weights (``1 - moe_token_dropout`` in eval).
    """
    import torch

    routed = router_probs != 0
    first = top_1_mask.bool() & routed
    second = routed & ~first
    none = torch.full(routed.shape[:1], -1, dtype=torch.long, device=routed.device)
    id1 = torch.where(first.any(-1), first.to(torch.uint8).argmax(-1), none)
    id2 = torch.where(second.any(-1), second.to(torch.uint8).argmax(-1), none)
    ids = torch.stack((id1, id2), dim=-1)
    weights = router_probs.gather(1, ids.clamp(min=0)) * (ids >= 0)
    return ids, weights * scale if scale != 1.0 else weights


def _token_dropout(block: Any) -> tuple[float, Any]:
    """``(moe_token_dropout, its dropout module)``: on the experts in 5.x, on the block in 4.x."""
    for owner in (block.experts, block):
        p = getattr(owner, "moe_token_dropout", None)
        if isinstance(p, (int, float)):
            return float(p), getattr(owner, "token_dropout", None)
    return 0.0, None


def dispatch_forward(sink: Sink | None = None, *, norms: bool = False) -> Callable[..., Any]:
    """A ``NllbMoeSparseMLP`` forward that dispatches by the router's combine weights.

    Args:
        sink: called after each forward with the decoded ids, the applied weights and
            (with ``norms``) each routed expert's output L2 norm, all ``[T, 2]`` over the
            ``B*S`` tokens in row-major order.
        norms: compute the output norms (from the outputs the experts produce anyway).
    """

    def forward(self: Any, hidden_states: Any, padding_mask: Any = None) -> Any:
        import torch

        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        routed = self.router(x, padding_mask)
        top_1_mask, router_probs = routed[0], routed[1]
        p, dropout = _token_dropout(self)
        scale = 1.0 - p if p > 0 and not self.training else 1.0
        ids, weights = decode(top_1_mask, router_probs, scale)
        out = torch.zeros_like(x)
        kept = torch.zeros(ids.shape, dtype=torch.float32, device=x.device) if norms else None
        mask = router_probs != 0
        for e in mask.any(0).nonzero().flatten().tolist():
            tok = mask[:, e].nonzero().squeeze(-1)
            y = self.experts[f"expert_{e}"](x[tok])
            if kept is not None:
                kept[tok, (ids[tok, 1] == e).long()] = y.detach().float().norm(dim=-1)
            if p > 0:
                y = dropout(y) if self.training and dropout is not None else y * (1.0 - p)
            out.index_add_(0, tok, (y * router_probs[tok, e, None]).to(x.dtype))
        if sink is not None:
            sink(ids, weights, kept)
        return out.reshape(batch, seq, hidden)

    return forward


def sparse_mlps(model: Any) -> list[Any]:
    """The model's ``NllbMoeSparseMLP`` modules, in module order."""
    return [m for m in model.modules() if type(m).__name__ == SPARSE_MLP_CLASS]


def install(model: Any) -> int:
    """Run every ``NllbMoeSparseMLP`` of ``model`` as its router dispatches; returns how many.

    The forward is set on each instance (the class is left alone), so other models of the
    process keep transformers' own; :class:`moescope.execution.routing.RoutingRecorder`
    swaps in the recording variant while it traces and puts this one back.
    """
    blocks = sparse_mlps(model)
    for block in blocks:
        block.forward = types.MethodType(dispatch_forward(), block)
    return len(blocks)
