"""Per-token log-probs and entropies over a vocabulary, streamed in blocks.

Each row i holds logits z_i [V], a label y_i and a temperature τ; with s = z/τ:
    lse = logsumexp(s),  logp = s_y − lse,  H = lse − Σ_j p_j·s_j,  p = softmax(s).
Rows whose label equals ``ignore_index`` give 0 everywhere and zero gradient.

The forward saves, per row, the raw maximum m = max_j z_j and log_norm = log Σ_j e^{(z_j − m)/τ}
(so lse = m/τ + log_norm). The backward forms log p_j = (z_j − m)/τ − log_norm from them: the
subtraction z_j − m is exact near the maximum, where p matters, whereas s_j − lse subtracts two
large, independently rounded numbers (its error grows with |lse|: 1.5e-5 at |z| ≈ 100).

Launchers (same contract as the CPU path in ``fastpo.ops.cpu_logprobs``):
    logprob_forward(logits [N, V], labels [N] int64, temperature, ignore_index, with_entropy, extras=0)
        -> (logp, entropy, row_max, log_norm, log_sum_sq_probs, is_top1, mean_logits), each [N]
           fp32 (fp64 for fp64 logits; is_top1 as 0/1); ``extras`` is a bitmask of
           ``fastpo.ops.row_kernels.EXTRA_*`` naming the last three to compute (the others are 0)
    logprob_backward(logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy,
                     temperature, ignore_index, out [N, V])  writes dL/dlogits into ``out`` (may be ``logits``)
``logits`` is ``[N, V]`` rows at any row stride, or ``[B, T, V]`` blocks of such rows at any block
stride (N = B·T; e.g. the shifted ``logits[:, :-1]`` of a model output, read in place); its last
dimension is contiguous. ``out`` has the shape of ``logits`` and its own strides. ``labels`` and the
per-row vectors are contiguous ``[N]``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastpo.ops.row_kernels import EXTRA_MEAN, EXTRA_SUM_SQ, EXTRA_TOP1, extra_outputs

# Block sizes: a forward program streams its row in BLOCK_V chunks; the backward grid is
# (rows, vocabulary blocks), one program per block. Large blocks also keep the interpreter fast.
_MAX_BLOCK_V = 4096


def _block_size(n_cols: int) -> int:
    return min(triton.next_power_of_2(n_cols), _MAX_BLOCK_V)


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


# Logit transforms applied to each loaded logit x before everything else (TRL's order):
#   z = k·x, then z ← c·tanh(z/c) with the softcap c (Gemma) when SOFTCAP;  s = z/τ.
# In the backward, ∂z/∂x = k·(1 − tanh²(k·x/c)) (k without a softcap). tanh(u) = 2σ(2u) − 1.
@triton.jit
def _transform(x, logit_scale, softcap, SOFTCAP: tl.constexpr):
    z = x * logit_scale
    if SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)
    return z


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, entropy_ptr, row_max_ptr, log_norm_ptr, sum_sq_ptr, top1_ptr, mean_ptr,
    n_cols, rows_per_block, stride_block, stride_row, inv_temperature, ignore_index, logit_scale, softcap,
    inv_t_rows_ptr, thr_ptr, PER_ROW_TEMP: tl.constexpr, HAS_THRESHOLD: tl.constexpr, WITH_ENTROPY: tl.constexpr, WITH_SUM_SQ: tl.constexpr, WITH_TOP1: tl.constexpr, WITH_MEAN: tl.constexpr,
    SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # One program per row; one pass over the vocabulary with an online logsumexp relative to the
    # running raw maximum m, with u_j = (z_j − m)/τ <= 0:
    #   d = Σ e^{u_j},  a = Σ e^{u_j}·u_j,  so that  log_norm = log d,  H = log d − a/d.
    # When m grows to m', with δ = (m − m')/τ <= 0 and c = e^δ:  d' = c·d,  a' = c·(a + δ·d).
    # Every term stays O(1) relative to the maximum: no lse − E[s] cancellation at large |z|
    # (the entropy at logits of ±1e30 is exact, not ~1e23 of rounding noise).
    # The optional statistics (not differentiated) add one accumulator each:
    #   q = Σ e^{2u_j} (q' = c²·q), log Σ p_j² = log q − 2·log d;   zs = Σ z_j, mean = zs/(τ·V);
    #   mb = max_{j < y} z_j, is_top1 = (z_y >= m) & (z_y > mb): the label is the first argmax, as
    #   torch.argmax (and TRL) break ties, judged on the transformed logits z (as TRL does).
    row = tl.program_id(0).to(tl.int64)
    if PER_ROW_TEMP:  # a per-token temperature: this row's 1/τ replaces the scalar
        inv_temperature = tl.load(inv_t_rows_ptr + row).to(tl.float32)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    row_ptr = logits_ptr + (row // rows_per_block) * stride_block + (row % rows_per_block) * stride_row
    # Ignored rows skip the stream entirely (zero trip count).
    n_stream = tl.where(valid, n_cols, 0)
    # A truncated row (top-k / top-p): raw logits below its threshold count as −inf.
    thr = float("-inf")
    if HAS_THRESHOLD:
        thr = tl.load(thr_ptr + row).to(tl.float32)

    m = float("-inf")
    d = 0.0
    a = 0.0
    q = 0.0
    zs = 0.0
    mb = float("-inf")
    for start in range(0, n_stream, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        keep = cols < n_cols
        if HAS_THRESHOLD:
            keep = keep & (z >= thr)
        z = tl.where(keep, _transform(z, logit_scale, softcap, SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # A reference that is finite even while every entry so far is −inf (then d = a = 0).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        delta = (m - m_ref) * inv_temperature
        scale = tl.exp(delta)
        u = (z - m_ref) * inv_temperature
        e = tl.exp(u)
        if WITH_ENTROPY:
            # c·δ -> 0 as c -> 0 (δ = −inf while m = −inf), and e·u -> 0 as u -> −inf: the
            # infinite factors are replaced before they multiply a zero.
            c_delta = tl.where(scale > 0.0, scale * tl.where(scale > 0.0, delta, 0.0), 0.0)
            a = a * scale + c_delta * d + tl.sum(e * tl.where(e > 0.0, u, 0.0), axis=0)
        if WITH_SUM_SQ:
            q = q * (scale * scale) + tl.sum(e * e, axis=0)
        if WITH_MEAN:
            zs += tl.sum(tl.where(cols < n_cols, z, 0.0), axis=0)
        if WITH_TOP1:
            mb = tl.maximum(mb, tl.max(tl.where(cols < label, z, float("-inf")), axis=0))
        d = d * scale + tl.sum(e, axis=0)
        m = m_ref

    safe_label = tl.where(valid, label, 0)
    x_label = tl.load(row_ptr + safe_label).to(tl.float32)
    z_label = _transform(x_label, logit_scale, softcap, SOFTCAP)
    if HAS_THRESHOLD:  # a truncated label: logp = −inf
        z_label = tl.where(x_label >= thr, z_label, float("-inf"))
    # Ignored rows streamed nothing (d = 0): give them a harmless log_norm before masking. A row
    # that is entirely −inf gives log_norm = −inf and logp = NaN, as log_softmax does.
    log_norm = tl.log(tl.where(valid, d, 1.0))
    logp = (z_label - m) * inv_temperature - log_norm
    tl.store(row_max_ptr + row, tl.where(valid, m, 0.0).to(row_max_ptr.dtype.element_ty))
    tl.store(log_norm_ptr + row, tl.where(valid, log_norm, 0.0).to(log_norm_ptr.dtype.element_ty))
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0).to(logp_ptr.dtype.element_ty))
    if WITH_ENTROPY:
        entropy = tl.maximum(log_norm - a / tl.where(valid, d, 1.0), 0.0)  # H >= 0: clip rounding noise
        tl.store(entropy_ptr + row, tl.where(valid, entropy, 0.0).to(entropy_ptr.dtype.element_ty))
    if WITH_SUM_SQ:
        log_sum_sq = tl.log(tl.where(valid, q, 1.0)) - 2.0 * log_norm
        tl.store(sum_sq_ptr + row, tl.where(valid, log_sum_sq, 0.0).to(sum_sq_ptr.dtype.element_ty))
    if WITH_MEAN:
        mean = zs * inv_temperature / n_cols
        tl.store(mean_ptr + row, tl.where(valid, mean, 0.0).to(mean_ptr.dtype.element_ty))
    if WITH_TOP1:
        top1 = valid & (z_label >= m) & (z_label > mb)
        tl.store(top1_ptr + row, tl.where(top1, 1.0, 0.0).to(top1_ptr.dtype.element_ty))


# Backward. With s = z/τ, p = softmax(s) and H from the forward:
#   ∂logp/∂s_j = 1[j = y] − p_j
#   ∂H/∂s_j    = −Σ_k ∂p_k/∂s_j·(log p_k + 1) = −p_j·(log p_j + H)
# so, with upstream g_l = ∂L/∂logp and g_H = ∂L/∂H,
#   ∂L/∂z_j = (1/τ)·[ g_l·(1[j = y] − p_j) − g_H·p_j·(log p_j + H) ],
# where log p_j = (z_j − m)/τ − log_norm (see the module docstring) and p_j = e^{log p_j}; entries
# with p_j = 0 (z_j = −inf) get exactly 0, not 0·(−inf). With a logit transform z_j = f(x_j)
# (see _transform), ∂L/∂x_j = ∂L/∂z_j · k·(1 − (z_j/c)²) (just k without a softcap).
# Each program reads one block of one row and writes its gradient in place of, or beside, it.
@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, grad_ptr, labels_ptr, row_max_ptr, log_norm_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    n_cols, rows_per_block, stride_block, stride_row, stride_grad_block, stride_grad_row, inv_temperature,
    ignore_index, logit_scale, softcap, inv_t_rows_ptr, thr_ptr, PER_ROW_TEMP: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block, row_in_block = row // rows_per_block, row % rows_per_block
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < n_cols
    if PER_ROW_TEMP:
        inv_temperature = tl.load(inv_t_rows_ptr + row).to(tl.float32)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index

    # Ignored rows read nothing (an empty read range) and write zeros.
    to_read = cols < tl.where(valid, n_cols, 0)
    x = tl.load(logits_ptr + block * stride_block + row_in_block * stride_row + cols, mask=to_read,
                other=0.0).to(tl.float32)
    z = _transform(x, logit_scale, softcap, SOFTCAP)
    row_max = tl.load(row_max_ptr + row).to(tl.float32)
    log_norm = tl.load(log_norm_ptr + row).to(tl.float32)
    log_p = (z - row_max) * inv_temperature - log_norm
    p = tl.exp(log_p)
    grad = tl.zeros([BLOCK_V], dtype=tl.float32)
    if HAS_THRESHOLD:  # a truncated row: entries below the threshold had p = 0
        thr = tl.load(thr_ptr + row).to(tl.float32)
        p = tl.where(x >= thr, p, 0.0)
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + row).to(tl.float32)
        if HAS_THRESHOLD:  # a truncated label has the constant logp = −inf: no gradient from it
            x_label = tl.load(logits_ptr + block * stride_block + row_in_block * stride_row
                              + tl.where(valid, label, 0)).to(tl.float32)
            g_logp = tl.where(x_label >= thr, g_logp, 0.0)
        grad += g_logp * (tl.where(cols == label, 1.0, 0.0) - p)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row).to(tl.float32)
        entropy = tl.load(entropy_ptr + row).to(tl.float32)
        grad -= g_entropy * p * tl.where(p > 0.0, log_p + entropy, 0.0)
    grad = grad * inv_temperature * logit_scale
    if SOFTCAP:
        tanh = z / softcap
        grad = grad * (1.0 - tanh * tanh)
    grad = tl.where(valid, grad, 0.0)
    tl.store(grad_ptr + block * stride_grad_block + row_in_block * stride_grad_row + cols,
             grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _row_layout(t: torch.Tensor):
    """(rows, rows per block, block stride, row stride) of ``[N, V]`` rows or ``[B, T, V]`` blocks."""
    if t.dim() == 3:
        return t.shape[0] * t.shape[1], max(t.shape[1], 1), t.stride(0), t.stride(1)
    return t.shape[0], max(t.shape[0], 1), 0, t.stride(0)


def _output_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def logprob_forward(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
                    with_entropy: bool, extras: int = 0, logit_softcap: float = 0.0, logit_scale: float = 1.0,
                    inv_temperature_rows: Optional[torch.Tensor] = None, threshold_rows: Optional[torch.Tensor] = None):
    """Launch the forward over the rows of ``logits`` (see the module docstring); ``inv_temperature_rows``
    (contiguous ``[N]`` float32, optional) replaces ``1/temperature`` row by row; raw logits below
    ``threshold_rows`` (contiguous ``[N]``, optional) count as −inf (top-k / top-p truncation)."""
    n_rows, rows_per_block, stride_block, stride_row = _row_layout(logits)
    n_cols = logits.shape[-1]
    out_dtype = _output_dtype(logits)
    logp = torch.empty(n_rows, dtype=out_dtype, device=logits.device)
    row_max = torch.empty_like(logp)
    log_norm = torch.empty_like(logp)
    entropy = torch.zeros_like(logp) if not with_entropy else torch.empty_like(logp)
    sum_sq, top1, mean = extra_outputs(logp, extras)
    if n_rows == 0:
        return logp, entropy, row_max, log_norm, sum_sq, top1, mean
    block = _block_size(n_cols)
    _logprobs_fwd_kernel[(n_rows,)](
        logits, labels, logp, entropy, row_max, log_norm, sum_sq, top1, mean,
        n_cols, rows_per_block, stride_block, stride_row, 1.0 / temperature, ignore_index, logit_scale,
        logit_softcap or 1.0, inv_temperature_rows if inv_temperature_rows is not None else logp,
        threshold_rows if threshold_rows is not None else logp,
        PER_ROW_TEMP=inv_temperature_rows is not None, HAS_THRESHOLD=threshold_rows is not None,
        WITH_ENTROPY=with_entropy, SOFTCAP=logit_softcap > 0.0, WITH_SUM_SQ=bool(extras & EXTRA_SUM_SQ), WITH_TOP1=bool(extras & EXTRA_TOP1),
        WITH_MEAN=bool(extras & EXTRA_MEAN), BLOCK_V=block, num_warps=_num_warps(block),
    )
    return logp, entropy, row_max, log_norm, sum_sq, top1, mean


def logprob_backward(logits: torch.Tensor, labels: torch.Tensor, row_max: torch.Tensor, log_norm: torch.Tensor,
                     entropy: torch.Tensor, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                     temperature: float, ignore_index: int, out: torch.Tensor, logit_softcap: float = 0.0,
                     logit_scale: float = 1.0, inv_temperature_rows: Optional[torch.Tensor] = None,
                     threshold_rows: Optional[torch.Tensor] = None) -> None:
    """Write ∂L/∂logits into ``out`` (``logits``' shape); ``out`` may be ``logits`` itself (in-place backward);
    ``inv_temperature_rows``: the forward's per-row 1/τ, if any."""
    n_rows, rows_per_block, stride_block, stride_row = _row_layout(logits)
    _, _, stride_grad_block, stride_grad_row = _row_layout(out)
    n_cols = logits.shape[-1]
    if n_rows == 0:
        return
    block = _block_size(n_cols)
    grid = (n_rows, triton.cdiv(n_cols, block))
    _logprobs_bwd_kernel[grid](
        logits, out, labels, row_max, log_norm, entropy,
        grad_logp if grad_logp is not None else log_norm,
        grad_entropy if grad_entropy is not None else log_norm,
        n_cols, rows_per_block, stride_block, stride_row, stride_grad_block, stride_grad_row, 1.0 / temperature,
        ignore_index, logit_scale, logit_softcap or 1.0,
        inv_temperature_rows if inv_temperature_rows is not None else log_norm,
        threshold_rows if threshold_rows is not None else log_norm, inv_temperature_rows is not None,
        threshold_rows is not None,
        HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        SOFTCAP=logit_softcap > 0.0,
        BLOCK_V=block, num_warps=_num_warps(block),
    )
