"""The ``outputs`` similarity measure: expert outputs on the same captured inputs.

Inputs are hidden states captured by a forward pre-hook at each MoE block's input while the
model reads a corpus (:func:`capture_inputs`: a seeded random subset of at most ``samples``
tokens per layer); every expert is then run on them through the experts module itself
(:func:`expert_outputs`), and :func:`output_similarity` is the mean over tokens of the cosine
between two experts' outputs. :mod:`moescope.redundancy.run` combines it with the other measures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["capture_hook", "capture_inputs", "expert_outputs", "output_similarity", "sample_tokens"]


def capture_inputs(
    model: Any,
    sites: Sequence[Any],
    batches: Iterable[Any],
    *,
    samples: int = 512,
    seed: int = 0,
) -> dict[int, Any]:
    """Hidden states at each MoE block input, at most ``samples`` tokens per layer.

    Args:
        model: the transformers model.
        sites: MoE sites (``moescope.execution.routing.find_moe_sites``).
        batches: ``[B, S]`` token-id tensors.
        samples: tokens kept per layer.
        seed: seed of the token subset.

    Returns:
        layer -> ``[T, H]`` float32 tensor, ``T <= samples``.
    """
    import torch

    pool: dict[int, list[torch.Tensor]] = {s.layer: [] for s in sites}
    seen = {s.layer: 0 for s in sites}
    cap = 4 * samples  # enough variety for the random subset, bounded memory

    def hook(layer: int) -> Callable[..., None]:
        def fn(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> None:
            hidden = args[0] if args else (kwargs or {}).get("hidden_states")
            if hidden is None or seen[layer] >= cap:
                return
            flat = hidden.detach().reshape(-1, hidden.shape[-1]).float().cpu()
            take = flat[: cap - seen[layer]]
            pool[layer].append(take)
            seen[layer] += take.shape[0]

        return fn

    handles = [s.block.register_forward_pre_hook(hook(s.layer), with_kwargs=True) for s in sites]
    device = next(model.parameters()).device
    runner = model
    if getattr(model.config, "is_encoder_decoder", False):
        from moescope.execution.load import TeacherForced

        runner = TeacherForced(model)  # the decoder reads the same text, as trace runs it
    try:
        with torch.inference_mode():
            for ids in batches:
                runner(input_ids=ids.to(device))
                if all(v >= cap for v in seen.values()):
                    break
    finally:
        for h in handles:
            h.remove()
    gen = torch.Generator().manual_seed(seed)
    return {layer: sample_tokens(chunks, gen, samples) for layer, chunks in pool.items() if chunks}


def sample_tokens(chunks: list[Any], gen: Any, samples: int) -> Any:
    """A seeded random subset of ``samples`` captured rows, in their original order."""
    import torch

    allx = torch.cat(chunks)
    idx = torch.randperm(allx.shape[0], generator=gen)[:samples]
    return allx[idx.sort().values]


def capture_hook(pool: list[Any], seen: list[int], cap: int) -> Callable[..., None]:
    """A pre-hook keeping at most ``cap`` input rows of a MoE block."""

    def fn(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> None:
        hidden = args[0] if args else (kwargs or {}).get("hidden_states")
        if hidden is None or seen[0] >= cap:
            return
        flat = hidden.detach().reshape(-1, hidden.shape[-1]).float().cpu()
        take = flat[: cap - seen[0]]
        pool.append(take)
        seen[0] += take.shape[0]

    return fn


def expert_outputs(experts: Any, x: Any, num_experts: int, *, chunk: int = 256) -> Any:
    """``[E, T, H]`` outputs of every expert on the same inputs ``x [T, H]``.

    A fused experts module runs each expert as every token's only route (weight 1);
    switch_transformers' and nllb-moe's per-expert modules (``expert_{j}``) take the tokens.
    """
    import torch

    param = next(experts.parameters())
    per_module = hasattr(experts, "keys") and f"expert_{num_experts - 1}" in experts.keys()

    def run(j: int, xs: Any) -> Any:
        if per_module:
            return experts[f"expert_{j}"](xs)
        ids = torch.full((xs.shape[0], 1), j, dtype=torch.long, device=param.device)
        return experts(xs, ids, torch.ones((xs.shape[0], 1), dtype=param.dtype, device=param.device))

    outs = []
    with torch.inference_mode():
        for j in range(num_experts):
            parts = [
                run(j, x[start : start + chunk].to(device=param.device, dtype=param.dtype)).float().cpu()
                for start in range(0, x.shape[0], chunk)
            ]
            outs.append(torch.cat(parts))
    return torch.stack(outs)


def output_similarity(outputs: Any) -> np.ndarray:
    """Mean over tokens of the per-token cosine between experts' outputs ``[E, T, H]``."""
    import torch

    unit = torch.nn.functional.normalize(outputs.double(), dim=-1)
    sim = torch.einsum("ath,bth->ab", unit, unit) / outputs.shape[1]
    mat = sim.numpy()
    np.fill_diagonal(mat, 1.0)
    return np.clip(mat, -1.0, 1.0)
