"""CPU path of the per-token losses: vectorised torch on the flat ``[N]`` view, explicit derivative.

Same contract as ``fastpo.kernels.policy_loss`` (see ``fastpo.ops.loss_spec``): sequences are
segments of ``cu_seqlens``, per-sequence statistics are ``index_add_`` segment sums (no loop over
sequences), and the forward writes ∂loss/∂x up to the global scale so the backward is one multiply.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastpo._layout import accumulation_dtype, segment_ids, segment_sum
from fastpo.ops.loss_spec import INF, STATS, TokenLossSpec
from fastpo.reference.policy import LOG_RATIO_CLAMP as CLAMP

__all__ = ["token_loss_forward", "token_loss_backward"]


def _recip(x: torch.Tensor) -> torch.Tensor:
    """1/x, and 0 where x == 0."""
    return torch.where(x > 0, 1.0 / torch.where(x > 0, x, torch.ones_like(x)), torch.zeros_like(x))


def _clamp_with_grad(x: torch.Tensor, bound: float):
    """(clamp(x, ±bound), d clamp/dx) with torch.clamp's rule: 1 inside the closed interval."""
    return x.clamp(-bound, bound), (x.abs() <= bound).to(x.dtype)


def _policy_terms(x, old, adv, ref, ent, roll, m, seg, n, B, s: TokenLossSpec):
    """Per-token loss, ∂loss/∂x and the per-token metric terms of the policy loss."""
    delta, d_delta = _clamp_with_grad(x - old, CLAMP)
    inv_n = _recip(n)
    if s.seq_ratio:
        ratio = torch.exp(segment_sum(delta * m, seg, B) * inv_n)[seg]
        d_ratio = ratio
    else:
        ratio = torch.exp(delta)
        d_ratio = ratio * d_delta
    unclipped = -adv * ratio
    clipped_loss = -adv * ratio.clamp(1.0 - s.clip_low, 1.0 + s.clip_high)
    clipped = clipped_loss > unclipped
    pg = torch.where(clipped, clipped_loss, unclipped)
    d_pg = torch.where(clipped, 0.0, -adv * d_ratio)
    dual = torch.zeros_like(clipped)
    if s.dual_clip > 0:
        cap = -s.dual_clip * adv
        dual = (adv < 0) & (pg > cap)
        pg, d_pg = torch.where(dual, cap, pg), torch.where(dual, 0.0, d_pg)
    if s.rollout:
        log_w = (old - roll).clamp(-CLAMP, CLAMP)
        if s.rollout_seq:
            log_w = (segment_sum(log_w * m, seg, B) * inv_n)[seg]
        w = torch.exp(log_w)
        w = torch.where(w > s.rollout_cap, 0.0, w) if s.rollout_mask else w.clamp(max=s.rollout_cap)
        pg, d_pg = pg * w, d_pg * w
    loss, d_loss = pg, d_pg
    kl = None
    if s.kl:
        d, d_d = _clamp_with_grad(ref - x, CLAMP)
        if s.kl == 1:
            kl, dk = -d, -torch.ones_like(d)
        elif s.kl == 2:
            kl, dk = 0.5 * d * d, d
        else:
            ed = torch.exp(d)
            kl, dk = ed - d - 1.0, ed - 1.0
        kl, d_kl = _clamp_with_grad(kl, s.kl_clamp)
        loss = loss + s.kl_coef * kl
        d_loss = d_loss - s.kl_coef * dk * d_d * d_kl  # ∂d/∂x = −1
    if s.has_entropy:
        loss = loss - s.entropy_coef * ent
    metrics = {"low": clipped & (adv < 0), "high": clipped & (adv > 0), "dual": dual, "negdelta": -delta,
               "kl": kl, "ratio": ratio, "entropy": ent if s.has_entropy else None}
    return loss, d_loss, metrics


def _value_terms(x, old, ret, s: TokenLossSpec):
    clipped_v = torch.minimum(torch.maximum(x, old - s.value_clip), old + s.value_clip)
    err, clipped_err = x - ret, clipped_v - ret
    clipped = clipped_err * clipped_err > err * err
    loss = 0.5 * torch.where(clipped, clipped_err * clipped_err, err * err)
    return loss, torch.where(clipped, 0.0, err), {"high": clipped}


def token_loss_forward(x, old, adv, ref: Optional[torch.Tensor], ent: Optional[torch.Tensor],
                       roll: Optional[torch.Tensor], mask: Optional[torch.Tensor], cu_seqlens: torch.Tensor,
                       num_tokens: Optional[torch.Tensor], s: TokenLossSpec):
    """(loss, stats, unit, unit_entropy) of the flat inputs ``[N]`` (see ``fastpo.ops.loss_spec``)."""
    dt = accumulation_dtype(x.dtype)
    N, B = x.numel(), cu_seqlens.numel() - 1
    cu = cu_seqlens.to(torch.int64)
    seg = segment_ids(cu, N)
    m = torch.ones(N, dtype=dt) if mask is None else (mask != 0).to(dt)
    counted = m > 0
    n = segment_sum(m, seg, B)
    f = lambda t: None if t is None else t.to(dt)  # noqa: E731
    if s.value:
        loss_t, d_loss, terms = _value_terms(f(x), f(old), f(adv), s)
    else:
        loss_t, d_loss, terms = _policy_terms(f(x), f(old), f(adv), f(ref), f(ent), f(roll), m, seg, n, B, s)
    zero = torch.zeros((), dtype=dt)
    loss_t = torch.where(counted, loss_t, zero)
    unit = torch.where(counted, d_loss, zero)
    unit_ent = torch.where(counted, -s.entropy_coef, zero).to(dt) if s.has_entropy else x.new_empty(0, dtype=dt)
    n_total = m.sum()
    nonempty = (n > 0).sum().to(dt)
    if s.per_seq_mean:
        inv_n = _recip(n)[seg]
        unit = unit * inv_n
        if s.has_entropy:
            unit_ent = unit_ent * inv_n
        loss_t = loss_t * inv_n
    if s.aggregation == 0:  # token_mean
        den = n_total if num_tokens is None else num_tokens.to(dt).reshape(())
        if num_tokens is None and s.num_tokens >= 0:
            den = torch.tensor(s.num_tokens, dtype=dt)
    elif s.aggregation == 3:  # token_sum_norm
        length = s.norm_length if s.norm_length > 0 else ((cu[1:] - cu[:-1]).max() if B > 0 else 0)
        den = torch.as_tensor(B * length, dtype=dt)
    else:
        den = nonempty
    scale = _recip(den)
    loss = loss_t.sum() * scale

    inv_total = _recip(n_total)

    def mean(t):
        """Mean over counted tokens: a count for flags, a dot product for (bounded) values."""
        if t is None:
            return zero
        if t.dtype == torch.bool:
            return (t & counted).sum().to(dt) * inv_total
        return torch.dot(torch.where(counted, t, zero) if t is terms.get("entropy") else t, m) * inv_total

    stats = [loss, scale]
    if s.value:
        stats += [mean(terms["high"])] + [zero] * (len(STATS) - 3)
    else:
        r = terms["ratio"]
        any_counted = n_total > 0
        stats += [mean(terms["low"] | terms["high"]), mean(terms["low"]), mean(terms["high"]), mean(terms["dual"]),
                  mean(terms["negdelta"]), mean(terms["kl"]), mean(r),
                  torch.where(any_counted, torch.where(counted, r, INF).amin(), zero) if N else zero,
                  torch.where(any_counted, torch.where(counted, r, -INF).amax(), zero) if N else zero,
                  mean(terms["entropy"])]
    return loss.clone(), torch.stack([t.reshape(()) for t in stats]).to(dt), unit, unit_ent


def token_loss_backward(grad_loss, stats, unit, unit_ent, out_dtype, ent_dtype):
    """(∂L/∂x, ∂L/∂entropy) = g·scale·(unit, unit_entropy), in the inputs' dtypes."""
    c = grad_loss.to(unit.dtype) * stats[1]
    return (c * unit).to(out_dtype), (c * unit_ent).to(ent_dtype)
