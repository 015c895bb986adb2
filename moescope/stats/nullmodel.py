"""The co-activation null model: how often two experts would share a token by chance.

What: :func:`expected_pairs` gives, per layer, the probability that a token's ``k``
experts include both ``a`` and ``b`` when every token draws ``k`` *distinct* experts at
random with the layer's observed marginal frequencies and nothing else (no preference
for pairs). Observed pair counts divided by ``tokens × π_ab`` then score 1.0 for random
routing; the old "independent choices" baseline ``tokens × q_a × q_b`` scored about
0.57 for uniform random routing with ``k=2, E=8``, because a token never picks one expert
twice.

How: the random draw is *successive sampling* (sampling without replacement with
weights ``w``): the first expert with probability ``w_e / Σ w``, the next among the rest
likewise, ``k`` times — exactly the top-k of ``log w + Gumbel noise``, i.e. a router whose
logits are a per-expert bias plus noise. The weights are fitted so that the inclusion
probabilities ``π_e`` equal the observed ``q_e = count_e / tokens`` (:func:`fit_weights`). Inclusion probabilities are computed exactly (to quadrature
precision, ~1e-13) with the exponential-race form of the draw: expert ``e`` arrives at
``T_e ~ Exp(w_e)`` and the first ``k`` arrivals are chosen, so

- ``π_e = ∫ w_e e^{-w_e t} P(N_{-e}(t) ≤ k-1) dt`` and
- ``π_ab = ∫ f_max(ab)(t) P(N_{-ab}(t) ≤ k-2) dt``,

where ``N_S(t)`` counts the other experts arrived by ``t`` (a Poisson-binomial whose
distribution is the product of ``(1 - p_i + p_i x)``, ``p_i = 1 - e^{-w_i t}``, built
from prefix and suffix products) and ``f_max`` is the density of ``max(T_a, T_b)``.
The integral uses Gauss-Legendre nodes on ``t = τ s / (1 - s)``, ``τ`` the time at
which ``k`` arrivals are expected. Cost: ``O(nodes · E² · k)`` per layer (about 0.4 s
for ``E=256, k=8``). Experts with ``q_e = 0`` never appear; experts chosen by every token
are always in (``π_eb = π_b``) and the rest is solved for ``k`` minus those.
"""

from __future__ import annotations

import numpy as np

__all__ = ["expected_pairs", "fit_weights", "inclusion", "pair_inclusion"]

#: Gauss-Legendre nodes of the time integral
NODES = 48
#: fit tolerance on inclusion probabilities, and its iteration cap
TOL = 1e-10
MAX_ITER = 3000
#: layers solved together (bounds the memory of the pair integral)
LAYER_CHUNK = 16
#: a marginal this close to 1 means "every token" (an always-chosen expert)
CERTAIN = 1 - 1e-9


def _nodes(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Integration times ``t`` and weights ``dt`` (``[L, n]`` each) for weights ``w`` (``[L, E]``)."""
    s, gw = np.polynomial.legendre.leggauss(NODES)
    s, gw = (s + 1) / 2, gw / 2
    lo, hi = np.full(len(w), 1e-12), np.full(len(w), 1e12)
    for _ in range(60):  # τ: expected arrivals reach k (any scale near it works)
        mid = np.sqrt(lo * hi)
        below = (1 - np.exp(-w * mid[:, None])).sum(axis=1) < k
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return hi[:, None] * s / (1 - s), hi[:, None] * gw / (1 - s) ** 2


def _prefix(p: np.ndarray, m: int) -> np.ndarray:
    """``[L, n, E+1, m]``: coefficients 0..m-1 of ``Π_{e<i}(1 - p_e + p_e x)`` for every ``i``."""
    n_l, n, n_e = p.shape
    pre = np.zeros((n_l, n, n_e + 1, m))
    pre[:, :, 0, 0] = 1
    for i in range(n_e):
        q = p[:, :, i, None]
        pre[:, :, i + 1] = pre[:, :, i] * (1 - q)
        pre[:, :, i + 1, 1:] += pre[:, :, i, :-1] * q
    return pre


def _race(w: np.ndarray, k: int, m: int) -> tuple[np.ndarray, ...]:
    """Node weights, arrival probabilities ``p``, densities, prefix and suffix polynomials."""
    t, dt = _nodes(w, k)
    decay = np.exp(-w[:, None, :] * t[:, :, None])  # [L, n, E]
    p, dens = 1 - decay, w[:, None, :] * decay
    pre = _prefix(p, m)
    suf = _prefix(p[:, :, ::-1], m)[:, :, ::-1]  # suf[..., i, :] = Π_{e>=i}
    return dt, p, dens, pre, suf


def inclusion(w: np.ndarray, k: int) -> np.ndarray:
    """``[L, E]`` probability that each expert is among ``k`` drawn without replacement by weight ``w``."""
    w = np.atleast_2d(w)
    dt, _p, dens, pre, suf = _race(w, k, k)
    csuf = np.cumsum(suf, axis=-1)  # P(N_suffix <= j)
    # P(N_{-e} <= k-1) = Σ_i P(N_{<e} = i) P(N_{>e} <= k-1-i)
    cdf = np.einsum("lnei,lnei->lne", pre[:, :, :-1], csuf[:, :, 1:, ::-1])
    return np.einsum("ln,lne->le", dt, dens * cdf)


def pair_inclusion(w: np.ndarray, k: int) -> np.ndarray:
    """``[L, E, E]`` (upper triangle) probability that both ``a < b`` are among the ``k`` drawn."""
    w = np.atleast_2d(w)
    n_l, n_e = w.shape
    out = np.zeros((n_l, n_e, n_e))
    if k < 2:
        return out
    m = k - 1
    dt, p, dens, pre, suf = _race(w, k, m)
    csuf = np.cumsum(suf, axis=-1)[..., ::-1]
    mid = np.zeros((n_l, NODES, n_e, m))  # mid[..., a, :] = Π_{e<b, e≠a} while b advances
    for b in range(1, n_e):
        a = b - 1
        pa = p[:, :, a, None, None]
        old = mid[:, :, :a].copy()
        mid[:, :, :a] = old * (1 - pa)
        mid[:, :, :a, 1:] += old[..., :-1] * pa
        mid[:, :, a] = pre[:, :, a]
        cdf = np.einsum("lnai,lni->lna", mid[:, :, :b], csuf[:, :, b + 1])  # P(N_{-ab} <= k-2)
        fmax = dens[:, :, :b] * p[:, :, b, None] + dens[:, :, b, None] * p[:, :, :b]
        out[:, :b, b] = np.einsum("ln,lna->la", dt, fmax * cdf)
    return out


def _logit(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 1e-300, 1 - 1e-16)
    return np.log(x) - np.log1p(-x)


def fit_weights(q: np.ndarray, k: int) -> np.ndarray:
    """``[L, E]`` sampling weights whose ``k``-draw inclusion probabilities are ``q``.

    ``0 <= q_e < 1`` and ``Σ_e q_e = k`` per row. The update is a damped Newton step on
    the logit of each expert's inclusion probability, whose slope in ``log w_e`` runs from
    1 (rare experts) to about ``k`` (nearly always drawn).
    """
    q = np.atleast_2d(q)
    w = np.where(q > 0, q, 0.0)
    w = w / w.sum(axis=1, keepdims=True)
    target = _logit(q)
    for _ in range(MAX_ITER):
        pi = inclusion(w, k)
        if np.abs(pi - q).max() < TOL:
            break
        step = (target - _logit(pi)) / (1 + (k - 1) * np.maximum(pi, q))
        w = np.where(q > 0, w * np.exp(np.clip(step, -5, 5)), 0.0)
        w = w / w.sum(axis=1, keepdims=True)
    return w


def _special_layer(q: np.ndarray, k: int) -> np.ndarray:
    """``[E, E]`` pair inclusion of a layer with always-chosen experts or too few live ones."""
    n_e = len(q)
    out = np.zeros((n_e, n_e))
    certain = q >= CERTAIN
    live = (q > 0) & ~certain
    k_left = k - int(certain.sum())
    idx = np.nonzero(live)[0]
    if k_left >= 2 and len(idx) > k_left:
        sub = q[idx] * k_left / q[idx].sum()
        out[np.ix_(idx, idx)] = pair_inclusion(fit_weights(sub, k_left), k_left)[0]
    elif k_left >= 2:  # every remaining expert is always drawn
        out[np.ix_(idx, idx)] = 1.0
    full = np.where(certain, 1.0, np.where(live, q, 0.0))
    for c in np.nonzero(certain)[0]:  # an always-chosen expert pairs with b exactly as often as b
        out[c, :] = np.maximum(out[c, :], full)
        out[:, c] = np.maximum(out[:, c], full)
        out[c, c] = 0.0
    return np.triu(out, 1)


def expected_pairs(counts: np.ndarray, top_k: int) -> np.ndarray:
    """``[L, E, E]`` expected number of tokens choosing both ``a < b`` under the null model.

    Args:
        counts: ``[L, E]`` tokens that had each expert in their top-k.
        top_k: experts per token.

    Returns:
        ``tokens_l × π_ab`` with ``tokens_l = Σ_e counts / k`` (tokens with a full top-k)
        and ``q_e = count_e / tokens_l``; upper triangle, zeros elsewhere.
    """
    counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    n_l, n_e = counts.shape
    out = np.zeros((n_l, n_e, n_e))
    if top_k < 2:
        return out
    tokens = counts.sum(axis=1) / top_k
    q = np.minimum(counts / np.maximum(tokens, 1e-300)[:, None], 1.0)
    seen = tokens > 0
    special = seen & (((q >= CERTAIN).any(axis=1)) | ((q > 0).sum(axis=1) <= top_k))
    plain = np.nonzero(seen & ~special)[0]
    for start in range(0, len(plain), LAYER_CHUNK):
        idx = plain[start : start + LAYER_CHUNK]
        out[idx] = pair_inclusion(fit_weights(q[idx], top_k), top_k)
    for i in np.nonzero(special)[0]:
        out[i] = _special_layer(q[i], top_k)
    return out * tokens[:, None, None]
