"""Read a trace directory for pruning and similarity: ``summary.json`` and the load tables.

:func:`read_trace` is the one place in the prune package that knows the trace format; it
will give way to the shared trace-directory loader (issue 9, part 3).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moescope.errors import TraceError


@dataclass(frozen=True)
class TraceData:
    """What pruning and similarity read from a trace directory.

    Attributes:
        path: the trace directory.
        summary: ``summary.json`` as a dict.
        expert_load: ``expert_load.csv`` (``layer, expert, count, weight_sum, out_norm_sum,
            weighted_out_norm_sum``).
        domain_load: ``domain_load.csv`` (``domain, layer, expert, count, weight_sum``) or None.
        coactivation: ``coactivation.csv`` (``layer, expert_a, expert_b, count``) or None.
    """

    path: Path
    summary: dict[str, Any]
    expert_load: pd.DataFrame
    domain_load: pd.DataFrame | None
    coactivation: pd.DataFrame | None

    @property
    def model(self) -> str | None:
        """The model reference the trace was recorded on."""
        value = self.summary.get("model")
        return str(value) if value is not None else None

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer."""
        value = self.summary.get("num_experts")
        if value is None:
            return int(self.expert_load["expert"].max()) + 1
        return int(value)

    @property
    def top_k(self) -> int | None:
        """Experts per token, when the summary records it."""
        value = self.summary.get("top_k")
        return int(value) if value is not None else None

    @property
    def layers(self) -> list[int]:
        """MoE layer indices (decoder layer numbers, as in the checkpoint)."""
        for key in ("moe_layers", "layers", "moe_layer_indices"):
            value = self.summary.get(key)
            if isinstance(value, list) and value:
                return sorted(int(v) for v in value)
        return sorted(int(v) for v in self.expert_load["layer"].unique())


def read_trace(path: str | Path) -> TraceData:
    """Read a trace directory written by ``moescope trace``.

    Args:
        path: the directory passed to ``moescope trace --out``.

    Returns:
        The parsed trace.

    Raises:
        TraceError: the directory, ``summary.json`` or ``expert_load.csv`` is missing or
            malformed, or the trace is marked incomplete.
    """
    root = Path(path).expanduser()
    summary_path = root / "summary.json"
    load_path = root / "expert_load.csv"
    if not root.is_dir():
        raise TraceError(f"{root}: no such trace directory; run `moescope trace MODEL CORPUS --out {root}`.")
    for p in (summary_path, load_path):
        if not p.exists():
            raise TraceError(f"{root} has no {p.name}; it is not a complete trace, re-run `moescope trace`.")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        raise TraceError(f"{summary_path}: malformed JSON ({exc.msg}); re-run `moescope trace`.") from exc
    if not isinstance(summary, dict):
        raise TraceError(f"{summary_path}: expected a JSON object; re-run `moescope trace`.")
    if summary.get("complete") is False:
        raise TraceError(f"{root}: the trace is marked incomplete (interrupted?); re-run `moescope trace`.")
    load = _read_csv(load_path, ("layer", "expert", "count"))
    for col in ("weight_sum", "out_norm_sum", "weighted_out_norm_sum"):
        if col not in load.columns:
            load[col] = np.nan
    domain = root / "domain_load.csv"
    coact = root / "coactivation.csv"
    return TraceData(
        path=root,
        summary=summary,
        expert_load=load,
        domain_load=_read_csv(domain, ("domain", "layer", "expert", "count")) if domain.exists() else None,
        coactivation=(
            _read_csv(coact, ("layer", "expert_a", "expert_b", "count")) if coact.exists() else None
        ),
    )


def _read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot parse CSV ({exc}); re-run `moescope trace`.") from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise TraceError(
            f"{path}: missing column(s) {', '.join(missing)}; it was written by another version, "
            "re-run `moescope trace`."
        )
    return frame
