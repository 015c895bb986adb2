"""Neuron alignment of two experts: the permutation of B's hidden neurons that best matches A.

An expert is a gated MLP: ``down(act(gate(x)) * up(x))``. Permuting its hidden (intermediate)
neurons -- the rows of gate and up, the columns of down, together -- leaves its function
unchanged, so two experts trained from different starts can be the same function with their
neurons in another order. Comparing or averaging their weights position by position is then
meaningless (a permuted copy of an expert has a raw weight cosine near 0); aligning first
fixes that.

How: every neuron of an expert is described by one row, the concatenation of everything
indexed by it (gate row, up row, down column, and gpt-oss's gate/up biases). The cost of
matching neuron ``i`` of A with neuron ``j`` of B is minus the dot product of their rows;
:func:`scipy.optimize.linear_sum_assignment` finds the permutation of B maximising the total,
which is the permutation maximising the cosine of the two flattened experts (tensors with
no neuron axis, like gpt-oss's down bias, add the same amount whatever the permutation).

Where the neurons sit in each tensor depends on the family's layout, read from the tensor
name (:func:`neuron_axis`): per-expert ``w1/w3/gate_proj/up_proj`` ``[I, H]`` and
``w2/down_proj`` ``[H, I]``; fused ``gate_up_proj`` ``[2I, H]`` (gate rows, then up rows) and
``down_proj`` ``[H, I]``; transposed ``gate_up_proj`` ``[H, 2I]`` (gpt-oss interleaves gate
and up columns, llama4 concatenates them) with ``down_proj`` ``[I, H]``; granite's
``input_linear`` / ``output_linear``; DBRX's packed ``w1/v1/w2`` rows (``[I, H]`` per
expert); switch's ``wi`` / ``wo``; nllb-moe's ``fc1`` (and its bias, one per neuron) /
``fc2`` (its bias has no neuron axis). One expert is a ``dict`` of tensor name -> tensor (that
expert's slice), with a matching ``dict`` of :class:`NeuronAxis` (None: no neuron axis).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moescope import families
from moescope.errors import PruneError

#: families whose fused gate/up tensor alternates gate and up per neuron (``gate_up[..., ::2]``)
INTERLEAVED = frozenset({"gpt_oss"})

_GATE_LIKE = {"w1", "w3", "v1", "gate_proj", "up_proj", "wi", "wi_0", "wi_1", "fc1"}
_DOWN_LIKE = {"w2", "down_proj", "output_linear", "wo", "fc2"}
#: per-neuron biases of an up projection (nllb's fc1.bias), and biases with no neuron axis
_UP_BIAS = {"fc1_bias"}
_DOWN_BIAS = {"down_proj_bias", "fc2_bias"}
_FUSED_GATE_UP = {"gate_up_proj", "input_linear"}


@dataclass(frozen=True)
class NeuronAxis:
    """Where the hidden neurons sit in one expert's slice of a tensor.

    Attributes:
        axis: the dimension indexed by the neurons.
        groups: how many times each neuron appears along it (2 for fused gate and up).
        interleaved: groups alternate per neuron (``g0 u0 g1 u1 ...``, gpt-oss) rather than
            follow each other in blocks (``g0 g1 ... u0 u1 ...``).
    """

    axis: int
    groups: int = 1
    interleaved: bool = False


@dataclass(frozen=True)
class Alignment:
    """The best match of expert B's neurons to expert A's.

    Attributes:
        perm: ``perm[i]`` is B's neuron matched with A's neuron ``i``; B aligned is B's
            neurons taken in this order (:func:`permute_expert`).
        cosine: cosine of the flattened experts after alignment (at least ``raw_cosine``).
        raw_cosine: cosine of the flattened experts as stored.
    """

    perm: np.ndarray
    cosine: float
    raw_cosine: float


def _leaf(name: str) -> str:
    parts = [p for p in name.split(".") if p not in ("weight", "mlp")]
    if len(parts) > 1 and parts[-1] == "bias":  # nllb's fc1.bias: a bias of that projection
        return f"{parts[-2]}_bias"
    return parts[-1] if parts else name


def neuron_axis(name: str, shape: Sequence[int], family: str | None, width: int = 0) -> NeuronAxis | None:
    """The neuron axis of one expert's slice (``shape``) of tensor ``name``; None: it has none.

    Args:
        name: the tensor's name (stored or in-memory; only its last component matters).
        shape: the shape of one expert's slice (without the expert dimension).
        family: the registry family (transposed and packed layouts depend on it).
        width: the expert's hidden width (0: not checked).

    Raises:
        PruneError: a tensor this module does not know how to align (quantised storage, an
            unknown layout), or one whose shape does not hold ``width`` neurons.
    """
    leaf = _leaf(name)
    record = families.lookup(family) if family else None
    transposed = bool(record and (record.tensors.transposed or record.tensors.packed))
    interleaved = family in INTERLEAVED
    ax: NeuronAxis | None
    if leaf in _DOWN_BIAS:
        return None
    if leaf == "gate_up_proj_bias" and len(shape) == 1:
        ax = NeuronAxis(0, 2, interleaved)
    elif leaf in _UP_BIAS and len(shape) == 1:
        ax = NeuronAxis(0)
    elif leaf in _GATE_LIKE and len(shape) == 2:
        ax = NeuronAxis(0)
    elif leaf in _DOWN_LIKE and len(shape) == 2:
        ax = NeuronAxis(0 if transposed else 1)
    elif leaf in _FUSED_GATE_UP and len(shape) == 2:
        ax = NeuronAxis(1 if transposed else 0, 2, interleaved)
    else:
        raise PruneError(
            f"{name} (expert slice {list(shape)}) is not a gate, up or down projection moescope can align "
            "(quantised storage such as MXFP4 blocks, or an unknown expert layout); use --method drop."
        )
    size = shape[ax.axis]
    if size % ax.groups or (width and size != ax.groups * width):
        raise PruneError(
            f"{name}: dimension {ax.axis} of the expert slice {list(shape)} should hold "
            f"{ax.groups} x {width or '?'} neurons; this layout cannot be aligned, use --method drop."
        )
    return ax


def expert_axes(
    tensors: Mapping[str, Any], family: str | None, width: int = 0
) -> dict[str, NeuronAxis | None]:
    """:func:`neuron_axis` of every tensor of one expert, checked to agree on the width.

    Raises:
        PruneError: an unknown tensor, no neuron axis at all, or widths that disagree.
    """
    axes = {name: neuron_axis(name, tuple(t.shape), family, width) for name, t in tensors.items()}
    widths = {tensors[n].shape[ax.axis] // ax.groups for n, ax in axes.items() if ax is not None}
    if len(widths) != 1:
        raise PruneError(
            f"expert tensors {sorted(tensors)} give hidden widths {sorted(widths) or 'none'}; "
            "they cannot be aligned, use --method drop."
        )
    return axes


def _neuron_first(t: Any, ax: NeuronAxis) -> Any:
    """``t`` as ``[I, groups, ...rest]`` (neuron first)."""
    x = t.movedim(ax.axis, 0)
    n = x.shape[0] // ax.groups
    if ax.interleaved:
        return x.reshape(n, ax.groups, *x.shape[1:])
    return x.reshape(ax.groups, n, *x.shape[1:]).movedim(0, 1)


def _from_neuron_first(x: Any, ax: NeuronAxis) -> Any:
    """Inverse of :func:`_neuron_first`."""
    if not ax.interleaved:
        x = x.movedim(1, 0)
    x = x.reshape(-1, *x.shape[2:])
    return x.movedim(0, ax.axis)


def neuron_rows(t: Any, ax: NeuronAxis) -> Any:
    """``[I, D]``: one row per hidden neuron, everything of ``t`` that neuron indexes."""
    x = _neuron_first(t, ax)
    return x.reshape(x.shape[0], -1)


def permute(t: Any, ax: NeuronAxis | None, perm: Any) -> Any:
    """``t`` with its neurons taken in the order ``perm`` (unchanged when it has no neuron axis)."""
    import torch

    if ax is None:
        return t
    index = torch.as_tensor(np.asarray(perm), dtype=torch.long, device=t.device)
    return _from_neuron_first(_neuron_first(t, ax)[index], ax).contiguous()


def permute_expert(
    tensors: Mapping[str, Any], axes: Mapping[str, NeuronAxis | None], perm: Any
) -> dict[str, Any]:
    """Every tensor of one expert with its neurons in the order ``perm``."""
    return {name: permute(t, axes[name], perm) for name, t in tensors.items()}


@dataclass(frozen=True)
class Features:
    """One expert as :func:`align_features` reads it (float64 numpy).

    Attributes:
        rows: ``[I, D]``, one row per hidden neuron (every neuron-indexed tensor, sorted by name).
        rest: the tensors with no neuron axis, flattened.
        sq: the expert's squared norm (rows and rest).
    """

    rows: np.ndarray
    rest: np.ndarray
    sq: float


def features(tensors: Mapping[str, Any], axes: Mapping[str, NeuronAxis | None]) -> Features:
    """The :class:`Features` of one expert; tensors in sorted name order, so a layer's experts line up."""
    names = sorted(tensors)
    rows = [
        neuron_rows(tensors[n].detach().cpu().double(), ax).numpy()
        for n in names
        if (ax := axes[n]) is not None
    ]
    rest = [tensors[n].detach().cpu().double().reshape(-1).numpy() for n in names if axes[n] is None]
    r = np.concatenate(rows, axis=1)
    x = np.concatenate(rest) if rest else np.zeros(0)
    return Features(r, x, float(np.einsum("ij,ij->", r, r) + x @ x))


def align_features(fa: Features, fb: Features) -> Alignment:
    """The :class:`Alignment` of B to A from their :func:`features`."""
    from scipy.optimize import linear_sum_assignment

    score = fa.rows @ fb.rows.T
    rows, cols = linear_sum_assignment(score, maximize=True)
    perm = cols[np.argsort(rows)]
    const = float(fa.rest @ fb.rest)
    norm = math.sqrt(fa.sq * fb.sq)
    if norm == 0.0:
        return Alignment(perm, 0.0, 0.0)
    aligned = (float(score[np.arange(len(perm)), perm].sum()) + const) / norm
    raw = (float(np.trace(score)) + const) / norm
    return Alignment(perm, min(1.0, aligned), min(1.0, raw))


def align(a: Mapping[str, Any], b: Mapping[str, Any], axes: Mapping[str, NeuronAxis | None]) -> Alignment:
    """Align expert ``b``'s hidden neurons to expert ``a``'s (same tensor names and axes).

    Returns:
        The :class:`Alignment`: ``permute_expert(b, axes, result.perm)`` is B in A's order.
    """
    if set(a) != set(b):
        raise PruneError(f"experts with different tensors cannot be aligned: {sorted(a)} vs {sorted(b)}.")
    return align_features(features(a, axes), features(b, axes))


def aligned_cosine_matrix(
    experts: Sequence[Mapping[str, Any]], axes: Mapping[str, NeuronAxis | None]
) -> tuple[np.ndarray, np.ndarray]:
    """``(aligned, raw)`` ``[E, E]`` cosine matrices of a layer's experts (diagonal 1).

    One linear assignment per pair: ``E (E - 1) / 2`` problems of size ``I x I``.
    """
    feats = [features(t, axes) for t in experts]
    num = len(experts)
    aligned = np.eye(num)
    raw = np.eye(num)
    for i in range(num):
        for j in range(i + 1, num):
            al = align_features(feats[i], feats[j])
            aligned[i, j] = aligned[j, i] = al.cosine
            raw[i, j] = raw[j, i] = al.raw_cosine
    return aligned, raw


def module_experts(experts: Any, num_experts: int, family: str | None) -> list[dict[str, Any]]:
    """The experts of an in-memory experts module as per-expert dicts of detached float tensors.

    Fused ``[E, ...]`` parameters are sliced, DBRX's packed ``[E*I, H]`` rows split in E
    blocks, switch's and nllb-moe's per-expert modules (``expert_{j}``) read one by one.
    """
    own = dict(experts.named_parameters())
    # nllb's experts ModuleDict also holds its token dropout: only children with weights count
    children = [(n, c) for n, c in experts.named_children() if list(c.parameters())]
    if len(children) == num_experts:
        return [{n: p.detach().float() for n, p in c.named_parameters()} for _, c in children]
    out: list[dict[str, Any]] = [{} for _ in range(num_experts)]
    for name, p in own.items():
        if p.ndim == 0 or p.shape[0] % num_experts:
            continue
        slabs = p.detach().float().reshape(num_experts, p.shape[0] // num_experts, *p.shape[1:])
        if p.shape[0] == num_experts:
            slabs = slabs.squeeze(1)
        for j in range(num_experts):
            out[j][name] = slabs[j]
    return out
