"""The similarity report's data: per-layer ``[E, E]`` matrices and the pairs and scores derived from them.

:class:`LayerSimilarity` holds one MoE layer's matrices, one per measure of :data:`MEASURES`;
:class:`SimilarityReport` the layers of one model, with the pairs (most redundant first) and
per-layer scores as DataFrames. Computing the matrices is :mod:`moescope.redundancy.run`'s
work; writing and reading them, :mod:`moescope.redundancy.files`'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["MEASURES", "REDUNDANCY_MEASURES", "LayerSimilarity", "SimilarityReport"]

MEASURES = ("weights", "weight_raw", "router", "outputs", "coactivation")
REDUNDANCY_MEASURES = ("weights", "router", "outputs")


@dataclass
class LayerSimilarity:
    """Similarity matrices of one MoE layer.

    Attributes:
        layer: decoder layer index as in the checkpoint.
        num_experts: experts in the layer.
        matrices: measure name -> ``[E, E]`` array (symmetric, diagonal 1).
    """

    layer: int
    num_experts: int
    matrices: dict[str, np.ndarray] = field(default_factory=dict)

    def redundancy(self) -> np.ndarray:
        """Mean of the available weights/router/outputs matrices."""
        mats = [self.matrices[m] for m in REDUNDANCY_MEASURES if m in self.matrices]
        if not mats:
            mats = list(self.matrices.values())
        return np.mean(mats, axis=0)


@dataclass
class SimilarityReport:
    """Per-layer similarity of every expert pair.

    Attributes:
        model: model reference.
        layers: one :class:`LayerSimilarity` per MoE layer.
        samples: tokens per layer used for ``outputs`` (0 when not measured).
        trace: trace directory used for ``coactivation``, if any.
    """

    model: str
    layers: list[LayerSimilarity]
    samples: int = 0
    trace: str | None = None

    @property
    def measures(self) -> list[str]:
        """Measures present in every layer, in :data:`MEASURES` order."""
        return [m for m in MEASURES if self.layers and all(m in ls.matrices for ls in self.layers)]

    def pairs(self) -> pd.DataFrame:
        """Every unordered pair per layer, most redundant first within each layer.

        Columns: ``layer, expert_a, expert_b, redundancy, rank`` and one per measure.
        """
        rows: list[dict[str, Any]] = []
        for ls in self.layers:
            red = ls.redundancy()
            a_idx, b_idx = np.triu_indices(ls.num_experts, k=1)
            layer_rows = []
            for a, b in zip(a_idx.tolist(), b_idx.tolist(), strict=True):
                row: dict[str, Any] = {"layer": ls.layer, "expert_a": a, "expert_b": b}
                row["redundancy"] = float(red[a, b])
                for m in self.measures:
                    row[m] = float(ls.matrices[m][a, b])
                layer_rows.append(row)
            layer_rows.sort(key=lambda r: (-r["redundancy"], r["expert_a"], r["expert_b"]))
            for i, row in enumerate(layer_rows):
                row["rank"] = i + 1
            rows.extend(layer_rows)
        cols = ["layer", "expert_a", "expert_b", "rank", "redundancy", *self.measures]
        return pd.DataFrame(rows, columns=cols)

    def layer_scores(self) -> pd.DataFrame:
        """Per layer: ``redundancy`` (mean nearest-neighbour redundancy), the top pair and its value."""
        rows = []
        for ls in self.layers:
            red = ls.redundancy().copy()
            np.fill_diagonal(red, -np.inf)
            a, b = np.unravel_index(int(np.argmax(red)), red.shape)
            row: dict[str, Any] = {
                "layer": ls.layer,
                "redundancy": float(np.mean(red.max(axis=1))),
                "top_pair": f"{min(a, b)}-{max(a, b)}",
                "top_pair_redundancy": float(red[a, b]),
            }
            for m in self.measures:
                mat = ls.matrices[m].copy()
                np.fill_diagonal(mat, np.nan)
                row[f"mean_{m}"] = float(np.nanmean(mat))
            rows.append(row)
        return pd.DataFrame(rows)
