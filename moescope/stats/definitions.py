"""What each report statistic means, and which statistics a trace's missing data rules out.

What: :data:`DEFINITIONS` states every statistic of :mod:`moescope.stats.report` (and the
similarity and pruning summaries) for people, in one place: the HTML report prints them
beside their tables and the docs can print the same dict. :data:`NEEDS` says which report
items need data a trace may lack (``summary.json`` ``lacks``: routing imported from a
serving engine, say), :data:`WHY` why that data is missing, and :func:`unavailable` which
items a given trace cannot support, so they are shown as "not available", never as zeros.

How: plain data; the thresholds come from :mod:`moescope.stats.report` so the text cannot drift
from the code.
"""

from __future__ import annotations

from collections.abc import Iterable

from moescope.stats.report import MIN_EXPECTED, MIN_PAIR_COUNT, NEAR_DEAD_FRACTION, SIGNIFICANCE

__all__ = ["DEFINITIONS", "NEEDS", "WHY", "unavailable"]

#: statistic -> definition (the formulas of :mod:`moescope.stats.report`, stated for people)
DEFINITIONS: dict[str, str] = {
    "load share": "p_e = count_e / Σ count: the share of a layer's token-expert assignments that went "
    "to expert e.",
    "max/mean": "The busiest expert's load over the mean load; 1 is perfectly even. The busiest expert "
    "sets the step time when experts run in parallel.",
    "cv": "Coefficient of variation of the expert loads: population standard deviation / mean.",
    "entropy": "H(p) / ln E: the entropy of the load shares over its maximum; 1 is perfectly even. Not "
    "comparable across expert counts (8 evenly busy experts read 1.0 out of 8, 0.375 out of 256): "
    "compare effective experts instead.",
    "effective experts": "exp(H(p)): how many equally loaded experts would give the same entropy (E when "
    "perfectly even); divided by E it is a share comparable across expert counts. The Gini coefficient "
    "of the loads (0 even) is in --json.",
    "dead / near-dead": f"Dead: no token chose the expert. Near-dead: some did, but fewer than "
    f"{NEAR_DEAD_FRACTION:g} × the layer's mean count.",
    "top-1 weight": "Mean over tokens of the largest gate weight the router applied.",
    "confidence": "Tokens per bin of the top-1 share: the largest gate weight / the sum of the token's "
    "gate weights. 1/k is an even split over the k chosen experts.",
    "reuse/chance": "Reuse: the share of a token's experts also chosen by the previous token of the same "
    "document and window. Chance: Σ q_e² / k with q_e = count_e / tokens, the reuse of independent "
    "tokens with the same loads. Above 1: neighbouring tokens share experts.",
    "co-activation": "Observed pair count / expected count under a null model in which every token "
    "draws k distinct experts with the layer's observed frequencies (successive sampling without "
    "replacement, weights fitted so each expert's inclusion rate matches its load; computed exactly). "
    f"Random routing scores 1.0. Pairs seen fewer than {MIN_PAIR_COUNT} times are left out. Significance: "
    "under the null a pair's count is Binomial(tokens, expected / tokens); the exact upper-tail p-value is "
    f"corrected by Benjamini-Hochberg over every pair of every layer expected {MIN_EXPECTED:g}+ times, and "
    f"only pairs with q ≤ {SIGNIFICANCE:g} are listed, ranked by the {1 - SIGNIFICANCE:.0%} lower "
    "confidence bound of the ratio (small expected counts inflate the ratio itself).",
    "domain JSD": "Mean Jensen-Shannon divergence (bits: 0 identical, 1 disjoint) between the expert "
    "loads of every two domains at the layer.",
    "JSD vs other domains": "Jensen-Shannon divergence (bits) between one domain's expert loads and those "
    "of all other domains pooled, averaged over layers.",
    "router dropped": "Tokens the model itself dropped (a switch router's own capacity limit).",
    "capacity": "Per capacity group (a fixed number of consecutive tokens, summary.json capacity_group, "
    "default 4096; GShard's group), each expert takes at most ceil(C × group × k / E) assignments; the "
    "assignments over that limit are dropped (counted while tracing; independent of the batch size).",
    "expert parallelism": "D devices with E/D experts each, contiguous (e // (E/D)) or balanced "
    "(longest-processing-time greedy fitted on one half of the documents and scored on the other, both "
    "ways, averaged; the contiguous placement is scored on the same two halves). Imbalance: busiest device / mean device load, over the whole trace and per batch.",
    "all-to-all": "Tokens are spread evenly over the D devices, so an assignment is remote with "
    "probability (D−1)/D and moves hidden_size × dtype bytes there and back (×2), in the checkpoint's "
    "dtype; dedup sends a "
    "token once per distinct remote device (contiguous placement).",
    "redundancy": "Mean of the available measures among weights (cosine of two experts' parameters after "
    "aligning their hidden neurons, so a permuted copy scores 1), router (cosine of the router rows) "
    "and outputs (mean cosine of two experts' outputs on the same sampled tokens). weight_raw (the "
    "cosine without alignment) and co-activation (Jaccard overlap of the tokens two experts serve) "
    "are shown, not averaged in. A layer's score is the mean over experts of each one's highest "
    "redundancy with another expert.",
    "pruning plan": "Experts kept and dropped per layer, the criterion's score of each expert (higher "
    "is more worth keeping) and the share of the trace's routed tokens and gate weight that went to "
    "the dropped experts.",
}

#: report item -> ``lacks`` entries (``summary.json``), any one of which makes it unavailable
NEEDS: dict[str, tuple[str, ...]] = {
    "mean_top1_weight": ("gate_weights", "per_token"),
    "confidence": ("gate_weights", "per_token"),
    "reuse_rate": ("token_order", "per_token"),
    "reuse_chance": ("token_order", "per_token"),
    "reuse_ratio": ("token_order", "per_token"),
    "coact_max_ratio": ("coactivation", "per_token"),
    "coactivation": ("coactivation", "per_token"),
    "domain_jsd": ("domains",),
    "domains": ("domains",),
    "capacity": ("capacity", "per_token", "batches"),
    "batch_imbalance": ("expert_parallel", "per_token", "batches"),
    "bytes_per_token_dedup": ("expert_parallel", "per_token", "batches"),
}

#: ``lacks`` entry -> why the data is missing
WHY: dict[str, str] = {
    "gate_weights": "the routing was recorded without the gate weights the router applied",
    "out_norms": "the experts' output norms were not recorded",
    "domains": "the corpus had no domain labels",
    "token_order": "the routing was recorded without token order, so neighbouring tokens cannot be compared",
    "coactivation": "only per-expert counts were recorded, not which experts each token chose together",
    "per_token": "only per-expert counts were recorded, not each token's choice",
    "batches": "the routing was recorded without batch boundaries",
    "capacity": "the routing was recorded as counts only, so per-batch drops at a capacity cannot be counted",
    "expert_parallel": "the routing was recorded as counts only, so per-batch device loads and "
    "per-token traffic cannot be counted",
}


def unavailable(lacks: Iterable[str], has_domains: bool = True) -> dict[str, str]:
    """Report item -> why, for each item of :data:`NEEDS` the trace's data cannot support."""
    missing = set(lacks) | (set() if has_domains else {"domains"})
    out = {}
    for item, needs in NEEDS.items():
        hit = [n for n in needs if n in missing]
        if hit:
            out[item] = WHY.get(hit[0], f"the trace lacks {hit[0]}")
    return out
