"""Per-token log-probs and entropies over a vocabulary, streamed in blocks.

Each row i holds logits z_i [V], a label y_i and a temperature τ; with s = z/τ:
    lse = logsumexp(s),  logp = s_y − lse,  H = lse − Σ_j p_j·s_j,  p = softmax(s).
Rows whose label equals ``ignore_index`` give 0 everywhere and zero gradient.

Launchers (same contract as the CPU path in ``fastpo.ops.cpu_logprobs``):
    logprob_forward(logits [N, V], labels [N] int64, temperature, ignore_index, with_entropy)
        -> (logp [N], entropy [N], lse [N])           fp32 (fp64 for fp64 logits)
    logprob_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature,
                     ignore_index, out [N, V])       writes dL/dlogits into ``out`` (may be ``logits``)
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# Block sizes: a forward program streams its row in BLOCK_V chunks; the backward grid is
# (rows, vocabulary blocks), one program per block. Large blocks also keep the interpreter fast.
_MAX_BLOCK_V = 4096


def _block_size(n_cols: int) -> int:
    return min(triton.next_power_of_2(n_cols), _MAX_BLOCK_V)


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, entropy_ptr, lse_ptr,
    n_cols, stride_row, inv_temperature, ignore_index,
    WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # One program per row; one pass over the vocabulary with an online logsumexp:
    #   m ← max(m, max(block)),  d ← d·e^{m_old − m} + Σ e^{s − m},
    #   and for the entropy  a ← a·e^{m_old − m} + Σ e^{s − m}·s,  so that Σ p·s = a / d.
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    row_ptr = logits_ptr + row * stride_row
    # Ignored rows skip the stream entirely (zero trip count).
    n_stream = tl.where(valid, n_cols, 0)

    m = float("-inf")
    d = 0.0
    a = 0.0
    for start in range(0, n_stream, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        s = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(s, axis=0))
        scale = tl.exp(m - m_new)
        e = tl.exp(s - m_new)
        d = d * scale + tl.sum(e, axis=0)
        if WITH_ENTROPY:
            a = a * scale + tl.sum(e * tl.where(e > 0.0, s, 0.0), axis=0)
        m = m_new

    safe_label = tl.where(valid, label, 0)
    s_label = tl.load(row_ptr + safe_label).to(tl.float32) * inv_temperature
    # Ignored rows streamed nothing (m = −inf, d = 0): give them a harmless lse before masking.
    lse = tl.where(valid, m, 0.0) + tl.log(tl.where(valid, d, 1.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0).to(lse_ptr.dtype.element_ty))
    tl.store(logp_ptr + row, tl.where(valid, s_label - lse, 0.0).to(logp_ptr.dtype.element_ty))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, lse - a / tl.where(valid, d, 1.0), 0.0).to(entropy_ptr.dtype.element_ty))


# Backward. With s = z/τ, p = softmax(s), lse and H from the forward:
#   ∂logp/∂s_j = 1[j = y] − p_j
#   ∂H/∂s_j    = −Σ_k ∂p_k/∂s_j·(log p_k + 1) = −p_j·(log p_j + H) = −p_j·(s_j − lse + H)
# so, with upstream g_l = ∂L/∂logp and g_H = ∂L/∂H,
#   ∂L/∂z_j = (1/τ)·[ g_l·(1[j = y] − p_j) − g_H·p_j·(s_j − lse + H) ].
# Each program reads one block of one row and writes its gradient in place of, or beside, it.
@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, grad_ptr, labels_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    n_cols, stride_row, stride_grad_row, inv_temperature, ignore_index,
    HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < n_cols
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index

    # Ignored rows read nothing (an empty read range) and write zeros.
    to_read = cols < tl.where(valid, n_cols, 0)
    s = tl.load(logits_ptr + row * stride_row + cols, mask=to_read, other=0.0).to(tl.float32) * inv_temperature
    lse = tl.load(lse_ptr + row).to(tl.float32)
    p = tl.exp(s - lse)
    grad = tl.zeros([BLOCK_V], dtype=tl.float32)
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + row).to(tl.float32)
        grad += g_logp * (tl.where(cols == label, 1.0, 0.0) - p)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row).to(tl.float32)
        entropy = tl.load(entropy_ptr + row).to(tl.float32)
        grad -= g_entropy * p * (s - lse + entropy)
    grad = tl.where(valid, grad * inv_temperature, 0.0)
    tl.store(grad_ptr + row * stride_grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _output_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def logprob_forward(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
                    with_entropy: bool):
    """Launch the forward over rows of ``logits [N, V]`` (last dim contiguous)."""
    n_rows, n_cols = logits.shape
    out_dtype = _output_dtype(logits)
    logp = torch.empty(n_rows, dtype=out_dtype, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.zeros_like(logp) if not with_entropy else torch.empty_like(logp)
    if n_rows == 0:
        return logp, entropy, lse
    block = _block_size(n_cols)
    _logprobs_fwd_kernel[(n_rows,)](
        logits, labels, logp, entropy, lse,
        n_cols, logits.stride(0), 1.0 / temperature, ignore_index,
        WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=_num_warps(block),
    )
    return logp, entropy, lse


def logprob_backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                     grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                     temperature: float, ignore_index: int, out: torch.Tensor) -> None:
    """Write ∂L/∂logits into ``out [N, V]``; ``out`` may be ``logits`` itself (in-place backward)."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block = _block_size(n_cols)
    grid = (n_rows, triton.cdiv(n_cols, block))
    _logprobs_bwd_kernel[grid](
        logits, out, labels, lse, entropy,
        grad_logp if grad_logp is not None else lse,
        grad_entropy if grad_entropy is not None else lse,
        n_cols, logits.stride(0), out.stride(0), 1.0 / temperature, ignore_index,
        HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        BLOCK_V=block, num_warps=_num_warps(block),
    )
