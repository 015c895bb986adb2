"""Regenerate the comparison table in sample_configs/README.md (CI checks it is current).

Usage: python scripts/sample_table.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

from moescope.accounting.published import compare

ROOT = Path(__file__).resolve().parent.parent / "sample_configs"
BEGIN, END = "<!-- table:begin -->", "<!-- table:end -->"


def _b(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e9:,.2f}B" if x < 1e12 else f"{x / 1e12:,.3f}T"


def render() -> str:
    rows = [
        "| config | type | published total | moescope total | published active | convention | moescope (that convention) | diff | fits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in compare(ROOT):
        ours = c.active_no_embedding if c.convention == "active_params_no_embedding" else c.active
        conv = c.convention if c.convention != "none" else f"none: {c.note}"
        diff = "-" if c.active_diff is None else f"{100 * c.active_diff:+.2f}%"
        rows.append(
            f"| {c.file} | {c.model_type}{' (MoE)' if c.is_moe else ''} | {_b(c.published_total)} | {_b(c.total)} | "
            f"{_b(c.published_active)} | {conv} | {_b(ours)} (with emb. {_b(c.active)}, without {_b(c.active_no_embedding)}) | {diff} | {c.fit} |"
        )
    return "\n".join(rows)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render()}\n{END}{tail}"
    if "--check" in sys.argv:
        if new != text:
            print("sample_configs/README.md is stale: run python scripts/sample_table.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
