"""Distillation divergence between a student's and a teacher's logit rows, streamed over the vocabulary.

Launcher (same contract as the CPU path ``fastpo.ops.cpu_distill.distill_rows``):
    distill_rows(student [C, V], teacher [C, V], row_weight [C] or None, beta, tau,
                 s_softcap, s_scale, t_softcap, t_scale) -> (divergence [C], entropy [C])
float32 (float64 buffers for float64 logits, computed in float32). With ``row_weight``, w_i·∂D_i/∂x_s is
written into ``student`` in place (exact zeros on rows with w_i = 0). Softcaps of 0 mean none. Rows
are at any row stride; the vocabulary dimension is contiguous.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["distill_rows"]

_MAX_BLOCK_V = 4096
_NEG_INF = float("-inf")


def _block_size(n_cols: int) -> int:
    return min(triton.next_power_of_2(max(n_cols, 1)), _MAX_BLOCK_V)


@triton.jit
def _scaled(x, scale, softcap, inv_tau, SOFTCAP: tl.constexpr):
    # s = z/τ with z = c·tanh(k·x/c) (k·x without a softcap); tanh(u) = 2σ(2u) − 1.
    y = x * scale
    if SOFTCAP:
        y = softcap * (2.0 * tl.sigmoid(2.0 * y / softcap) - 1.0)
    return y * inv_tau


@triton.jit
def _load_row(row_ptr, cols, n_cols, scale, softcap, inv_tau, SOFTCAP: tl.constexpr):
    x = tl.load(row_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    return tl.where(cols < n_cols, _scaled(x, scale, softcap, inv_tau, SOFTCAP), float("-inf"))


@triton.jit
def _online(m, d, s):
    # One block of an online logsumexp: running max m and d = Σ e^{s_j − m}; a reference that stays
    # finite while every entry so far is −inf (then d = 0).
    m_new = tl.maximum(m, tl.max(s, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = d * tl.exp(m - m_ref) + tl.sum(tl.exp(s - m_ref), axis=0)
    return m_ref, d


@triton.jit
def _log_mixture(log_p, log_q, log_1mb, log_b):
    # log m_j = log((1 − β)·p_j + β·q_j), −inf (not NaN) where p_j = q_j = 0.
    a = log_p + log_1mb
    b = log_q + log_b
    top = tl.maximum(a, b)
    top = tl.where(top == float("-inf"), 0.0, top)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit
def _plogr(w, log_a, log_b):
    # w·(log a − log b), 0 where w = 0 (0·log 0 = 0: a vocabulary masked to −inf gives no NaN)
    return w * tl.where(w > 0.0, log_a - log_b, 0.0)


# With s = x_s-transformed/τ, t likewise, p = softmax(s), q = softmax(t) and m = (1 − β)p + βq:
#   β = 0:  D = Σ q (log q − log p).  ∂D/∂s_j = −q_j + p_j·Σ_k q_k = p_j − q_j.
#   β = 1:  D = Σ p (log p − log q).  ∂D/∂p_k = log p_k − log q_k + 1, and through the softmax
#           (∂p_k/∂s_j = p_k(δ_kj − p_j)):  ∂D/∂s_j = p_j·(log p_j − log q_j − D).
#   JSD:    D = β Σ q (log q − log m) + (1 − β) Σ p (log p − log m). With ∂m_k/∂p_k = 1 − β:
#           ∂D/∂p_k = −β q_k (1−β)/m_k + (1−β)(log p_k + 1 − log m_k) − (1−β)² p_k/m_k
#                   = (1−β)(log p_k − log m_k + 1 − (βq_k + (1−β)p_k)/m_k) = (1−β)(log p_k − log m_k),
#           so ∂D/∂s_j = (1−β)·p_j·(log p_j − log m_j − A) with A = KL(p‖m) = Σ p (log p − log m).
# Then ∂D/∂x_j = ∂D/∂s_j · k/τ · (1 − tanh²(k·x_j/c)) (k/τ without a softcap), times the row weight.
# One program per row: pass 1 the two logsumexps, pass 2 D, A and the student entropy
# H = −Σ p log p, pass 3 (WRITE_GRAD) the gradient in place of the student row.
@triton.jit
def _distill_kernel(
    s_ptr, t_ptr, w_ptr, div_ptr, ent_ptr, n_cols, s_stride, t_stride, beta, log_1mb, log_b, inv_tau,
    s_scale, s_softcap, t_scale, t_softcap,
    MODE: tl.constexpr, WRITE_GRAD: tl.constexpr, S_SOFTCAP: tl.constexpr, T_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    offs = tl.arange(0, BLOCK_V)

    m_s = float("-inf")
    d_s = 0.0
    m_t = float("-inf")
    d_t = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        m_s, d_s = _online(m_s, d_s, _load_row(s_row, cols, n_cols, s_scale, s_softcap, inv_tau, S_SOFTCAP))
        m_t, d_t = _online(m_t, d_t, _load_row(t_row, cols, n_cols, t_scale, t_softcap, inv_tau, T_SOFTCAP))
    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)

    div = 0.0
    kl_pm = 0.0
    ent = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        log_p = _load_row(s_row, cols, n_cols, s_scale, s_softcap, inv_tau, S_SOFTCAP) - lse_s
        log_q = _load_row(t_row, cols, n_cols, t_scale, t_softcap, inv_tau, T_SOFTCAP) - lse_t
        p = tl.exp(log_p)
        ent -= tl.sum(_plogr(p, log_p, 0.0), axis=0)
        if MODE == 0:
            div += tl.sum(_plogr(tl.exp(log_q), log_q, log_p), axis=0)
        elif MODE == 1:
            div += tl.sum(_plogr(p, log_p, log_q), axis=0)
        else:
            log_m = _log_mixture(log_p, log_q, log_1mb, log_b)
            kl_pm += tl.sum(_plogr(p, log_p, log_m), axis=0)
            div += tl.sum(beta * _plogr(tl.exp(log_q), log_q, log_m), axis=0)
    if MODE == 2:
        div += (1.0 - beta) * kl_pm
    tl.store(div_ptr + row, div.to(div_ptr.dtype.element_ty))
    tl.store(ent_ptr + row, ent.to(ent_ptr.dtype.element_ty))

    if WRITE_GRAD:
        w = tl.load(w_ptr + row).to(tl.float32)
        factor = w * s_scale * inv_tau
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            x = tl.load(s_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            log_p = tl.where(cols < n_cols, _scaled(x, s_scale, s_softcap, inv_tau, S_SOFTCAP), float("-inf")) - lse_s
            log_q = _load_row(t_row, cols, n_cols, t_scale, t_softcap, inv_tau, T_SOFTCAP) - lse_t
            p = tl.exp(log_p)
            if MODE == 0:
                g = p - tl.exp(log_q)
            elif MODE == 1:
                g = p * tl.where(p > 0.0, log_p - log_q - div, 0.0)
            else:
                log_m = _log_mixture(log_p, log_q, log_1mb, log_b)
                g = (1.0 - beta) * p * tl.where(p > 0.0, log_p - log_m - kl_pm, 0.0)
            g = g * factor
            if S_SOFTCAP:
                th = 2.0 * tl.sigmoid(2.0 * x * s_scale / s_softcap) - 1.0
                g = g * (1.0 - th * th)
            g = tl.where(w != 0.0, g, 0.0)
            tl.store(s_row + cols, g.to(s_ptr.dtype.element_ty), mask=cols < n_cols)


def distill_rows(student: torch.Tensor, teacher: torch.Tensor, row_weight: Optional[torch.Tensor], beta: float,
                 tau: float, s_softcap: float, s_scale: float, t_softcap: float, t_scale: float):
    """Launch the row kernel (see the module docstring)."""
    n_rows, n_cols = student.shape
    out_dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    div = torch.empty(n_rows, dtype=out_dtype, device=student.device)
    ent = torch.empty_like(div)
    if n_rows == 0:
        return div, ent
    mode = 0 if beta == 0.0 else 1 if beta == 1.0 else 2
    log_1mb = math.log1p(-beta) if mode == 2 else 0.0
    log_b = math.log(beta) if mode == 2 else 0.0
    weight = row_weight.contiguous() if row_weight is not None else div
    block = _block_size(n_cols)
    _distill_kernel[(n_rows,)](
        student, teacher, weight, div, ent, n_cols, student.stride(0), teacher.stride(0), float(beta), log_1mb,
        log_b, 1.0 / tau, s_scale, s_softcap or 1.0, t_scale, t_softcap or 1.0,
        MODE=mode, WRITE_GRAD=row_weight is not None, S_SOFTCAP=s_softcap > 0.0, T_SOFTCAP=t_softcap > 0.0,
        BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
    )
    return div, ent
