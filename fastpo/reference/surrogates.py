"""The per-token objectives of ``policy_loss`` (``PolicyLossConfig.surrogate``), eager and differentiable.

Each surrogate is one function ``(ctx, cfg) -> Terms``: the per-token policy term ``pg`` (before the
rollout weight, unless ``weighted``) and the per-token flags behind the clip metrics. ``ctx.ratio`` is
the token ratio exp(Δ) or the GSPO sequence ratio in its token-gradient form; only ``ctx.x`` (logp)
and ``ctx.ratio`` carry gradient. The kernels (``csrc/policy_loss.h``, ``kernels/policy_loss.py``)
implement the same functions, with the derivatives written out.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple, Optional

import torch

from fastpo._layout import segment_sum

__all__ = ["Ctx", "Terms", "SURROGATE_FNS", "seq_mean", "safe_div", "VESPO_LOG_W_MIN", "GEO_WEIGHT_EPS",
           "DPPO_KL_EPS"]

VESPO_LOG_W_MIN = math.log(1e-8)  # TRL's lower clamp of VESPO's log sequence weight
GEO_WEIGHT_EPS = 1e-10  # verl's geo_mean: exp(mean log(w + 1e-10)) of given token weights
DPPO_KL_EPS = 1e-8  # verl's dppo_kl: log((1 − p_old + 1e-8) / (1 − p + 1e-8))


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den == 0 (then num is 0 as well: nothing was counted)."""
    return num / torch.where(den > 0, den, torch.ones_like(den))


def seq_mean(x, m, seg, num_seqs):
    """Masked mean of ``x`` within each sequence, [B] (0 for sequences with no counted token)."""
    return safe_div(segment_sum(torch.where(m > 0, x, torch.zeros_like(x)), seg, num_seqs),
                    segment_sum(m, seg, num_seqs))


class Ctx(NamedTuple):
    x: torch.Tensor              # logp [N], differentiable
    old: torch.Tensor            # old_logp [N]
    adv: torch.Tensor            # A [N]
    delta: torch.Tensor          # clamp(x − old, ±20), differentiable
    ratio: torch.Tensor          # r [N], differentiable
    m: torch.Tensor              # counted tokens (1.0 / 0.0)
    seg: torch.Tensor            # sequence id per token
    num_seqs: int
    w: Optional[torch.Tensor]    # the (detached) rollout weight per token, or None
    w_given: bool                # w is the caller's is_weights (not a fastpo rollout_is mode)


class Terms(NamedTuple):
    pg: torch.Tensor
    low: torch.Tensor            # bool [N]: the lower bound binds (clip_frac_low)
    high: torch.Tensor           # bool [N]: the upper bound binds (clip_frac_high)
    dual: torch.Tensor           # bool [N]: the secondary cap binds (dual_clip_frac)
    weighted: bool = False       # pg already carries the rollout weight


def _none(c: Ctx) -> torch.Tensor:
    return torch.zeros_like(c.m, dtype=torch.bool)


def clip(c: Ctx, cfg) -> Terms:
    """PPO: max(−A·r', −A·clip(r, 1 − ε_low, 1 + ε_high)), r' = min(r, delta) (TRL's two-sided clip);
    dual clip c: for A < 0, min(·, −c·A)."""
    A, r = c.adv, c.ratio
    r1 = r if cfg.delta is None else torch.clamp(r, max=cfg.delta)
    unclipped, clipped_loss = -A * r1, -A * torch.clamp(r, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    clipped = clipped_loss > unclipped
    pg = torch.where(clipped, clipped_loss, unclipped)
    dual = _none(c)
    if cfg.dual_clip is not None:
        cap = -cfg.dual_clip * A
        dual = (A < 0) & (pg > cap)
        pg = torch.where(dual, cap, pg)
    # the bounds' flags from r' (as TRL's clip_ratio metrics; without delta the same as "the clipped
    # branch is the max")
    r1 = r1.detach()
    return Terms(pg, (r1 < 1.0 - cfg.clip_low) & (A < 0), (r1 > 1.0 + cfg.clip_high) & (A > 0), dual)


def cispo(c: Ctx, cfg) -> Terms:
    """CISPO: −sg(clip(r, lo, 1 + ε_high))·A·logp, lo = 1 − ε_low ("cispo") or 0 ("cispo_upper", TRL).
    Flags: r < lo, r > hi (verl's clipfrac); the upper-only form's high flag also needs A > 0 (TRL's
    cispo_clip_ratio)."""
    lo = 0.0 if cfg.surrogate == "cispo_upper" else 1.0 - cfg.clip_low
    hi = 1.0 + cfg.clip_high
    r = c.ratio.detach()
    high = (r > hi) & (c.adv > 0) if lo == 0.0 else r > hi  # upper-only: TRL's cispo_clip_ratio (A > 0)
    return Terms(-torch.clamp(r, lo, hi) * c.adv * c.x, r < lo, high, _none(c))


def sapo(c: Ctx, cfg) -> Terms:
    """SAPO: −σ(τ(r − 1))·(4/τ)·A, τ = tau_pos for A > 0, tau_neg otherwise."""
    tau = torch.where(c.adv > 0, torch.full_like(c.adv, cfg.sapo_tau_pos), torch.full_like(c.adv, cfg.sapo_tau_neg))
    return Terms(-torch.sigmoid(tau * (c.ratio - 1.0)) * (4.0 / tau) * c.adv, _none(c), _none(c), _none(c))


def reinforce(c: Ctx, cfg) -> Terms:
    """REINFORCE / GPG: −A·logp."""
    return Terms(-c.adv * c.x, _none(c), _none(c), _none(c))


def _dppo(c: Ctx, cfg, valid: torch.Tensor) -> Terms:
    """DPPO: −A·sg(min(r, cap))·logp on the tokens inside the trust region (``valid``)."""
    A, r = c.adv, c.ratio.detach()
    pg = torch.where(valid, -A * torch.clamp(r, max=cfg.dppo_ratio_cap) * c.x, torch.zeros_like(c.x))
    return Terms(pg, ~valid & (A <= 0), ~valid & (A > 0), valid & (r > cfg.dppo_ratio_cap))


def dppo_tv(c: Ctx, cfg) -> Terms:
    """valid: p − p_old <= ε_high for A > 0, p − p_old >= −ε_low otherwise (p = e^logp)."""
    diff = torch.exp(c.x.detach()) - torch.exp(c.old)
    return _dppo(c, cfg, torch.where(c.adv > 0, diff <= cfg.clip_high, diff >= -cfg.clip_low))


def dppo_kl(c: Ctx, cfg) -> Terms:
    """valid: D = p_old·(log p_old − log p) + (1 − p_old)·log((1 − p_old + ε)/(1 − p + ε)) <= ε_high or p <= p_old
    for A > 0; D <= ε_low or p >= p_old otherwise."""
    x = c.x.detach()
    p, p_old = torch.exp(x), torch.exp(c.old)
    kl = p_old * (c.old - x) + (1.0 - p_old) * torch.log((1.0 - p_old + DPPO_KL_EPS) / (1.0 - p + DPPO_KL_EPS))
    pos = (kl <= cfg.clip_high) | (p <= p_old)
    neg = (kl <= cfg.clip_low) | (p >= p_old)
    return _dppo(c, cfg, torch.where(c.adv > 0, pos, neg))


def dro(c: Ctx, cfg) -> Terms:
    """DRO: −(A·logp − ½β·(logp − old)²), the log-ratio unclamped (no exp: it stays finite)."""
    lr = c.x - c.old
    return Terms(-(c.x * c.adv - 0.5 * cfg.dro_beta * lr * lr), _none(c), _none(c), _none(c))


def geo_mean(c: Ctx, cfg) -> Terms:
    """GMPO: every token of sequence i carries L_i = −Ā_i·exp(mean_t Δ̃_t)·w_i, with
    Δ̃ = sgn(A)·min(sgn(A)·Δ, sgn(A)·clamp(Δ, −ε_low, ε_high)), Ā_i the sequence's mean advantage and w_i
    the sequence rollout weight (the geometric mean of given token weights, as verl)."""
    A, d = c.adv, c.delta
    dc = torch.clamp(d, -cfg.clip_low, cfg.clip_high)
    sgn = torch.sign(A)
    dt = sgn * torch.minimum(sgn * d, sgn * dc)
    pg = (-seq_mean(A, c.m, c.seg, c.num_seqs) * torch.exp(seq_mean(dt, c.m, c.seg, c.num_seqs)))[c.seg]
    if c.w is not None:
        w = torch.exp(seq_mean(torch.log(c.w + GEO_WEIGHT_EPS), c.m, c.seg, c.num_seqs))[c.seg] if c.w_given else c.w
        pg = pg * w
    outside = d.detach() != dc.detach()
    return Terms(pg, outside & (A < 0), outside & (A > 0), _none(c), weighted=True)


def vespo(c: Ctx, cfg) -> Terms:
    """VESPO: −sg(φ)·A·logp, φ = exp(λ + k·log w − λ·w), log w = clamp(Σ_t Δ_t, log 1e-8, 20) of the sequence,
    (k, λ) = (k_pos, λ_pos) for A >= 0, (k_neg, λ_neg) otherwise; a non-finite φ counts as 0 (TRL)."""
    A = c.adv
    total = segment_sum(torch.where(c.m > 0, c.delta.detach(), torch.zeros_like(A)), c.seg, c.num_seqs)
    log_w = torch.clamp(total, VESPO_LOG_W_MIN, 20.0)[c.seg]
    pos = A >= 0
    k = torch.where(pos, torch.full_like(A, cfg.vespo_k_pos), torch.full_like(A, cfg.vespo_k_neg))
    lam = torch.where(pos, torch.full_like(A, cfg.vespo_lambda_pos), torch.full_like(A, cfg.vespo_lambda_neg))
    phi = torch.nan_to_num(torch.exp(lam + k * log_w - lam * torch.exp(log_w)), nan=0.0, posinf=0.0, neginf=0.0)
    return Terms(-phi * A * c.x, _none(c), _none(c), _none(c))


def ratio(c: Ctx, cfg) -> Terms:
    """The unclipped importance-sampled policy gradient: −A·r (verl's kl_cov before its KL term)."""
    return Terms(-c.adv * c.ratio, _none(c), _none(c), _none(c))


SURROGATE_FNS: Dict[str, Callable[[Ctx, object], Terms]] = {
    "clip": clip, "cispo": cispo, "cispo_upper": cispo, "sapo": sapo, "reinforce": reinforce,
    "dppo_tv": dppo_tv, "dppo_kl": dppo_kl, "dro": dro, "geo_mean": geo_mean, "vespo": vespo, "ratio": ratio,
}
