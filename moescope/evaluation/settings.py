"""Routing settings of a sweep: parsed from ``--top-k`` / ``--top-p`` text, checked against a model.

A :class:`Setting` is ``native``, a uniform ``k``/``p`` for every MoE layer, or inclusive
layer ranges each with its own value (``0-11:1,12-:2``; MoE layers no range names keep the
native k). :func:`parse_settings` reads the command-line forms (several settings per value
separated by commas, several per-layer settings by ``;`` or by repeating the option);
:func:`validate_settings` refuses, from the model's config alone (before loading it),
values that do not fit: k above the experts a token may choose, p outside (0, 1], ranges
that hold no MoE layer, families whose routing cannot be overridden.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moescope.evaluation.override import LayerRule, RoutingSettingError, check_layer_rule

_RANGE = re.compile(r"^\s*(\d+)\s*(?:(-)\s*(\d+)?)?\s*:\s*([^:]+?)\s*$")


@dataclass(frozen=True)
class Setting:
    """One routing setting.

    Attributes:
        name: ``native``, ``k=1``, ``p=0.9``, ``k=0-11:1,12-:2``.
        kind: ``native``, ``top_k`` or ``top_p``.
        ranges: ``(first, last or None, value)`` layer ranges; one ``(0, None, v)`` for a
            setting that applies to every layer; empty for ``native``.
    """

    name: str
    kind: str
    ranges: tuple[tuple[int, int | None, float], ...] = ()

    @property
    def uniform(self) -> float | None:
        """The value when the setting applies to every layer alike, else None."""
        if len(self.ranges) == 1 and self.ranges[0][:2] == (0, None):
            return self.ranges[0][2]
        return None

    def rules(self, moe_layers: Sequence[int], native_k: int) -> dict[int, LayerRule]:
        """Layer -> :class:`LayerRule`; layers no range names keep ``native_k``."""
        out = {layer: LayerRule(top_k=native_k) for layer in moe_layers}
        for first, last, value in self.ranges:
            for layer in moe_layers:
                if layer >= first and (last is None or layer <= last):
                    out[layer] = (
                        LayerRule(top_k=int(value)) if self.kind == "top_k" else LayerRule(top_p=float(value))
                    )
        return out


def _number(text: str, kind: str, what: str) -> float:
    try:
        value = int(text) if kind == "top_k" else float(text)
    except ValueError:
        want = "a whole number" if kind == "top_k" else "a number in (0, 1]"
        raise RoutingSettingError(f"--{kind.replace('_', '-')} {what!r}: {text!r} is not {want}.") from None
    if kind == "top_p" and not 0.0 < value <= 1.0:
        raise RoutingSettingError(f"--top-p {what!r}: p must be in (0, 1], got {text}.")
    if kind == "top_k" and value < 1:
        raise RoutingSettingError(f"--top-k {what!r}: k must be at least 1, got {text}.")
    return value


def _fmt(value: float, kind: str) -> str:
    return str(int(value)) if kind == "top_k" else f"{value:g}"


def _parse_one(text: str, kind: str) -> list[Setting]:
    """One ``;``-free chunk: a list of uniform values, or one per-layer setting."""
    letter = "k" if kind == "top_k" else "p"
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise RoutingSettingError(f"--{kind.replace('_', '-')} {text!r}: no values; e.g. 1,2,4.")
    if not any(":" in p for p in parts):
        return [
            Setting(f"{letter}={_fmt(v, kind)}", kind, ((0, None, v),))
            for v in (_number(p, kind, text) for p in parts)
        ]
    ranges: list[tuple[int, int | None, float]] = []
    for part in parts:
        m = _RANGE.match(part)
        if m is None:
            raise RoutingSettingError(
                f"--{kind.replace('_', '-')} {text!r}: {part!r} is not LAYERS:VALUE; per-layer settings read "
                "like 0-11:1,12-:2 (every part with a layer range; separate settings with ';')."
            )
        first = int(m.group(1))
        last = int(m.group(3)) if m.group(3) else (None if m.group(2) else first)
        if last is not None and last < first:
            raise RoutingSettingError(f"--{kind.replace('_', '-')} {text!r}: range {part!r} runs backwards.")
        ranges.append((first, last, _number(m.group(4), kind, text)))
    ranges.sort(key=lambda r: r[0])
    for (_a, last, _v), (first, _b, _w) in zip(ranges, ranges[1:], strict=False):
        if last is None or first <= last:
            raise RoutingSettingError(f"--{kind.replace('_', '-')} {text!r}: layer ranges overlap.")
    name = ",".join(
        f"{a}{'' if b == a else '-' + ('' if b is None else str(b))}:{_fmt(v, kind)}" for a, b, v in ranges
    )
    return [Setting(f"{letter}={name}", kind, tuple(ranges))]


def _as_texts(values: Any) -> list[str]:
    if values is None:
        return []
    if isinstance(values, (str, int, float)):
        values = [values]
    texts = [str(v) for v in values]
    return [chunk for t in texts for chunk in t.split(";") if chunk.strip()]


def parse_settings(top_k: Any = None, top_p: Any = None) -> list[Setting]:
    """Settings from ``top_k`` / ``top_p`` values (strings as on the command line, or numbers).

    Args:
        top_k: ``"1,2,4"``, ``[1, 2, 4]``, ``"0-11:1,12-:2"``, several joined by ``;`` or listed.
        top_p: ``"0.5,0.9"``, ``[0.5, 0.9]`` or per-layer as for ``top_k``.

    Returns:
        The settings in the order given, duplicates removed (``native`` not included).

    Raises:
        RoutingSettingError: a malformed value.
    """
    out: list[Setting] = []
    for kind, values in (("top_k", top_k), ("top_p", top_p)):
        for text in _as_texts(values):
            for s in _parse_one(text, kind):
                if s not in out:
                    out.append(s)
    return out


def default_settings(native_k: int, candidates: int) -> list[Setting]:
    """``k`` in {1, native/2, native, 2 x native}, within ``1..candidates``."""
    ks = sorted({k for k in (1, native_k // 2, native_k, 2 * native_k) if 1 <= k <= candidates})
    return [Setting(f"k={k}", "top_k", ((0, None, float(k)),)) for k in ks]


def candidates_of(spec: Any) -> int:
    """Experts a token may choose from: all, or those of the groups group-limited routing keeps."""
    if spec.n_group > 1:  # arch.groups: (1, 1) unless the family limits groups
        return int(spec.topk_group * (spec.num_experts // spec.n_group))
    return int(spec.num_experts)


def validate_settings(settings: list[Setting], spec: Any, ref: str) -> None:
    """Refuse settings that do not fit the model, from its config (before loading it)."""
    from moescope import families

    record = families.lookup(spec.family)
    from moescope.evaluation.override import SUPPORTED_RULES, UNSUPPORTED_RULES

    if record is None and getattr(spec, "generic", False):
        if any(
            r.top_p is not None for st in settings for r in st.rules(spec.moe_layers, spec.top_k).values()
        ):
            raise RoutingSettingError(
                f"{ref} ({spec.model_type}): no moescope record, so only its router's own top_k can be "
                "changed; top-p settings need the routing rule's probabilities (use --top-k)."
            )
    elif record is None or record.routing.rule not in SUPPORTED_RULES:
        why = (
            UNSUPPORTED_RULES.get(record.routing.rule, "") if record else "its family is unknown to moescope"
        )
        raise RoutingSettingError(
            f"{ref} ({spec.model_type}): {why or 'its routing has no override'}; sweep cannot change its "
            "experts per token."
        )
    layers = list(spec.moe_layers)
    candidates = candidates_of(spec)
    for s in settings:
        for first, last, _v in s.ranges:
            if (first, last) != (0, None) and not any(
                first <= layer and (last is None or layer <= last) for layer in layers
            ):
                raise RoutingSettingError(
                    f"setting {s.name}: layers {first}-{'' if last is None else last} hold no MoE layer of "
                    f"{ref} (MoE layers: {_layer_list(layers)})."
                )
        try:
            for layer, rule in s.rules(layers, spec.top_k).items():
                check_layer_rule(rule, layer=layer, num_experts=spec.num_experts, candidates=candidates)
        except RoutingSettingError as exc:
            raise RoutingSettingError(f"{ref}: {exc}") from None


def _layer_list(layers: Sequence[int]) -> str:
    if layers and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def labels(s: Setting, moe_layers: Sequence[int], native_k: int) -> tuple[Any, Any]:
    """``top_k`` and ``top_p`` record values of a setting."""
    if s.kind == "native":
        return native_k, None
    uniform = s.uniform
    if uniform is not None:
        return (int(uniform), None) if s.kind == "top_k" else (None, float(uniform))
    rules = s.rules(moe_layers, native_k)
    if s.kind == "top_k":
        return {str(layer): int(r.top_k or 0) for layer, r in rules.items()}, None
    per = {str(layer): r.top_p if r.top_p is not None else None for layer, r in rules.items()}
    ks = {str(layer): r.top_k for layer, r in rules.items() if r.top_k is not None}
    return (ks or None), per
