"""Segment reductions: per-sequence masked sums (or means) of per-token values, and their backward.

Sequence i of a batch holds tokens t with value x_t and a mask m_t (non-zero = counted):
    sum_i = Σ_{t ∈ i} m_t·x_t,   n_i = Σ_{t ∈ i} m_t,   mean_i = sum_i / max(n_i, 1)   (0 when empty).
Masked values are never read into the sum (any value, inf or NaN included, is ignored).

Two layouts, one kernel (the ``PADDED`` constexpr):
  padded ``[B, T]``: sequence i is row i, token t at ``i·stride_seq + t·stride_tok``;
  packed ``[N]``: sequence i is tokens ``cu_seqlens[i] : cu_seqlens[i+1]``, token p at ``p·stride_tok``.
Every offset is int64. One program per sequence streams it in ``BLOCK``-token chunks, accumulating in
the output dtype (float32, float64 for float64).

Launchers (same contract as the CPU path in ``fastpo.ops.sequence_logprobs``):
    segment_forward(x, mask, cu_seqlens, average) -> (out [B], count [B])
    segment_backward(grad_out [B], count [B], mask, cu_seqlens, shape, dtype, average) -> grad (shape)
``x`` is ``[B, T]`` (``cu_seqlens`` None) or ``[N]``; ``mask`` a bool tensor shaped like ``x`` or None.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

_MIN_BLOCK = 16
_MAX_BLOCK = 2048


def _block_size(num_tokens: int, num_seqs: int) -> int:
    """Chunk length: the (mean) sequence length rounded up to a power of two, within bounds."""
    mean_len = -(-num_tokens // max(num_seqs, 1))
    return max(_MIN_BLOCK, min(triton.next_power_of_2(max(mean_len, 1)), _MAX_BLOCK))


@triton.jit
def _sequence_span(cu_ptr, seq, padded_len, stride_seq, mask_stride_seq, PADDED: tl.constexpr):
    """[start, end) of sequence ``seq`` in token coordinates, and the offsets of its row in the values
    and the mask (int64). A packed batch has one flat token axis (stride_seq = 0): its sequences
    start at cu_seqlens[i]."""
    if PADDED:
        start = seq * 0
        end = start + padded_len
    else:
        start = tl.load(cu_ptr + seq)
        end = tl.load(cu_ptr + seq + 1)
    return start, end, seq * stride_seq, seq * mask_stride_seq


@triton.jit
def _counted(m_row, tok, end, mask_stride_tok, HAS_MASK: tl.constexpr):
    """(inside the sequence, inside and counted) for the token block ``tok``."""
    inside = tok < end
    keep = inside
    if HAS_MASK:
        keep = keep & (tl.load(m_row + tok * mask_stride_tok, mask=inside, other=0) != 0)
    return inside, keep


@triton.jit
def _segment_fwd_kernel(
    x_ptr, mask_ptr, cu_ptr, out_ptr, count_ptr,
    padded_len, stride_seq, stride_tok, mask_stride_seq, mask_stride_tok,
    PADDED: tl.constexpr, HAS_MASK: tl.constexpr, AVERAGE: tl.constexpr, BLOCK: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    start, end, row, mask_row = _sequence_span(cu_ptr, seq, padded_len, stride_seq, mask_stride_seq, PADDED)
    acc_ty = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK], dtype=acc_ty)
    count = tl.zeros([BLOCK], dtype=acc_ty)
    for block_start in range(start, end, BLOCK):
        tok = tl.arange(0, BLOCK).to(tl.int64) + block_start
        _, keep = _counted(mask_ptr + mask_row, tok, end, mask_stride_tok, HAS_MASK)
        total += tl.load(x_ptr + row + tok * stride_tok, mask=keep, other=0.0).to(acc_ty)
        count += keep.to(acc_ty)
    s = tl.sum(total, axis=0)
    n = tl.sum(count, axis=0)
    if AVERAGE:
        s = s / tl.maximum(n, 1.0)
    tl.store(out_ptr + seq, s)
    tl.store(count_ptr + seq, n)


# Backward. ∂sum_i/∂x_t = m_t and ∂mean_i/∂x_t = m_t / max(n_i, 1) for t in sequence i, so with the
# upstream g_i = ∂L/∂out_i every token of sequence i gets g_i (÷ n_i when averaging) if counted, else 0.
# Every token belongs to exactly one sequence, so the programs write the whole gradient.
@triton.jit
def _segment_bwd_kernel(
    grad_out_ptr, count_ptr, mask_ptr, cu_ptr, grad_ptr,
    padded_len, stride_seq, stride_tok, mask_stride_seq, mask_stride_tok,
    PADDED: tl.constexpr, HAS_MASK: tl.constexpr, AVERAGE: tl.constexpr, BLOCK: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    start, end, row, mask_row = _sequence_span(cu_ptr, seq, padded_len, stride_seq, mask_stride_seq, PADDED)
    g = tl.load(grad_out_ptr + seq)
    if AVERAGE:
        g = g / tl.maximum(tl.load(count_ptr + seq), 1.0)
    for block_start in range(start, end, BLOCK):
        tok = tl.arange(0, BLOCK).to(tl.int64) + block_start
        inside, keep = _counted(mask_ptr + mask_row, tok, end, mask_stride_tok, HAS_MASK)
        value = tl.where(keep, g, 0.0)
        tl.store(grad_ptr + row + tok * stride_tok, value.to(grad_ptr.dtype.element_ty), mask=inside)


def _mask_args(mask: Optional[torch.Tensor], like: torch.Tensor):
    """(pointer tensor, stride_seq, stride_tok) of the mask; the values themselves when there is none."""
    if mask is None:
        return like, 0, 0
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return (m, m.stride(0), m.stride(1)) if m.dim() == 2 else (m, 0, m.stride(0))


def _layout_args(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor]):
    """(num_seqs, padded_len, stride_seq, stride_tok, cu pointer tensor) of a padded or packed tensor."""
    if cu_seqlens is None:
        return x.shape[0], x.shape[1], x.stride(0), x.stride(1), x
    return cu_seqlens.numel() - 1, 0, 0, x.stride(0), cu_seqlens


def segment_forward(x: torch.Tensor, mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                    average: bool):
    """Per-sequence masked sum (mean when ``average``) and counted-token count, both ``[B]``."""
    num_seqs, padded_len, stride_seq, stride_tok, cu = _layout_args(x, cu_seqlens)
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty(num_seqs, dtype=out_dtype, device=x.device)
    count = torch.empty_like(out)
    if num_seqs == 0:
        return out, count
    m, mask_stride_seq, mask_stride_tok = _mask_args(mask, x)
    _segment_fwd_kernel[(num_seqs,)](
        x, m, cu, out, count,
        padded_len, stride_seq, stride_tok, mask_stride_seq, mask_stride_tok,
        PADDED=cu_seqlens is None, HAS_MASK=mask is not None, AVERAGE=average,
        BLOCK=_block_size(x.numel(), num_seqs),
    )
    return out, count


def segment_backward(grad_out: torch.Tensor, count: torch.Tensor, mask: Optional[torch.Tensor],
                     cu_seqlens: Optional[torch.Tensor], shape: Sequence[int], dtype: torch.dtype,
                     average: bool) -> torch.Tensor:
    """Gradient w.r.t. the per-token values: a new contiguous tensor of ``shape`` and ``dtype``."""
    grad = torch.empty(tuple(shape), dtype=dtype, device=grad_out.device)
    num_seqs, padded_len, stride_seq, stride_tok, cu = _layout_args(grad, cu_seqlens)
    if grad.numel() == 0 or num_seqs == 0:
        return grad
    m, mask_stride_seq, mask_stride_tok = _mask_args(mask, grad)
    _segment_bwd_kernel[(num_seqs,)](
        grad_out, count, m, cu, grad,
        padded_len, stride_seq, stride_tok, mask_stride_seq, mask_stride_tok,
        PADDED=cu_seqlens is None, HAS_MASK=mask is not None, AVERAGE=average,
        BLOCK=_block_size(grad.numel(), num_seqs),
    )
    return grad
