"""Classify a whole tensor inventory at once: one :func:`~moescope.arch.moe.classify` call per name shape.

A Kimi-K2 checkpoint stores 139k tensors, but they come in a few dozen *name shapes*:
``model.layers.#.mlp.experts.#.gate_proj.weight`` and the like. Calling the classifier once per
tensor costs more than reading every header; this module calls it once per name shape and
layer, and reads each member's expert index from its name.

How: the digits of every name are blanked in one pass over all names (``str.translate`` on
the joined names: C speed, and length-preserving, so within one blanked name the digit runs
sit at the same offsets in every member). Names sharing a blanked form are one *template*.
If the classifier gives a template's first member an expert index, the digit run holding it
is the *expert run*, and members that agree on every other run (the layer, usually) form a
*group*, classified through its first member, whose expert index must be the value of its
expert run. The classifier must not care which expert a tensor holds: members spread over
the template (the middle and last of every fourth group, and of the last group) are
classified too, and each must get its group's class with its own expert index. A template
that fails a check or mixes numbers of dimensions, and every tensor whose class has no
expert index, is classified tensor by tensor. :func:`classify_groups` therefore gives what
calling :func:`~moescope.arch.moe.classify` on every tensor gives, grouped
(``tests/test_params_configs.py`` checks this on every family's layout).
"""

from __future__ import annotations

import re
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from itertools import groupby, repeat
from operator import getitem
from typing import Any, NamedTuple, cast

from moescope.arch.inventory import Inventory
from moescope.arch.moe import MoESpec, TensorClass, classify
from moescope.errors import MoescopeError

__all__ = ["ClassGroup", "ShardClassifier", "classify_groups", "spec_from_names"]

#: below this many tensors the per-tensor path is as fast and simpler
_MIN_TENSORS_FOR_GROUPING = 512
_BLANK = str.maketrans("0123456789", "\0" * 10)
_RUN_RE = re.compile("\0+")


class ClassGroup(NamedTuple):
    """Tensors of one class.

    Attributes:
        cls: their class, with ``expert`` set to None (see ``experts``).
        positions: where the tensors are in the inventory, ascending (a list, or a range when
            they came evenly spaced from :class:`ShardClassifier`).
        experts: the expert indices the tensors hold (each tensor holds one), or None when the
            class has none (``cls`` is then exactly what :func:`~moescope.arch.moe.classify` returns).
    """

    cls: TensorClass
    positions: Sequence[int]
    experts: set[int] | None


def _single(i: int, name: str, ndim: int, spec: MoESpec) -> ClassGroup:
    c = classify(name, spec, ndim)
    if c.expert is None:
        return ClassGroup(c, [i], None)
    return ClassGroup(c._replace(expert=None), [i], {c.expert})


def classify_groups(
    tensors: Inventory, spec: MoESpec, min_tensors: int = _MIN_TENSORS_FOR_GROUPING
) -> list[ClassGroup]:
    """Classify every tensor, grouped by class (see the module docstring for how).

    Args:
        tensors: the inventory.
        spec: the checkpoint's :class:`~moescope.arch.moe.MoESpec`.
        min_tensors: smaller inventories are classified tensor by tensor (as fast, simpler).

    Returns:
        Groups covering every tensor exactly once, ordered by their first tensor's position.
    """
    n = len(tensors)
    names = tensors.names
    ndims = list(map(len, tensors.shapes))
    joined = "\n".join(names)
    if n < min_tensors or "\0" in joined or joined.count("\n") != n - 1:
        return [_single(i, names[i], ndims[i], spec) for i in range(n)]
    templates: defaultdict[str, list[int]] = defaultdict(list)
    for i, tpl in enumerate(joined.translate(_BLANK).split("\n")):
        templates[tpl].append(i)
    out: list[ClassGroup] = []
    for tpl, index in templates.items():
        out.extend(_template_groups(tpl, index, names, ndims, spec))
    out.sort(key=lambda g: g.positions[0])
    return out


def _template_groups(
    tpl: str, index: list[int], names: list[str], ndims: list[int], spec: MoESpec
) -> list[ClassGroup]:
    """The groups of one template (names equal up to their digits)."""
    first = index[0]
    c0 = classify(names[first], spec, ndims[first])
    if len(index) == 1 or c0.expert is None:
        return [_single(i, names[i], ndims[i], spec) for i in index]
    runs = [m.span() for m in _RUN_RE.finditer(tpl)]
    rep = names[first]
    # an expert number has at most 18 digits (the classifier's own limit; int() stays cheap)
    hits = [k for k, (a, b) in enumerate(runs) if b - a <= 18 and int(rep[a:b]) == c0.expert]
    if not hits or len(set(map(ndims.__getitem__, index))) != 1:
        return [_single(i, names[i], ndims[i], spec) for i in index]
    expert = slice(*runs[hits[-1]])  # the expert's number comes after the layer's
    others = [slice(a, b) for k, (a, b) in enumerate(runs) if k != hits[-1]]
    t_names = list(map(names.__getitem__, index))
    # members that agree on the other runs (the layer) are usually stored next to each other
    if not others:
        keys: list[object] = [None] * len(index)
    elif len(others) == 1:
        keys = list(map(getitem, t_names, repeat(others[0])))
    else:
        keys = list(zip(*(map(getitem, t_names, repeat(sl)) for sl in others), strict=True))
    spans = [len(list(g)) for _, g in groupby(keys)]
    if len(spans) > max(8, len(index) // 4):  # interleaved: gather each key's members first
        by_key: defaultdict[object, list[int]] = defaultdict(list)
        for k, i in zip(keys, index, strict=True):
            by_key[k].append(i)
        parts = [(m, [names[i] for i in m]) for m in by_key.values()]
    else:
        parts, start = [], 0
        for count in spans:
            parts.append((index[start : start + count], t_names[start : start + count]))
            start += count
    ints = _Ints()
    groups = []
    for members, m_names in parts:
        # one class per group, from its first member; the expert index is read from the name
        c = classify(m_names[0], spec, ndims[members[0]])
        if c.expert is None and c.component != "routed_experts":
            # a layer whose per-expert tensors are not routed experts (an MTP layer after the
            # decoder is all ``mtp``): one class and no expert index, spot-checked below
            groups.append(ClassGroup(c, members, None))
            continue
        if c.expert != ints[m_names[0][expert]]:
            return [_single(i, names[i], ndims[i], spec) for i in index]
        found = set(map(ints.__getitem__, cast(Iterator[str], map(getitem, m_names, repeat(expert)))))
        groups.append(ClassGroup(c._replace(expert=None), members, found))
    # the classifier must not care which expert it is: spot-check members across the template
    for g in (*groups[:: max(1, len(groups) // 4)], groups[-1]):
        for i in (g.positions[len(g.positions) // 2], g.positions[-1]):
            want = g.cls if g.experts is None else g.cls._replace(expert=ints[names[i][expert]])
            if classify(names[i], spec, ndims[i]) != want:
                return [_single(j, names[j], ndims[j], spec) for j in index]
    return groups


class _Ints(dict[str, int]):
    """``int(text)`` for the few distinct expert numbers, parsed once each."""

    def __missing__(self, text: str) -> int:
        value = self[text] = int(text)
        return value


class ShardClassifier:
    """Classify each shard's tensors where its header is parsed, so that work is split too.

    Pass an instance as ``per_shard`` to :func:`moescope.checkpoint.ref.open_checkpoint`: given
    the config, it works out the spec the accounting will use (None when the config has a
    problem: the accounting then finds and reports it) and returns the per-shard function,
    which runs :func:`classify_groups` on one shard's tensors (in the forked child for half of
    them, see :mod:`moescope.checkpoint.shards`). :meth:`groups` then joins the shards' groups into the
    whole inventory's, positions shifted by the tensors before each shard; each tensor's
    class does not depend on which others are classified with it, so this is what
    :func:`classify_groups` on the whole inventory gives, with a class's members split into
    one group per shard.
    """

    def __init__(self) -> None:
        self.spec: MoESpec | None = None

    def __call__(self, config: dict[str, Any] | None) -> Callable[[Inventory], Any] | None:
        self.spec = spec = _spec_or_none(config)
        if spec is None:
            return None

        def classify_shard(tensors: Inventory) -> list[tuple[Any, ...]] | None:
            try:
                return [(tuple(g.cls), _pack(g.positions), g.experts) for g in classify_groups(tensors, spec)]
            except Exception:  # whatever it is, the whole-inventory pass meets it again and says so
                return None

        return classify_shard

    def groups(self, shard_extras: list[tuple[int, Any]] | None, spec: MoESpec) -> list[ClassGroup] | None:
        """The whole inventory's groups from the shards' (see the class docstring), or None
        when a shard has none or they were made for another spec."""
        if shard_extras is None or self.spec != spec or any(e is None for _, e in shard_extras):
            return None
        out: list[ClassGroup] = []
        offset = 0
        for count, encoded in shard_extras:
            for cls, packed, experts in encoded:
                out.append(ClassGroup(TensorClass._make(cls), _unpack(packed, offset), experts))
            offset += count
        return out


def _pack(positions: Sequence[int]) -> tuple[int, int, int] | bytes:
    """Positions as they travel back from the forked child: (start, stop, step) when evenly
    spaced (a shard's members of one name shape are: every sixth tensor, say), else raw int64
    bytes (marshal writes 70k small ints ~5x slower than one bytes object)."""
    n = len(positions)
    if n >= 2:
        start, step = positions[0], positions[1] - positions[0]
        stop = start + step * n
        if step > 0 and positions[-1] == stop - step and list(range(start, stop, step)) == positions:
            return start, stop, step
    return array("q", positions).tobytes()


def _unpack(packed: tuple[int, int, int] | bytes, offset: int) -> Sequence[int]:
    """:func:`_pack`'s positions, shifted by ``offset``; a range when evenly spaced."""
    if isinstance(packed, tuple):
        start, stop, step = packed
        return range(start + offset, stop + offset, step)
    values = array("q")
    values.frombytes(packed)
    return list(map(offset.__add__, values)) if offset else values.tolist()


def _spec_or_none(config: dict[str, Any] | None) -> MoESpec | None:
    """The spec :func:`moescope.accounting.params.account` derives from this config, or None if it fails."""
    from moescope.arch.specfile import config_spec

    if config is None:
        return None
    try:
        return config_spec(config, "")[1]
    except MoescopeError:
        return None


def spec_from_names(tensors: Inventory) -> MoESpec:
    """Spec for a bare safetensors file: experts detected from names, top-k unknown."""
    spec = MoESpec(model_type="unknown", family="unknown", known=False)
    layers: set[int] = set()
    experts: dict[int, set[int]] = defaultdict(set)
    fused: dict[int, int] = defaultdict(int)  # a fused [E, ...] tensor holds experts 0..E-1
    for g in classify_groups(tensors, spec):
        c = g.cls
        if c.layer is not None:
            layers.add(c.layer)
        if c.component != "routed_experts" or c.layer is None:
            continue
        if g.experts is not None:
            experts[c.layer].update(g.experts)
            continue
        for i in g.positions:
            shape = tensors.shapes[i]
            if len(shape) >= 2:
                # a count, not range(E): an empty tensor's header may claim any first dimension
                fused[c.layer] = max(fused[c.layer], shape[0])
                experts.setdefault(c.layer, set())
    spec.num_layers = max(layers) + 1 if layers else 0
    if experts:
        spec.moe_layers = sorted(experts)
        # experts 0..E-1 of the fused tensors, plus per-expert indices beyond them
        spec.num_experts = max(fused[i] + sum(1 for e in v if e >= fused[i]) for i, v in experts.items())
        spec.is_moe = spec.num_experts > 1
    spec.tie_word_embeddings = not any("lm_head" in name for name in tensors.names)
    return spec
