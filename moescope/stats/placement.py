"""Expert-parallel what-ifs of a trace: device placement, load imbalance, all-to-all bytes.

What: :func:`expert_parallel` is the report's expert-parallel table (definitions in
:mod:`moescope.stats.report`): per layer and EP degree, the device load imbalance of the
contiguous placement and of the balanced one (:func:`balanced_placement`, fitted on one
corpus half and scored on the other; the contiguous one is scored on the same two halves),
and all-to-all bytes per token in the checkpoint's
activation dtype (:func:`a2a_dtype`).

How: everything comes from the state's counts (``counts``, ``half_counts``) and the
sums counted online (``ep_distinct``, ``ep_batch_max``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from moescope.tracedir.state import EP_DEGREES, TraceState

__all__ = ["a2a_dtype", "balanced_placement", "expert_parallel"]

_DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}


def _safe_div(a: Any, b: Any) -> Any:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(b) != 0, np.asarray(a, dtype=np.float64) / np.asarray(b), np.nan)


def balanced_placement(load: np.ndarray, degree: int) -> np.ndarray:
    """Device of each expert: longest-processing-time greedy, ``E/degree`` experts per device.

    Args:
        load: ``[E]`` expert loads.
        degree: devices.

    Returns:
        ``[E]`` device index per expert.
    """
    n_e = len(load)
    per = n_e // degree
    device = np.full(n_e, -1, dtype=np.int64)
    dev_load = np.zeros(degree)
    dev_n = np.zeros(degree, dtype=np.int64)
    for e in np.argsort(-load, kind="stable"):
        open_ = np.nonzero(dev_n < per)[0]
        d = open_[np.argmin(dev_load[open_])]
        device[e] = d
        dev_load[d] += load[e]
        dev_n[d] += 1
    return device


def a2a_dtype(state: TraceState, dtype_bytes: int | None = None) -> dict[str, Any]:
    """The activation dtype of the all-to-all estimate: ``{"dtype", "bytes", "source"}``.

    ``source`` is ``dtype_bytes`` (given), ``checkpoint`` (the checkpoint's dtype recorded
    at trace time) or ``traced`` (the dtype the trace ran in; older traces).
    """
    if dtype_bytes:
        return {"dtype": None, "bytes": int(dtype_bytes), "source": "dtype_bytes"}
    for source, key in (("checkpoint", "checkpoint_dtype"), ("traced", "dtype")):
        name = state.meta.get(key)
        if name in _DTYPE_BYTES:
            return {"dtype": name, "bytes": _DTYPE_BYTES[name], "source": source}
    return {"dtype": None, "bytes": 2, "source": "default"}


def _held_out_imbalance(fit: np.ndarray, score: np.ndarray, degree: int) -> float:
    """Busiest / mean device load on ``score`` of the balanced placement fitted on ``fit``."""
    if score.sum() == 0 or fit.sum() == 0:
        return float("nan")
    dev = np.bincount(balanced_placement(fit, degree), weights=score, minlength=degree)
    return float(dev.max() / dev.mean())


def _contiguous_imbalance(score: np.ndarray, degree: int) -> float:
    """Busiest / mean device load on ``score`` of the contiguous placement (``e // (E/D)``)."""
    if score.sum() == 0:
        return float("nan")
    dev = score.reshape(degree, -1).sum(axis=1)
    return float(dev.max() / dev.mean())


def expert_parallel(state: TraceState, dtype_bytes: int | None = None) -> pd.DataFrame:
    """Per (layer, EP degree, placement): device load imbalance and all-to-all bytes per token.

    Args:
        state: trace sums.
        dtype_bytes: bytes per activation element; default: the checkpoint's dtype
            (:func:`a2a_dtype`).

    Returns:
        Columns ``layer, degree, placement, experts_per_device, imbalance,
        imbalance_in_sample, batch_imbalance, bytes_per_token, bytes_per_token_dedup``
        (``imbalance``: mean over the two held-out halves for both placements, the balanced one
        fitted on the other half; see the module docstring).
    """
    hidden = state.meta.get("hidden_size") or 0
    nbytes = a2a_dtype(state, dtype_bytes)["bytes"]
    n_e, k = state.num_experts, state.top_k
    tokens = max(state.tokens, 1)
    rows = []
    for i, layer in enumerate(state.layers):
        load = state.counts[i].astype(np.float64)
        half_a, half_b = state.half_counts[:, i].astype(np.float64)
        assigned = load.sum()
        for j, deg in enumerate(EP_DEGREES):
            if n_e % deg or deg > n_e:
                continue
            per = n_e // deg
            remote = (deg - 1) / deg
            plain = k * remote * hidden * nbytes * 2
            dedup = state.ep_distinct[i, j] / tokens * remote * hidden * nbytes * 2
            mean_dev = assigned / deg
            contiguous = load.reshape(deg, per).sum(axis=1)
            in_sample = np.bincount(balanced_placement(load, deg), weights=load, minlength=deg)
            held = np.mean(
                [_held_out_imbalance(half_a, half_b, deg), _held_out_imbalance(half_b, half_a, deg)]
            )
            bal_in = float(_safe_div(in_sample.max(), mean_dev))
            cont = float(_safe_div(contiguous.max(), mean_dev))
            # scored on the same halves as the balanced placement, so the two compare like for
            # like (at EP = E both place one expert per device and must read the same)
            cont_held = np.mean([_contiguous_imbalance(half_a, deg), _contiguous_imbalance(half_b, deg)])
            held_ok = bool(np.isfinite(held) and np.isfinite(cont_held))
            for placement, imb, imb_in, batch_imb, dd in (
                (
                    "contiguous",
                    cont_held if held_ok else cont,
                    cont,
                    _safe_div(state.ep_batch_max[i, j], mean_dev),
                    dedup,
                ),
                ("balanced", held if held_ok else bal_in, bal_in, float("nan"), float("nan")),
            ):
                rows.append(
                    {
                        "layer": layer,
                        "degree": deg,
                        "placement": placement,
                        "experts_per_device": per,
                        "imbalance": float(imb),
                        "imbalance_in_sample": float(imb_in),
                        "batch_imbalance": float(batch_imb),
                        "bytes_per_token": float(plain),
                        "bytes_per_token_dedup": float(dd),
                    }
                )
    return pd.DataFrame(rows)
