"""The per-token objectives of the policy-loss kernel (``PolicyLossConfig.surrogate``) as ``@triton.jit``
helpers, each with its derivative; ``kernels/policy_loss.py`` picks one by the compile-time code SURR
(``fastpo.ops.loss_spec.SURROGATE_CODES``). The spec is ``fastpo/reference/surrogates.py``; the C++ twins
are in ``csrc/policy_surrogates.h``.
"""

import triton
import triton.language as tl

__all__ = ["_sur_clip", "_sur_cispo", "_sur_sapo", "_sur_dppo", "_geo_log_ratio", "_vespo_phi"]


# Surrogates. Each takes the token block's advantage a, ratio r and ∂r/∂x (dr) (and what else it reads)
# and returns (l, ∂l/∂x, low, high, dual): the policy term, its derivative and the 0/1 flags behind
# clip_frac_low / clip_frac_high / dual_clip_frac. Derivations, per token:
#   clip:      r' = min(r, δ); l = max(−A·r', −A·clip(r, lo, hi)); ∂l/∂x = 0 where the clipped branch is the
#              max or r > δ, else −A·dr; dual cap c (A < 0): min(l, −c·A), ∂ = 0 where the cap binds
#   cispo:     l = −sg(clip(r, lo, hi))·A·x, ∂l/∂x = −clip(r, lo, hi)·A; high flag r > hi (lo = 0: and A > 0)
#   sapo:      s = σ(τ(r − 1)), l = −s·(4/τ)·A, ∂l/∂x = −4·A·s·(1 − s)·dr
#   reinforce: l = −A·x, ∂l/∂x = −A
#   dppo:      l = −A·sg(min(r, C))·x·valid, ∂l/∂x = −A·min(r, C)·valid
#   dro:       l = −(A·x − ½β(x − old)²), ∂l/∂x = −A + β(x − old)
#   geo_mean:  every token carries its sequence's L_i = −Ā_i·exp(mean Δ̃)·w_i; ∂L_i/∂x_t = L_i·g_t/n_i with
#              g_t = ∂Δ̃_t/∂Δ_t·1[|x − old| <= 20] (1 on the unclipped side of sgn(A)·min(·), 0 on the bound or
#              for A = 0); the kernel writes ∂l/∂x = L_i·g_t and the 1/n_i is seq_mean_token_mean's weight
#              (any other aggregation sums n_i copies of L_i, whose derivative is again L_i·g_t)
#   vespo:     l = −sg(φ_i)·A·x, ∂l/∂x = −φ_i·A (φ from the sequence's Σ Δ, pass 1)
#   ratio:     l = −A·r, ∂l/∂x = −A·dr
@triton.jit
def _sur_clip(a, r, dr, lo, hi, delta_cap, dual_clip, DUAL: tl.constexpr):
    r1 = tl.minimum(r, delta_cap)
    l_unc = -a * r1
    l_clip = -a * tl.minimum(tl.maximum(r, lo), hi)
    clipped = l_clip > l_unc
    loss = tl.where(clipped, l_clip, l_unc)
    # the max's branch carries the gradient: clip(r, lo, hi) inside [lo, hi] (with delta < hi the clipped
    # branch can win there), r' = min(r, delta) up to delta
    inside = (r >= lo) & (r <= hi)
    dloss = tl.where(clipped, tl.where(inside, -a * dr, 0.0), tl.where(r > delta_cap, 0.0, -a * dr))
    dual = r != r
    if DUAL:
        cap = -dual_clip * a
        dual = (a < 0.0) & (loss > cap)
        loss = tl.where(dual, cap, loss)
        dloss = tl.where(dual, 0.0, dloss)
    return loss, dloss, (r1 < lo) & (a < 0.0), (r1 > hi) & (a > 0.0), dual  # flags from r' (TRL)


@triton.jit
def _sur_cispo(x, a, r, lo, hi):
    w = tl.minimum(tl.maximum(r, lo), hi)
    # the upper-only form (lo = 0, TRL) counts r > hi with A > 0 only: TRL's cispo_clip_ratio
    two_sided = (tl.zeros_like(r) + lo) > 0.0
    return -w * a * x, -w * a, r < lo, (r > hi) & ((a > 0.0) | two_sided), r != r


@triton.jit
def _sur_sapo(a, r, dr, tau_pos, tau_neg):
    tau = tl.where(a > 0.0, tau_pos, tau_neg)
    s = tl.sigmoid(tau * (r - 1.0))
    none = r != r
    return -s * (4.0 / tau) * a, -4.0 * a * s * (1.0 - s) * dr, none, none, none


@triton.jit
def _sur_dppo(x, o, a, r, lo, hi, ratio_cap, KL_REGION: tl.constexpr):
    p = tl.exp(x)
    p_old = tl.exp(o)
    if KL_REGION:
        kl = p_old * (o - x) + (1.0 - p_old) * tl.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
        valid = tl.where(a > 0.0, (kl <= hi) | (p <= p_old), (kl <= lo) | (p >= p_old))
    else:
        diff = p - p_old
        valid = tl.where(a > 0.0, diff <= hi, diff >= -lo)
    t = tl.minimum(r, ratio_cap)
    return (tl.where(valid, -a * t * x, 0.0), tl.where(valid, -a * t, 0.0), (~valid) & (a <= 0.0),
            (~valid) & (a > 0.0), valid & (r > ratio_cap))


@triton.jit
def _geo_log_ratio(a, delta, lo, hi):
    """(Δ̃, ∂Δ̃/∂Δ, outside the bounds) of GMPO's sign-aware clip."""
    bound = tl.minimum(tl.maximum(delta, -lo), hi)
    pos = a > 0.0
    neg = a < 0.0
    d_tilde = tl.where(pos, tl.minimum(delta, bound), tl.where(neg, tl.maximum(delta, bound), 0.0))
    binds = (pos & (delta > hi)) | (neg & (delta < -lo))
    grad = tl.where((pos | neg) & ~binds, 1.0, 0.0)
    return d_tilde, grad, delta != bound


@triton.jit
def _vespo_phi(a, log_w, k_pos, l_pos, k_neg, l_neg):
    pos = a >= 0.0
    k = tl.where(pos, k_pos, k_neg)
    lam = tl.where(pos, l_pos, l_neg)
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
    return tl.where(tl.abs(phi) < float("inf"), phi, 0.0)  # NaN / inf count as 0 (TRL's nan_to_num)
