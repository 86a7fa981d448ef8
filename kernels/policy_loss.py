"""Per-token RL losses (every ``PolicyLossConfig.surrogate``: PPO clip, CISPO, SAPO, REINFORCE/GPG, DPPO,
DRO, GMPO, VESPO; clipped value loss) in one forward and one backward kernel.

Inputs are flat ``[N]`` tensors; sequence i is tokens ``cu_seqlens[i]:cu_seqlens[i+1]`` (a padded
``[B, T]`` batch is ``cu_seqlens = [0, T, 2T, ...]``). Every mode is a ``tl.constexpr`` chosen from
the config, so each configuration compiles to straight-line code with no dead loads.

Forward (``token_loss_forward``):
  1. ``_token_loss_fwd_kernel``, one program per sequence. Pass 1 (only when needed) over the
     sequence's tokens: counted tokens n_i, Σ Δ (GSPO's log s_i = ΣΔ/n_i), Σ log w (sequence-level
     rollout IS weight). Pass 2: per-token loss l and ∂l/∂x, written as ``unit`` (times 1/n_i for
     seq_mean_token_mean), and per-sequence partial sums of the loss and the metrics into a small
     ``[B, K]`` buffer.
  2. ``_token_loss_finalize_kernel``, the epilogue: one program folds the ``[B, K]`` partials into the
     loss, the global scale (1/Σmask or 1/num_tokens, 1/#non-empty sequences, 1/(B·L)) and the metrics.
Backward (``token_loss_backward``): ``_token_loss_bwd_kernel``, grad_x = g·scale·unit (and the
entropy gradient likewise), over blocks of tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpo.kernels.policy_surrogates import _geo_log_ratio, _sur_clip, _sur_cispo, _sur_dppo, _sur_sapo, _vespo_phi
from fastpo.ops.loss_spec import STATS

CLAMP = tl.constexpr(20.0)  # log-ratios are clamped to ±20 before exp (as fastpo.reference.policy)
_BLOCK = 1024  # tokens per loop step of a sequence program
_BLOCK_SEQS = 256  # sequences per step of the epilogue
_BWD_BLOCK = 1024
K = 12  # partial columns, below
_N, _LOSS, _LOW, _HIGH, _DUAL, _NEGDELTA, _KL, _RATIO, _RMIN, _RMAX, _ENT, _LEN = range(K)


@triton.jit
def _counted(mask_ptr, offs, end, HAS_MASK: tl.constexpr):
    """1.0 for counted tokens of the block, 0.0 for masked ones and those past the sequence."""
    inb = offs < end
    m = tl.where(inb, 1.0, 0.0)
    if HAS_MASK:
        mv = tl.load(mask_ptr + offs, mask=inb, other=0)
        m = tl.where(mv != 0, m, 0.0)
    return m


# Forward. Per counted token (m = 1), Δ = clamp(x − old, ±20):
#   policy: r = exp(Δ) (token) or s_i = exp(ΣΔ/n_i) (GSPO); pg = the surrogate (above);
#           rollout IS: pg·w (geo_mean: its sequence weight); + kl_coef·k(clamp(ref − x, ±20)); − β_H·H
#   value:  0.5·max((x − R)², (clip(x, old ± clip) − R)²)
# and ∂l/∂x (stored as ``unit``, see the backward):
#   ∂r/∂x  = r·1[|x − old| ≤ 20] (token) or s_i (GSPO token-gradient form: r_t = exp(x − sg(x) + sg(log s_i)))
#   ∂k/∂x  = −k'(δ)·1[|ref − x| ≤ 20]·1[|k| ≤ kl_clamp], k1' = −1, k2' = δ, k3' = e^δ − 1, abs' = sgn δ;
#            kX+ (KL_ST): k2' = δ, with no kl_clamp gate; KL_BIAS: the term is k·r, ∂ = r·∂k/∂x + k·∂r/∂x
#   value: ∂l/∂x = 0 where the clipped branch is active, else x − R.
@triton.jit
def _token_loss_fwd_kernel(
    x_ptr, old_ptr, a_ptr, ref_ptr, ent_ptr, roll_ptr, mask_ptr, cu_ptr,
    unit_ptr, unit_ent_ptr, part_ptr,
    clip_low, clip_high, dual_clip, kl_coef, kl_clamp, ent_coef, is_cap, value_clip,
    delta_cap, tau_pos, tau_neg, ratio_cap, dro_beta, vk_pos, vl_pos, vk_neg, vl_neg,
    VALUE: tl.constexpr, SEQ_RATIO: tl.constexpr, KL: tl.constexpr, DUAL: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, ROLLOUT: tl.constexpr, ROLLOUT_SEQ: tl.constexpr, ROLLOUT_MASK: tl.constexpr,
    ROLLOUT_GIVEN: tl.constexpr, SURR: tl.constexpr, KL_ST: tl.constexpr, KL_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr, PER_SEQ_MEAN: tl.constexpr, BLOCK: tl.constexpr, NUM_PART: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    end = tl.load(cu_ptr + seq + 1).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    GEO: tl.constexpr = SURR == 7
    VESPO: tl.constexpr = SURR == 8
    lo = 1.0 - clip_low
    hi = 1.0 + clip_high

    # pass 1: per-sequence statistics the per-token terms depend on
    n = 0.0
    sum_delta = 0.0
    sum_logw = 0.0
    sum_geo = 0.0
    sum_adv = 0.0
    if SEQ_RATIO or ROLLOUT_SEQ or PER_SEQ_MEAN or GEO or VESPO:
        for off in range(start, end, BLOCK):
            offs = off + lanes
            inb = offs < end
            m = _counted(mask_ptr, offs, end, HAS_MASK)
            on = m > 0.0
            n += tl.sum(m, axis=0)
            if SEQ_RATIO or GEO or VESPO:
                x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
                o = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
                d = tl.minimum(tl.maximum(x - o, -CLAMP), CLAMP)
                # selects, not m * (...): a masked token may hold NaN, and NaN * 0 is NaN
                sum_delta += tl.sum(tl.where(on, d, 0.0), axis=0)
                if GEO:
                    a = tl.load(a_ptr + offs, mask=inb, other=0.0).to(tl.float32)
                    d_tilde, _g, _out = _geo_log_ratio(a, d, clip_low, clip_high)
                    sum_geo += tl.sum(tl.where(on, d_tilde, 0.0), axis=0)
                    sum_adv += tl.sum(tl.where(on, a, 0.0), axis=0)
            if ROLLOUT_SEQ:
                o = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
                ro = tl.load(roll_ptr + offs, mask=inb, other=0.0).to(tl.float32)
                lw = o - ro
                lw = tl.where(lw == lw, lw, 0.0)  # a NaN rollout log-prob gives Δ = 0 (TRL)
                sum_logw += tl.sum(tl.where(on, tl.minimum(tl.maximum(lw, -CLAMP), CLAMP), 0.0), axis=0)
            if GEO and ROLLOUT_GIVEN:
                wg = tl.load(roll_ptr + offs, mask=inb, other=1.0).to(tl.float32)
                sum_logw += tl.sum(tl.where(on, tl.log(wg + 1e-10), 0.0), axis=0)
    inv_n = 1.0 / tl.maximum(n, 1.0)
    log_s = sum_delta * inv_n
    seq_logw = sum_logw * inv_n
    unit_scale = 1.0
    if PER_SEQ_MEAN:
        unit_scale = inv_n
    # the sequence's rollout weight (sequence modes; geo_mean's geometric mean of given weights)
    seq_w = tl.exp(seq_logw)
    if ROLLOUT_SEQ:
        if ROLLOUT_MASK:
            seq_w = tl.where(seq_w > is_cap, 0.0, seq_w)
        else:
            seq_w = tl.minimum(seq_w, is_cap)
    geo_loss = -(sum_adv * inv_n) * tl.exp(sum_geo * inv_n)
    if ROLLOUT:
        geo_loss = geo_loss * seq_w
    vespo_log_w = tl.minimum(tl.maximum(sum_delta, -18.420680743952367), 20.0)  # [log 1e-8, 20] as TRL

    # pass 2: per-token loss, ∂l/∂x and partial sums
    cnt = 0.0
    s_loss = 0.0
    c_low = 0.0
    c_high = 0.0
    c_dual = 0.0
    s_negdelta = 0.0
    s_kl = 0.0
    s_ratio = 0.0
    s_ent = 0.0
    r_min = float("inf")
    r_max = float("-inf")
    for off in range(start, end, BLOCK):
        offs = off + lanes
        inb = offs < end
        m = _counted(mask_ptr, offs, end, HAS_MASK)
        on = m > 0.0
        cnt += tl.sum(m, axis=0)
        x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        o = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        if VALUE:
            vc = tl.minimum(tl.maximum(x, o - value_clip), o + value_clip)
            err = x - a
            err_c = vc - a
            clipped = err_c * err_c > err * err
            loss = 0.5 * tl.where(clipped, err_c * err_c, err * err)
            dloss = tl.where(clipped, 0.0, err)
            c_high += tl.sum(tl.where(clipped, m, 0.0), axis=0)
        else:
            draw = x - o
            delta = tl.minimum(tl.maximum(draw, -CLAMP), CLAMP)
            if SEQ_RATIO:
                r = tl.exp(tl.zeros([BLOCK], dtype=tl.float32) + log_s)
                dr = r
            else:
                r = tl.exp(delta)
                dr = tl.where(tl.abs(draw) <= CLAMP, r, 0.0)
            none = r != r
            if SURR == 0:
                loss, dloss, f_low, f_high, f_dual = _sur_clip(a, r, dr, lo, hi, delta_cap, dual_clip, DUAL)
            elif SURR == 1:
                loss, dloss, f_low, f_high, f_dual = _sur_cispo(x, a, r, lo, hi)
            elif SURR == 2:
                loss, dloss, f_low, f_high, f_dual = _sur_sapo(a, r, dr, tau_pos, tau_neg)
            elif SURR == 3:
                loss, dloss, f_low, f_high, f_dual = -a * x, -a, none, none, none
            elif SURR == 4 or SURR == 5:
                loss, dloss, f_low, f_high, f_dual = _sur_dppo(x, o, a, r, clip_low, clip_high, ratio_cap, SURR == 5)
            elif SURR == 6:
                loss, dloss, f_low, f_high, f_dual = (-(a * x - 0.5 * dro_beta * draw * draw), -a + dro_beta * draw,
                                                      none, none, none)
            elif SURR == 7:
                _dt, g, outside = _geo_log_ratio(a, delta, clip_low, clip_high)
                g = tl.where(tl.abs(draw) <= CLAMP, g, 0.0)
                loss = tl.zeros([BLOCK], dtype=tl.float32) + geo_loss
                dloss = loss * g
                f_low, f_high, f_dual = outside & (a < 0.0), outside & (a > 0.0), none
            elif SURR == 9:
                loss, dloss, f_low, f_high, f_dual = -a * r, -a * dr, none, none, none
            elif SURR == 8:
                phi = _vespo_phi(a, vespo_log_w, vk_pos, vl_pos, vk_neg, vl_neg)
                loss, dloss, f_low, f_high, f_dual = -phi * a * x, -phi * a, none, none, none
            c_dual += tl.sum(tl.where(f_dual, m, 0.0), axis=0)
            if ROLLOUT and not GEO:
                if ROLLOUT_SEQ:
                    w = tl.zeros([BLOCK], dtype=tl.float32) + seq_w
                elif ROLLOUT_GIVEN:
                    w = tl.load(roll_ptr + offs, mask=inb, other=0.0).to(tl.float32)
                else:
                    ro = tl.load(roll_ptr + offs, mask=inb, other=0.0).to(tl.float32)
                    lw = o - ro
                    lw = tl.where(lw == lw, lw, 0.0)  # a NaN rollout log-prob gives Δ = 0 (TRL)
                    w = tl.exp(tl.minimum(tl.maximum(lw, -CLAMP), CLAMP))
                    if ROLLOUT_MASK:
                        w = tl.where(w > is_cap, 0.0, w)
                    else:
                        w = tl.minimum(w, is_cap)
                loss = loss * w
                dloss = dloss * w
            if KL != 0:
                ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
                draw_k = ref - x
                d = tl.minimum(tl.maximum(draw_k, -CLAMP), CLAMP)
                if KL == 1:
                    k = -d
                    dk = tl.full([BLOCK], -1.0, tl.float32)
                elif KL == 2:
                    k = 0.5 * d * d
                    dk = d
                elif KL == 3:
                    ed = tl.exp(d)
                    k = ed - d - 1.0
                    dk = ed - 1.0
                else:
                    k = tl.abs(d)
                    dk = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
                if KL_ST:
                    keep = tl.abs(draw_k) <= CLAMP
                    dk = d
                else:
                    keep = (tl.abs(draw_k) <= CLAMP) & (tl.abs(k) <= kl_clamp)
                k = tl.minimum(tl.maximum(k, -kl_clamp), kl_clamp)
                dkx = tl.where(keep, -dk, 0.0)  # ∂k/∂x
                if KL_BIAS:
                    dkx = dkx * r + k * dr
                    k = k * r
                loss += kl_coef * k
                dloss += kl_coef * dkx
                s_kl += tl.sum(tl.where(on, k, 0.0), axis=0)
            if HAS_ENTROPY:
                h = tl.load(ent_ptr + offs, mask=inb, other=0.0).to(tl.float32)
                loss -= ent_coef * h
                s_ent += tl.sum(tl.where(on, h, 0.0), axis=0)
                tl.store(unit_ent_ptr + offs, tl.where(on, -ent_coef * unit_scale, 0.0).to(unit_ent_ptr.dtype.element_ty),
                         mask=inb)
            c_low += tl.sum(tl.where(f_low, m, 0.0), axis=0)
            c_high += tl.sum(tl.where(f_high, m, 0.0), axis=0)
            s_negdelta -= tl.sum(tl.where(on, delta, 0.0), axis=0)
            s_ratio += tl.sum(tl.where(on, r, 0.0), axis=0)
            r_min = tl.minimum(r_min, tl.min(tl.where(on, r, float("inf")), axis=0))
            r_max = tl.maximum(r_max, tl.max(tl.where(on, r, float("-inf")), axis=0))
        s_loss += tl.sum(tl.where(on, loss, 0.0), axis=0)
        tl.store(unit_ptr + offs, tl.where(on, dloss * unit_scale, 0.0).to(unit_ptr.dtype.element_ty), mask=inb)

    row = part_ptr + seq * NUM_PART
    tl.store(row + 0, cnt)
    tl.store(row + 1, s_loss * unit_scale)
    tl.store(row + 2, c_low)
    tl.store(row + 3, c_high)
    tl.store(row + 4, c_dual)
    tl.store(row + 5, s_negdelta)
    tl.store(row + 6, s_kl)
    tl.store(row + 7, s_ratio)
    tl.store(row + 8, r_min)
    tl.store(row + 9, r_max)
    tl.store(row + 10, s_ent)
    tl.store(row + 11, (end - start).to(tl.float32))


# Epilogue: loss = scale·Σ_i part[i, loss] with scale = 1/den of the aggregation
#   token_mean: den = num_tokens or Σ n_i; seq_mean_*: den = #{i: n_i > 0} (B with COUNT_EMPTY);
#   token_sum_norm: den = B·L; token_sum: den = 1
# (L = norm_length, or the longest sequence when 0); metrics = Σ_i part[i, ·] / Σ_i n_i. A zero den
# (nothing counted) gives scale 0 and loss 0.
@triton.jit
def _token_loss_finalize_kernel(
    part_ptr, stats_ptr, loss_ptr, num_tokens_ptr, num_seqs, num_tokens, norm_length,
    AGG: tl.constexpr, NUM_TOKENS_TENSOR: tl.constexpr, COUNT_EMPTY: tl.constexpr, BLOCK_SEQS: tl.constexpr,
    NUM_PART: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK_SEQS).to(tl.int64)
    acc_n = tl.zeros([BLOCK_SEQS], dtype=tl.float32)
    acc_nonempty = tl.zeros([BLOCK_SEQS], dtype=tl.float32)
    acc_loss = tl.zeros([BLOCK_SEQS], dtype=tl.float32)
    acc_low = tl.zeros([BLOCK_SEQS], dtype=tl.float32)
    acc_high = tl.zeros([BLOCK_SEQS], dtype=tl.float32)
    acc_dual = tl.zeros([BLOCK_SEQS], dtype=tl.float32)
    acc_negdelta = tl.zeros([BLOCK_SEQS], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK_SEQS], dtype=tl.float32)
    acc_ratio = tl.zeros([BLOCK_SEQS], dtype=tl.float32)
    acc_ent = tl.zeros([BLOCK_SEQS], dtype=tl.float32)
    acc_min = tl.full([BLOCK_SEQS], float("inf"), tl.float32)
    acc_max = tl.full([BLOCK_SEQS], float("-inf"), tl.float32)
    acc_len = tl.zeros([BLOCK_SEQS], dtype=tl.float32)
    for first in range(0, num_seqs, BLOCK_SEQS):
        ok = first + lanes < num_seqs
        row = part_ptr + tl.cast(first, tl.int64) * NUM_PART + lanes * NUM_PART
        n = tl.load(row + 0, mask=ok, other=0.0)
        acc_n += n
        acc_nonempty += tl.where(n > 0.0, 1.0, 0.0)
        acc_loss += tl.load(row + 1, mask=ok, other=0.0)
        acc_low += tl.load(row + 2, mask=ok, other=0.0)
        acc_high += tl.load(row + 3, mask=ok, other=0.0)
        acc_dual += tl.load(row + 4, mask=ok, other=0.0)
        acc_negdelta += tl.load(row + 5, mask=ok, other=0.0)
        acc_kl += tl.load(row + 6, mask=ok, other=0.0)
        acc_ratio += tl.load(row + 7, mask=ok, other=0.0)
        acc_min = tl.minimum(acc_min, tl.load(row + 8, mask=ok, other=float("inf")))
        acc_max = tl.maximum(acc_max, tl.load(row + 9, mask=ok, other=float("-inf")))
        acc_ent += tl.load(row + 10, mask=ok, other=0.0)
        acc_len = tl.maximum(acc_len, tl.load(row + 11, mask=ok, other=0.0))
    total = tl.sum(acc_n, axis=0)
    if AGG == 0:
        if NUM_TOKENS_TENSOR:
            den = tl.load(num_tokens_ptr).to(tl.float32)
        elif num_tokens >= 0.0:
            den = num_tokens + 0.0 * total
        else:
            den = total
    elif AGG == 3:
        length = tl.where(norm_length > 0, norm_length + 0.0, tl.max(acc_len, axis=0))
        den = num_seqs * length
    elif AGG == 4:
        den = 1.0 + 0.0 * total
    elif COUNT_EMPTY:
        den = num_seqs + 0.0 * total
    else:
        den = tl.sum(acc_nonempty, axis=0)
    scale = tl.where(den > 0.0, 1.0 / tl.where(den > 0.0, den, 1.0), 0.0)
    inv_total = tl.where(total > 0.0, 1.0 / tl.maximum(total, 1.0), 0.0)
    loss = tl.sum(acc_loss, axis=0) * scale
    low = tl.sum(acc_low, axis=0) * inv_total
    high = tl.sum(acc_high, axis=0) * inv_total
    ty = stats_ptr.dtype.element_ty
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
    tl.store(stats_ptr + 0, loss.to(ty))
    tl.store(stats_ptr + 1, scale.to(ty))
    tl.store(stats_ptr + 2, (low + high).to(ty))
    tl.store(stats_ptr + 3, low.to(ty))
    tl.store(stats_ptr + 4, high.to(ty))
    tl.store(stats_ptr + 5, (tl.sum(acc_dual, axis=0) * inv_total).to(ty))
    tl.store(stats_ptr + 6, (tl.sum(acc_negdelta, axis=0) * inv_total).to(ty))
    tl.store(stats_ptr + 7, (tl.sum(acc_kl, axis=0) * inv_total).to(ty))
    tl.store(stats_ptr + 8, (tl.sum(acc_ratio, axis=0) * inv_total).to(ty))
    tl.store(stats_ptr + 9, tl.where(total > 0.0, tl.min(acc_min, axis=0), 0.0).to(ty))
    tl.store(stats_ptr + 10, tl.where(total > 0.0, tl.max(acc_max, axis=0), 0.0).to(ty))
    tl.store(stats_ptr + 11, (tl.sum(acc_ent, axis=0) * inv_total).to(ty))


# Backward. The forward stored unit_t = ∂l_t/∂x_t·m_t·(1/n_i for seq_mean_token_mean), so with the
# upstream g = ∂L/∂loss and scale from the epilogue: ∂L/∂x_t = g·scale·unit_t; the entropy gradient
# is g·scale·unit_ent_t with unit_ent_t = −entropy_coef·m_t·(1/n_i).
@triton.jit
def _token_loss_bwd_kernel(
    grad_loss_ptr, stats_ptr, unit_ptr, grad_ptr, unit_ent_ptr, grad_ent_ptr, n_tokens,
    HAS_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_tokens
    c = tl.load(grad_loss_ptr).to(tl.float32) * tl.load(stats_ptr + 1).to(tl.float32)
    u = tl.load(unit_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    tl.store(grad_ptr + offs, (c * u).to(grad_ptr.dtype.element_ty), mask=inb)
    if HAS_ENTROPY:
        ue = tl.load(unit_ent_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        tl.store(grad_ent_ptr + offs, (c * ue).to(grad_ent_ptr.dtype.element_ty), mask=inb)


def _flat_mask(mask):
    if mask is None:
        return None
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def token_loss_forward(x, old, adv, ref, ent, roll, mask, cu_seqlens, num_tokens, s):
    """(loss, stats, unit, unit_entropy) of flat ``[N]`` inputs; ``s`` a ``TokenLossSpec``."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    n_tok, n_seq = x.numel(), cu_seqlens.numel() - 1
    dev = x.device
    unit = torch.empty(n_tok, dtype=dt, device=dev)
    unit_ent = torch.empty(n_tok if s.has_entropy else 0, dtype=dt, device=dev)
    part = torch.empty((max(n_seq, 1), K), dtype=torch.float32, device=dev)
    stats = torch.empty(len(STATS), dtype=dt, device=dev)
    loss = torch.empty((), dtype=dt, device=dev)
    mask = _flat_mask(mask)
    if n_seq > 0:
        _token_loss_fwd_kernel[(n_seq,)](
            x, old, adv, ref if ref is not None else x, ent if ent is not None else x,
            roll if roll is not None else x, mask if mask is not None else x, cu_seqlens,
            unit, unit_ent if s.has_entropy else unit, part,
            s.clip_low, s.clip_high, s.dual_clip, s.kl_coef, s.kl_clamp, s.entropy_coef, s.rollout_cap,
            s.value_clip, s.delta, s.tau_pos, s.tau_neg, s.ratio_cap, s.dro_beta, s.vespo_k_pos, s.vespo_l_pos,
            s.vespo_k_neg, s.vespo_l_neg,
            VALUE=s.value, SEQ_RATIO=s.seq_ratio, KL=s.kl, DUAL=s.dual_clip > 0, HAS_ENTROPY=s.has_entropy,
            ROLLOUT=s.rollout > 0, ROLLOUT_SEQ=s.rollout > 0 and s.rollout_seq,
            ROLLOUT_MASK=s.rollout > 0 and s.rollout_mask, ROLLOUT_GIVEN=s.rollout > 0 and s.rollout_given,
            SURR=s.surrogate, KL_ST=s.kl_st, KL_BIAS=s.kl_bias, HAS_MASK=mask is not None,
            PER_SEQ_MEAN=s.per_seq_mean, BLOCK=_BLOCK, NUM_PART=K, num_warps=4,
        )
    _token_loss_finalize_kernel[(1,)](
        part, stats, loss, num_tokens if num_tokens is not None else stats, n_seq, s.num_tokens,
        s.norm_length, AGG=s.aggregation, NUM_TOKENS_TENSOR=num_tokens is not None, COUNT_EMPTY=s.count_empty,
        BLOCK_SEQS=_BLOCK_SEQS,
        NUM_PART=K, num_warps=4,
    )
    return loss, stats, unit, unit_ent


def token_loss_backward(grad_loss, stats, unit, unit_ent, out_dtype, ent_dtype):
    """(∂L/∂x, ∂L/∂entropy) = g·scale·(unit, unit_entropy), in the inputs' dtypes."""
    n_tok = unit.numel()
    grad = torch.empty(n_tok, dtype=out_dtype, device=unit.device)
    has_ent = unit_ent.numel() > 0
    grad_ent = torch.empty(unit_ent.numel(), dtype=ent_dtype, device=unit.device)
    if n_tok > 0:
        _token_loss_bwd_kernel[(triton.cdiv(n_tok, _BWD_BLOCK),)](
            grad_loss, stats, unit, grad, unit_ent if has_ent else unit, grad_ent if has_ent else grad, n_tok,
            HAS_ENTROPY=has_ent, BLOCK=_BWD_BLOCK, num_warps=4,
        )
    return grad, grad_ent
