"""Top-k / top-p thresholds of vocabulary-sharded rows: :mod:`fastpo.ops.truncation`'s threshold pass with
the per-row reductions taken over the tensor-parallel group, so every rank finds the threshold t of the
whole row (bit for bit the same on every rank) without gathering the vocabulary.

top-k: each rank's k largest raw logits per row ([tp, n, k] all-gathered once); t_k = the k-th largest of
the union (= of the whole row, ties kept).
top-p: the same snapping bisection on the raw value as ``fastpo.ops.truncation._top_p_threshold``, with
e_l = e^{s_l − M}·1[x_l >= t_k] where M is the global max of s over the top-k survivors, and each step's
reductions over the group: (min, max) of the live entries strictly between lo and hi (one all-gather),
then (Σ e·1[x > mid], min of the live x >= mid, max of the live x <= mid) (a second one). The partial
sums are gathered and added in rank order on every rank (never an all-reduce whose rounding could differ
between ranks), so every rank takes the same branch; min / max are exact. The mass sums differ from the
single process's only by float64 summation order (e itself, in the accumulation dtype, is bitwise the same). Rows are processed in chunks of about 2^22 shard
logits; every rank runs the same chunks and steps (same N and V/tp), as the collectives require.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastpo.ops.truncation import _CHUNK_ELEMENTS, _MAX_STEPS
from fastpo.reference.logprobs import transform_logits

__all__ = ["shard_thresholds"]


def _gather(rows, group, world: int) -> torch.Tensor:
    """``rows`` (K tensors of one shape) from every rank, as float64 ``[tp, K, ...]`` (rank order)."""
    local = torch.stack([r.to(torch.float64) for r in rows])
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    return torch.stack(parts)


def _top_p(x, e, top_p: float, hi, group, world):
    """The smallest entry t of each whole row with Σ_{x > t} e < top_p · Σ e (see the module docstring);
    ``x`` / ``e`` this rank's columns, ``hi`` the whole row's maximum."""
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    lo = torch.full_like(hi, float("-inf"))
    live = e > 0
    target = everything = None
    for _ in range(_MAX_STEPS):
        between = live & (x > lo[:, None]) & (x < hi[:, None])
        a = torch.where(between, x, inf).min(-1).values
        b = torch.where(between, x, -inf).max(-1).values
        first = [] if target is not None else [e.sum(-1, dtype=torch.float64),
                                               (e * (x > -inf)).sum(-1, dtype=torch.float64)]
        g = _gather([a, b, *first], group, world)
        if target is None:
            target = top_p * g[:, 2].sum(0)
            # a −inf raw logit with mass (a softcap maps it to −c) is a candidate too: t = −inf when the mass of
            # the finite entries is already < p·Z
            everything = g[:, 3].sum(0) < target
        a, b = g[:, 0].min(0).values.to(x.dtype), g[:, 1].max(0).values.to(x.dtype)
        active = a < inf  # entries strictly between lo and hi are finite
        if not bool(active.any()):
            return torch.where(everything, torch.full_like(hi, float("-inf")), hi)
        mid = torch.where(active, a / 2 + b / 2, hi)
        above = (e * (x > mid[:, None])).sum(-1, dtype=torch.float64)
        up = torch.where(live & (x >= mid[:, None]), x, inf).min(-1).values
        down = torch.where(live & (x <= mid[:, None]), x, -inf).max(-1).values
        g = _gather([above, up, down], group, world)
        ok = g[:, 0].sum(0) < target
        up, down = g[:, 1].min(0).values.to(x.dtype), g[:, 2].max(0).values.to(x.dtype)
        hi = torch.where(active & ok, torch.minimum(up, hi), hi)
        lo = torch.where(active & ~ok, torch.maximum(down, lo), lo)
    raise RuntimeError("top_p threshold search did not converge (NaN logits?)")


def _rows_thresholds(x, inv_t, top_k, top_p, softcap, scale, vocab, group, world):
    xa = transform_logits(x.detach())  # the raw values, widened
    local_max, col = xa.max(-1)
    thr = torch.full(xa.shape[:1], float("-inf"), dtype=xa.dtype, device=xa.device)
    if 0 < top_k < vocab:
        vals = xa.topk(min(top_k, xa.shape[-1]), dim=-1).values.t()   # [k', n]
        union = _gather([vals], group, world)[:, 0]                  # [tp, k', n]
        thr = union.permute(2, 0, 1).reshape(xa.shape[0], -1).topk(top_k, dim=-1).values[:, -1].to(xa.dtype)
    if top_p < 1.0 and vocab > 1:
        s = transform_logits(xa, softcap or None, scale)  # e in the accumulation dtype, as the single-process pass
        s = s * (inv_t[:, None].to(s.dtype) if isinstance(inv_t, torch.Tensor) else inv_t)
        s = s.masked_fill(xa < thr[:, None], float("-inf"))
        g = _gather([s.max(-1).values, local_max], group, world)
        m = g[:, 0].max(0).values.to(s.dtype)
        hi = g[:, 1].max(0).values.to(xa.dtype)
        e = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m))[:, None])
        thr = torch.maximum(thr, _top_p(xa, e, top_p, hi, group, world))
    return thr, col


def shard_thresholds(x: torch.Tensor, inv_t, top_k: int, top_p: float, softcap: float, scale: float, vocab: int,
                     group, world: int):
    """(thr, col) for this rank's shard ``x [n, V/tp]`` of rows of ``vocab`` logits: ``thr [n]`` the whole
    rows' raw-logit thresholds (accumulation dtype; −inf: nothing dropped), equal on every rank, and ``col [n]``
    the shard's first argmax (a column that is kept whenever any of the shard is). ``inv_t``: 1/τ, a float or
    ``[n]``. Collective: every rank of ``group`` must call it with the same n."""
    n, width = x.shape
    chunk = max(1, _CHUNK_ELEMENTS // max(width, 1))
    thr, col = [], []
    for start in range(0, max(n, 1), chunk):
        part = slice(start, min(start + chunk, n))
        t = inv_t[part] if isinstance(inv_t, torch.Tensor) else inv_t
        a, b = _rows_thresholds(x[part], t, top_k, top_p, softcap, scale, vocab, group, world)
        thr.append(a)
        col.append(b)
    return torch.cat(thr), torch.cat(col)
