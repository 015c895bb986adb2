"""Score stage: one number per (layer, expert) from a trace; higher means more worth keeping.

Criteria: ``frequency`` (tokens routed), ``soft`` (sum of gate weights), ``reap`` (mean over
routed tokens of gate x expert-output norm), ``ean`` (sum of output norms) or ``random`` (a
seeded baseline). ``balance_domains`` normalises each domain's loads to sum to one per layer
before averaging them, so a large domain cannot outvote a small one.

The trace is a :class:`moescope.tracedir.files.TraceDir` (the one loader). A criterion that needs
data the trace lacks (``summary.json`` ``lacks``: e.g. ``out_norms`` for routing imported
from elsewhere) is refused with the missing data named, never scored from zeros.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from moescope.errors import PruneError
from moescope.tracedir.files import TraceDir

CRITERIA = ("frequency", "soft", "reap", "ean", "random")

#: what each criterion needs beyond routing counts, as named in ``summary.json`` ``lacks``
NEEDS: dict[str, tuple[str, ...]] = {
    "frequency": (),
    "soft": ("gate_weights",),
    "reap": ("gate_weights", "out_norms"),
    "ean": ("out_norms",),
    "random": (),
}

_WHAT = {
    "gate_weights": "the gate weights the router applied",
    "out_norms": "the norms of the experts' outputs",
    "domains": "per-domain loads",
}


def expert_scores(
    trace: TraceDir, criterion: str, *, seed: int = 0, balance_domains: bool = False
) -> pd.DataFrame:
    """One score per (layer, expert): higher means more worth keeping.

    Args:
        trace: the trace to score from.
        criterion: ``frequency``, ``soft``, ``reap``, ``ean`` or ``random``.
        seed: seed of the ``random`` baseline.
        balance_domains: average per-domain normalised loads instead of pooled loads.

    Returns:
        DataFrame with columns ``layer, expert, score``, every expert of every MoE layer
        (experts the trace never saw score 0).

    Raises:
        PruneError: unknown criterion, a criterion (or ``balance_domains``) that needs data
            the trace lacks, or ``balance_domains`` without the per-domain columns the
            criterion needs.
    """
    if criterion not in CRITERIA:
        raise PruneError(f"unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}.")
    check_trace_has(trace, criterion, balance_domains=balance_domains)
    num_experts = trace.num_experts
    grid = pd.MultiIndex.from_product([trace.layers, range(num_experts)], names=["layer", "expert"])
    if criterion == "random":
        rng = np.random.default_rng(seed)
        return pd.DataFrame({"score": rng.random(len(grid))}, index=grid).reset_index()
    if balance_domains:
        if trace.domain_load is None or trace.domain_load["domain"].nunique() == 0:
            raise PruneError(
                f"{trace.path} has no domain_load.csv; --balance-domains needs a trace of a corpus with "
                "domains (e.g. the built-in `demo`)."
            )
        frame = trace.domain_load.copy()
        frame["score"] = _criterion_values(frame, criterion, where=trace.path / "domain_load.csv")
        totals = frame.groupby(["domain", "layer"])["score"].transform("sum")
        frame["score"] = (frame["score"] / totals.where(totals > 0)).fillna(0.0)
        # Average over every domain, counting an expert a domain never used as 0.
        n_domains = frame["domain"].nunique()
        pooled = frame.groupby(["layer", "expert"])["score"].sum() / n_domains
    else:
        frame = trace.expert_load.copy()
        frame["score"] = _criterion_values(frame, criterion, where=trace.path / "expert_load.csv")
        pooled = frame.groupby(["layer", "expert"])["score"].sum()
    return pd.DataFrame({"score": pooled.reindex(grid, fill_value=0.0).astype(float)}).reset_index()


def check_trace_has(trace: TraceDir, criterion: str, *, balance_domains: bool = False) -> None:
    """Refuse a criterion whose data the trace lacks (``summary.json`` ``lacks``), naming it.

    Raises:
        PruneError: which data is missing, why a trace lacks it, and the criteria that work.
    """
    lacks = set(trace.lacks)
    missing = [need for need in NEEDS[criterion] if need in lacks]
    if balance_domains and "domains" in lacks:
        missing.append("domains")
    if not missing:
        return
    usable = [c for c, needs in NEEDS.items() if not lacks.intersection(needs)]
    what = "; ".join(f"{m} ({_WHAT.get(m, m)})" for m in missing)
    fixes = []
    if missing != ["domains"]:
        fixes.append(f"use --criterion {' or '.join(usable)}")
    if "domains" in missing:
        fixes.append("drop --balance-domains")
    raise PruneError(
        f"--criterion {criterion}{' --balance-domains' if balance_domains else ''} needs data that "
        f"{trace.path} lacks: {what}. Its summary.json records lacks = {sorted(lacks)} (routing "
        f"imported from elsewhere, or a model whose experts could not be observed); "
        f"{' and '.join(fixes)}, or trace the model with `moescope trace`."
    )


def _criterion_values(frame: pd.DataFrame, criterion: str, *, where: Path) -> pd.Series:
    needs = {
        "frequency": ["count"],
        "soft": ["weight_sum"],
        "reap": ["weighted_out_norm_sum", "count"],
        "ean": ["out_norm_sum"],
    }[criterion]
    missing = [c for c in needs if c not in frame.columns or frame[c].isna().all()]
    if missing:
        raise PruneError(
            f"{where} has no {', '.join(missing)} column, which criterion {criterion!r} needs; "
            "use --criterion frequency or soft, or re-run `moescope trace` with this version."
        )
    if criterion == "frequency":
        return frame["count"].astype(float)
    if criterion == "soft":
        return frame["weight_sum"].astype(float)
    if criterion == "ean":
        return frame["out_norm_sum"].astype(float)
    count = frame["count"].astype(float)
    return (frame["weighted_out_norm_sum"].astype(float) / count.where(count > 0)).fillna(0.0)
