"""Compare ``moescope params`` with published parameter figures (``sample_configs/published.json``).

Used by ``scripts/sample_table.py`` (which writes ``sample_configs/README.md``) and by the
tests. A published figure "fits" when moescope's number under the stated convention is
within 0.5% of it, or, for figures published with few significant digits, rounds to it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moescope.accounting.params import count_params

TOLERANCE = 0.005


def significant_digits(x: float) -> int:
    """Significant digits of a figure as written (12.9e9 -> 3, 37e9 -> 2)."""
    digits = f"{x:.6e}".split("e")[0].replace(".", "").rstrip("0")
    return max(1, len(digits))


def rounds_to(value: float, published: float) -> bool:
    """Whether ``value`` rounded to the published figure's significant digits equals it."""
    d = significant_digits(published)
    exp = math.floor(math.log10(abs(published)))
    unit = 10 ** (exp - d + 1)
    return abs(value - published) <= unit / 2


@dataclass
class Comparison:
    file: str
    model_type: str
    is_moe: bool
    total: int
    active: int | None
    active_no_embedding: int | None
    published_total: float | None
    published_active: float | None
    convention: str
    total_diff: float | None
    active_diff: float | None
    fit: str
    source: str
    note: str


def _fit(ours: float | None, published: float | None) -> tuple[float | None, str]:
    if ours is None or published is None:
        return None, "-"
    diff = (ours - published) / published
    if abs(diff) <= TOLERANCE:
        return diff, "within 0.5%"
    if rounds_to(ours, published):
        return diff, "rounds to published"
    return diff, "no"


def compare(root: Path) -> list[Comparison]:
    """Account every model listed in ``root/published.json`` and compare with its figures."""
    data: dict[str, Any] = json.loads((root / "published.json").read_text())
    out = []
    for m in data["models"]:
        r = count_params(str(root / m["file"]))
        conv = m["convention"]
        ours_active = (
            r.active_params_no_embedding if conv == "active_params_no_embedding" else r.active_params
        )
        tdiff, _ = _fit(r.total_params, m.get("total"))
        adiff, afit = _fit(ours_active, m.get("active")) if conv != "none" else (None, "none fits")
        if m.get("active") is None:
            afit = "total only"
            tdiff, afit_t = _fit(r.total_params, m.get("total"))
            afit = f"total {afit_t}"
        out.append(
            Comparison(
                m["file"],
                r.model_type,
                r.is_moe,
                r.total_params,
                r.active_params,
                r.active_params_no_embedding,
                m.get("total"),
                m.get("active"),
                conv,
                tdiff,
                adiff,
                afit,
                m["source"],
                m.get("note", ""),
            )
        )
    return out
