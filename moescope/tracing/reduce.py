"""Online reduction: recorded routing of a few batches → fixed-size sums in a :class:`TraceState`.

What: :class:`Reducer` takes what :class:`moescope.execution.routing.RoutingRecorder` recorded for
one batch (per MoE layer: the token's top-k expert ids, gate weights and, when the family
allows, routed-expert output norms) and adds it to the state's sums, then drops it, so
memory does not grow with the corpus.

How: batches are queued and reduced ``group`` at a time with vectorised ``bincount``
calls (all layers at once), so the fixed cost of the ~50 small tensor ops is paid once per
group. Sums are still binned per batch (the batch is part of every bincount code), so
per-batch quantities (the busiest device) and fixed-point rounding are exactly what
reducing each batch alone would give: float sums are accumulated per batch in float64
and added as fixed-point integers (:data:`~moescope.tracedir.state.FIXED_SCALE`), so addition
is associative and merging shards reproduces an unsharded run bit for bit.

Capacity drops are counted per *capacity group*: ``capacity_group`` consecutive real
tokens of the corpus stream (token ``t`` is in group ``t // capacity_group``), whatever
the batch size. Each batch says where it starts in the stream (``token0``; by default
right after the previous batch), its tokens' expert counts are binned per group, and
:meth:`~moescope.tracedir.files.TraceState.add_open` closes a group once all its tokens are in;
a group that straddles batches waits open, in the state, for the rest. A shard sees only
its batches, so it keeps the parts it saw open and ``merge`` adds the parts of every
shard before closing them: the result is the unsharded run's. The last group of the
stream is shorter and is counted at its size when the trace closes
(:meth:`~moescope.tracedir.files.TraceState.close_groups`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moescope.errors import TraceError
from moescope.tracedir.state import EP_DEGREES, FIXED_SCALE, HIST_BINS, TraceState


class Reducer:
    """Reduces recorded routing into a :class:`TraceState` (torch, vectorised).

    Attributes:
        state: the sums being filled.
        group: batches reduced together.
        whole: the batches are the whole stream (not a shard's or a rank's part), so
            :meth:`flush` closes the last capacity group.
        lacks_norms: some batch had no output norms (the family's experts cannot be observed).
    """

    def __init__(self, state: TraceState, group: int = 8, *, whole: bool = True) -> None:
        self.state = state
        self.group = group
        self.whole = whole
        self.lacks_norms = False
        self._pending: list[tuple[Any, ...]] = []
        self._next_token = 0

    def update(
        self, records: Sequence[Any], mask: Any, doc: Any, dom: Any, *, token0: int | None = None
    ) -> None:
        """Queue one batch (``records`` from :class:`~moescope.execution.routing.RoutingRecorder`).

        Args:
            records: one record per MoE layer, in the state's layer order.
            mask: ``[B, S]`` real (non-padding) tokens, row-major in corpus order.
            doc: ``[B, S]`` document index per token (its parity picks the corpus half).
            dom: ``[B, S]`` domain index per token (``-1``: none).
            token0: index in the corpus stream of the batch's first real token (shards
                skip batches); default: right after the previous batch.

        Raises:
            TraceError: the model routed another number of experts per token than ``top_k``.
        """
        import torch

        bsz, seq = mask.shape
        k = self.state.top_k
        ids = torch.stack([r.ids.reshape(bsz, seq, -1) for r in records])  # [L, B, S, k]
        if ids.shape[-1] != k:
            raise TraceError(f"the model routed {ids.shape[-1]} experts per token, expected top_k={k}.")
        wts = torch.stack([r.weights.reshape(bsz, seq, -1) for r in records])
        has_norms = all(r.norms is not None for r in records)
        self.lacks_norms |= not has_norms
        nrm = torch.stack([r.norms.reshape(bsz, seq, -1) for r in records]) if has_norms else None
        # the norms already are the contributions' (llama4), or those are norms x |weight|,
        # worked out for the whole group at once
        weighted = has_norms and all(getattr(r, "norms_are_weighted", False) for r in records)
        if self._pending and self._pending[0][4].shape[1] != seq:
            self._reduce_pending()
        start = self._next_token if token0 is None else int(token0)
        self._next_token = start + int(mask.sum())
        self._pending.append(
            (ids, wts, nrm, weighted, mask.to(ids.device), doc.to(ids.device), dom.to(ids.device), start)
        )
        if len(self._pending) >= self.group:
            self._reduce_pending()

    def flush(self) -> None:
        """End of the stream: reduce every queued batch and, when ``whole``, close the capacity groups."""
        self._reduce_pending()
        if self.whole:
            self.state.close_groups()

    def _reduce_pending(self) -> None:
        """Reduce every queued batch."""
        if self._pending:
            pending, self._pending = self._pending, []
            group = _Group.gather(self.state, pending)
            if group is not None:
                _reduce(self.state, group, pending)


def _real(t: Any, vidx: Any) -> Any:
    """The real tokens of a tensor whose last dimension (1-D) or second (3-D) is the
    flattened ``B*S`` positions; ``vidx`` None: all of them."""
    if vidx is None:
        return t
    return t[vidx] if t.dim() == 1 else t[:, vidx]


def _over_slots(t: Any, op: Any, reduce: Any) -> Any:
    """``t`` reduced over its last (top-k slot) dimension: by ``reduce`` (torch's own, e.g.
    ``lambda t: t.sum(-1)``) from 8 slots on, else by folding ``op`` (``torch.add``) over the
    slots. Torch reduces a short innermost dimension slowly (k=2: ~10x slower than folding)."""
    if t.shape[-1] >= 8:
        return reduce(t)
    slots = t.unbind(-1)
    out = slots[0]
    for s in slots[1:]:
        out = op(out, s)
    return out


def _fx(t: Any) -> np.ndarray:
    """Fixed point per batch (first axis), then summed: exact and order-independent."""
    import torch

    return torch.round(t.double() * FIXED_SCALE).to(torch.int64).sum(dim=0).cpu().numpy()


@dataclass
class _Group:
    """The queued batches of one reduction, flattened to the ``N`` real tokens.

    ``ids4``/``mask``/``doc``/``dom`` keep the padded ``[.., B, S, ..]`` layout (for
    adjacency); ``ids_v``/``w_v`` are ``[L, N, k]``; ``bt`` is each token's batch in the
    group; ``flat`` the bincount code of every (batch, layer, expert) assignment;
    ``counts_g`` the ``[G, L, E]`` counts per batch and ``counts_h`` the ``[2, L, E]``
    counts per corpus half; ``token_at`` each token's index in the corpus stream.
    """

    n_l: int
    n_e: int
    k: int
    n_g: int
    ids4: Any
    mask: Any
    doc: Any
    dom: Any
    vidx: Any
    bt: Any
    tok_per_batch: np.ndarray
    ids_v: Any
    w_v: Any
    routed: Any
    flat: Any
    n_bins: int
    counts_g: np.ndarray
    counts_h: np.ndarray
    token_at: Any

    @classmethod
    def gather(cls, st: TraceState, pending: list[tuple[Any, ...]]) -> _Group | None:
        """Concatenate the queued batches; ``None`` when they hold no real token."""
        import torch

        n_l, n_e, k = len(st.layers), st.num_experts, st.top_k
        n_g = len(pending)
        ids4 = torch.cat([p[0] for p in pending], dim=1).long()  # [L, B, S, k] over the group
        wts4 = torch.cat([p[1] for p in pending], dim=1).double()
        mask = torch.cat([p[4] for p in pending])
        dev = ids4.device
        n_b, seq = mask.shape
        batch_of_row = torch.cat([torch.full((p[4].shape[0],), g, device=dev) for g, p in enumerate(pending)])
        # the real tokens' positions; None when every position is real (the usual batch:
        # only a stream's last one is padded), which saves a copy of every [L, N, k] tensor
        vidx = None if bool(mask.all()) else mask.reshape(-1).nonzero().squeeze(1)
        if vidx is not None and vidx.numel() == 0:
            return None
        bt = _real(batch_of_row[:, None].expand(n_b, seq).reshape(-1), vidx)  # [N] batch of each token
        ids_v = _real(ids4.reshape(n_l, n_b * seq, k), vidx)  # [L, N, k]
        w_v = _real(wts4.reshape(n_l, n_b * seq, k), vidx)
        routed = ids_v >= 0
        w_v = torch.where(routed, w_v, torch.zeros_like(w_v))
        sentinel = n_l * n_e
        off = (torch.arange(n_l, device=dev) * n_e)[:, None, None] + (bt * sentinel)[None, :, None]
        n_bins = n_g * sentinel
        flat = torch.where(routed, ids_v + off, torch.full_like(ids_v, n_bins)).reshape(-1)
        group = cls(
            n_l, n_e, k, n_g, ids4, mask, torch.cat([p[5] for p in pending]), torch.cat([p[6] for p in pending]),
            vidx, bt, torch.bincount(bt, minlength=n_g).cpu().numpy(), ids_v, w_v, routed, flat, n_bins,
            np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), None,
        )  # fmt: skip
        # counts per (corpus half, batch, layer, expert): the half is the document's parity
        half = (_real(group.doc.reshape(-1), vidx) & 1)[None, :, None]
        code = torch.where(routed, flat.reshape(n_l, -1, k) + half * n_bins, 2 * n_bins).reshape(-1)
        binned = torch.bincount(code, minlength=2 * n_bins + 1)[:-1].reshape(2, n_g, n_l, n_e)
        counts = binned.cpu().numpy().astype(np.int64)
        group.counts_g, group.counts_h = counts.sum(axis=0), counts.sum(axis=1)
        tpb = torch.as_tensor(group.tok_per_batch, device=dev)
        first = torch.cumsum(tpb, 0) - tpb  # each batch's first token in the group
        token0 = torch.as_tensor([p[7] for p in pending], device=dev)
        group.token_at = token0[bt] + torch.arange(len(bt), device=dev) - first[bt]
        return group

    def per_batch(self, weights: Any | None) -> Any:
        """``[G, L, E]`` sums of ``weights`` (``None``: counts), one row per batch."""
        import torch

        sums = torch.bincount(self.flat, weights=weights, minlength=self.n_bins + 1)[: self.n_bins]
        return sums.reshape(self.n_g, self.n_l, self.n_e)

    def valid(self, tensors: list[Any]) -> Any:
        """``[L, N, k]`` float64 of a per-batch ``[L, B, S, k]`` record, real tokens only."""
        import torch

        cat = torch.cat(tensors, dim=1).double()
        return _real(cat.reshape(self.n_l, -1, self.k), self.vidx)


def _reduce(st: TraceState, g: _Group, pending: list[tuple[Any, ...]]) -> None:
    st.counts += g.counts_g.sum(axis=0)
    st.half_counts += g.counts_h
    st.weight_fx += _fx(g.per_batch(g.w_v.reshape(-1)))
    if all(p[2] is not None for p in pending):
        norms = g.valid([p[2] for p in pending])
        st.out_norm_fx += _fx(g.per_batch(norms.reshape(-1)))
        weighted = norms if all(p[3] for p in pending) else norms * g.w_v.abs()
        st.wout_norm_fx += _fx(g.per_batch(weighted.reshape(-1)))
    st.router_dropped += (~g.routed).sum(dim=(1, 2)).cpu().numpy()
    _add_coactivation(st, g)
    _add_confidence(st, g)
    _add_reuse(st, g)
    _add_capacity(st, g)
    _add_expert_parallel(st, g)
    _add_domains(st, g)
    st.tokens += len(g.bt)
    st.windows += int(g.mask.any(dim=1).sum())
    st.batches += g.n_g


def _add_coactivation(st: TraceState, g: _Group) -> None:
    """Every unordered pair within a token's top-k."""
    import torch

    if g.k < 2:
        return
    n_l, n_e = g.n_l, g.n_e
    dev = g.ids_v.device
    ia, ib = torch.triu_indices(g.k, g.k, 1, device=dev)
    a, b = g.ids_v[:, :, ia], g.ids_v[:, :, ib]
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    ok = (lo >= 0) & (lo != hi)
    loff = (torch.arange(n_l, device=dev) * n_e * n_e)[:, None, None]
    code = torch.where(ok, loff + lo * n_e + hi, torch.full_like(lo, n_l * n_e * n_e))
    pairs = torch.bincount(code.reshape(-1), minlength=n_l * n_e * n_e + 1)[:-1]
    st.coact += pairs.reshape(n_l, n_e, n_e).cpu().numpy()


def _add_confidence(st: TraceState, g: _Group) -> None:
    """Top-1 weight and its share of the token's total weight (histogram)."""
    import torch

    dev = g.ids_v.device
    n_l = g.n_l
    top1 = _over_slots(g.w_v, torch.maximum, lambda t: t.amax(dim=-1))  # [L, N]
    total = _over_slots(g.w_v, torch.add, lambda t: t.sum(dim=-1))
    share = torch.where(total > 0, top1 / total.clamp(min=1e-30), torch.ones_like(total))
    bins = (share * HIST_BINS).long().clamp(0, HIST_BINS - 1)
    boff = (torch.arange(n_l, device=dev) * HIST_BINS)[:, None]
    hist = torch.bincount((bins + boff).reshape(-1), minlength=n_l * HIST_BINS)
    st.top1_hist += hist.reshape(n_l, HIST_BINS).cpu().numpy()
    t1code = (g.bt[None, :] * n_l + torch.arange(n_l, device=dev)[:, None]).reshape(-1)
    top1_g = torch.bincount(t1code, weights=top1.reshape(-1), minlength=g.n_g * n_l).reshape(g.n_g, n_l)
    st.top1_fx += _fx(top1_g)


def _add_reuse(st: TraceState, g: _Group) -> None:
    """Experts shared by adjacent tokens of one window and one document."""
    mask, doc, ids4 = g.mask, g.doc, g.ids4
    if mask.shape[1] < 2:
        return
    import torch

    adj = mask[:, 1:] & mask[:, :-1] & (doc[:, 1:] == doc[:, :-1])  # [B, S-1]
    # slot-major copies, so every comparison runs over long contiguous rows (a [.., k, k]
    # broadcast has a size-k innermost dimension: several times slower)
    cur = ids4[:, :, 1:].permute(3, 0, 1, 2).contiguous()  # [k, L, B, S-1]
    prev = ids4[:, :, :-1].permute(3, 0, 1, 2).contiguous()
    counted = (cur >= 0) & adj
    shared = torch.zeros(ids4.shape[0], dtype=torch.int64, device=ids4.device)
    for i in range(cur.shape[0]):  # token t's i-th expert among token t-1's experts
        shared += torch.count_nonzero((prev == cur[i]) & counted[i], dim=(0, 2, 3))
    st.reuse += shared.cpu().numpy()
    st.reuse_pairs += int(adj.sum())


def _add_capacity(st: TraceState, g: _Group) -> None:
    """Expert counts per capacity group (token index // ``capacity_group``), added as open parts."""
    import torch

    cg = g.token_at // st.capacity_group
    g0 = int(cg.min())
    local = cg - g0
    n_c = int(local.max()) + 1
    size = g.n_l * g.n_e
    lidx = (torch.arange(g.n_l, device=local.device) * g.n_e)[:, None, None]
    code = torch.where(g.routed, (local * size)[None, :, None] + lidx + g.ids_v, n_c * size).reshape(-1)
    counts = torch.bincount(code, minlength=n_c * size + 1)[:-1].reshape(n_c, g.n_l, g.n_e).cpu().numpy()
    tokens = torch.bincount(local, minlength=n_c).cpu().numpy()
    seen = np.nonzero(tokens)[0]
    st.add_open(seen + g0, tokens[seen], counts[seen].astype(np.int64))


def _add_expert_parallel(st: TraceState, g: _Group) -> None:
    """Contiguous placement: distinct devices per token, and each batch's busiest device."""
    import torch

    degrees = [(j, deg) for j, deg in enumerate(EP_DEGREES) if g.n_e % deg == 0]
    if not degrees:
        return
    # each token's experts in ascending order (unrouted -1 first): under a contiguous placement
    # the device (expert // experts per device) is ascending too, so a routed slot is on a
    # device not seen yet exactly when the slot before it is on another one (or unrouted:
    # -1 // per is -1). One sort serves every degree.
    if g.k == 2:  # a sort of two is a min and a max (several times cheaper than torch.sort)
        a, b = g.ids_v[..., 0], g.ids_v[..., 1]
        srt = torch.stack((torch.minimum(a, b), torch.maximum(a, b)), dim=-1)
    else:
        srt = g.ids_v.sort(dim=-1).values  # [L, N, k]
    per = torch.tensor([float(g.n_e // deg) for _, deg in degrees], device=srt.device)[:, None, None, None]
    # float division is exact here (ids and widths far below 2^24) and vectorised; int64's is not
    dev = torch.floor(srt.float()[None] / per)  # [P, L, N, k]
    new = (dev[..., 1:] != dev[..., :-1]) & (srt[None, ..., 1:] >= 0)
    distinct = new.sum(dim=(2, 3)) + (srt[..., 0] >= 0).sum(dim=1)[None]  # [P, L]
    distinct_np = distinct.cpu().numpy()
    for row, (j, deg) in enumerate(degrees):
        st.ep_distinct[:, j] += distinct_np[row]
        st.ep_batch_max[:, j] += (
            g.counts_g.reshape(g.n_g, g.n_l, deg, g.n_e // deg).sum(axis=3).max(axis=2).sum(axis=0)
        )


def _add_domains(st: TraceState, g: _Group) -> None:
    """Per-domain counts and weight sums."""
    import torch

    dom_v = _real(g.dom.reshape(-1), g.vidx)  # [N]
    if not bool((dom_v >= 0).any()):
        return
    dev = g.ids_v.device
    sentinel = g.n_l * g.n_e
    n_d = int(dom_v.max()) + 1
    dbins = g.n_g * n_d * sentinel
    base = (g.bt * n_d + dom_v) * sentinel  # batch-major, then domain
    lidx = (torch.arange(g.n_l, device=dev) * g.n_e)[:, None, None]
    dcode = torch.where(
        g.routed & (dom_v >= 0)[None, :, None],
        base[None, :, None] + lidx + g.ids_v,
        torch.full_like(g.ids_v, dbins),
    ).reshape(-1)
    shape = (g.n_g, n_d, g.n_l, g.n_e)
    dc = torch.bincount(dcode, minlength=dbins + 1)[:-1].reshape(shape)
    dw = torch.bincount(dcode, weights=g.w_v.reshape(-1), minlength=dbins + 1)[:-1].reshape(shape)
    st.dom_counts[:n_d] += dc.sum(dim=0).cpu().numpy()
    st.dom_weight_fx[:n_d] += _fx(dw)
