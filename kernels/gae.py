"""GAE as a reverse associative scan: one launch for the whole batch, one program per sequence.

Sequence i holds tokens ``[cu[i], cu[i+1])`` of flat ``rewards``, ``values`` (and ``mask``); a padded
``[B, T]`` batch is the packed one with ``cu = [0, T, 2T, …]``. Over the counted tokens only:
    δ_t = r_t + γ·V_next(t) − V_t,   A_t = δ_t + γλ·A_next(t),   R_t = A_t + V_t,
"next" being the next counted token of the sequence (0 past the last); masked tokens output 0.

Launcher (same contract as the CPU path in ``fastpo.ops.cpu_advantages``):
    gae_scan(rewards [N], values [N], mask [N] bool/uint8 | None, cu_seqlens [B+1] int64, gamma, lam, *,
             max_len=None, block=None) -> (advantages [N], returns [N])    dtype of rewards (fp32 or fp64)
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_MAX_BLOCK_T = 1024


# Both quantities are first-order linear recurrences running backwards over *every* position j of the
# sequence (counted or not):  y_j = a_j·y_{j+1} + b_j,  y_end = 0.
#   V_next:  y_j = value of the first counted token strictly after j
#            = V_{j+1} if m_{j+1} else y_{j+1}        → (a, b) = (1 − m_{j+1}, m_{j+1}·V_{j+1})
#   A:       y_j = A of the first counted token at or after j
#            = δ_j + γλ·y_{j+1} if m_j else y_{j+1}   → (a, b) = (γλ, δ_j) if m_j else (1, 0)
# so a masked token is the identity map (1, 0): it neither contributes its value nor breaks the chain,
# and A_t = y_t at counted t. The affine maps x ↦ a·x + b compose associatively; the suffix product
#   y_j = (e_j ∘ e_{j+1} ∘ … ∘ e_{last})(carry),   (a, b) ∘ (A, B) = (a·A, a·B + b),
# is a reverse associative scan (tl.associative_scan(..., reverse=True) flips the block, scans forward
# with combine(accumulated, element) and flips back, in the interpreter and the compiled code alike).
# Long sequences go in blocks of BLOCK_T from the last one to the first, carrying y at the first
# position of the block processed before (0 for the last block: positions past the end are
# identities).
@triton.jit
def _affine_combine(acc_a, acc_b, a, b):
    return a * acc_a, a * acc_b + b


@triton.jit
def _gae_kernel(
    rewards_ptr, values_ptr, mask_ptr, cu_ptr, adv_ptr, ret_ptr,
    gamma, gamma_lam,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    begin = tl.load(cu_ptr + seq)
    end = tl.load(cu_ptr + seq + 1)
    n_blocks = tl.cdiv(end - begin, BLOCK_T)
    lanes = tl.arange(0, BLOCK_T)
    out_ty = adv_ptr.dtype.element_ty
    carry_v = tl.zeros((), dtype=out_ty)
    carry_a = tl.zeros((), dtype=out_ty)
    for i in range(0, n_blocks):
        start = begin + (n_blocks - 1 - i).to(tl.int64) * BLOCK_T
        offs = start + lanes
        inside = offs < end
        inside_next = offs + 1 < end
        r = tl.load(rewards_ptr + offs, mask=inside, other=0.0)
        v = tl.load(values_ptr + offs, mask=inside, other=0.0)
        v_next = tl.load(values_ptr + offs + 1, mask=inside_next, other=0.0)
        if HAS_MASK:
            counted = (tl.load(mask_ptr + offs, mask=inside, other=0) != 0) & inside
            counted_next = (tl.load(mask_ptr + offs + 1, mask=inside_next, other=0) != 0) & inside_next
        else:
            counted = inside
            counted_next = inside_next
        one = tl.full((BLOCK_T,), 1.0, out_ty)
        zero = tl.zeros((BLOCK_T,), out_ty)
        # V_next of every position.
        sa, sb = tl.associative_scan((tl.where(counted_next, zero, one), tl.where(counted_next, v_next, zero)),
                                     0, _affine_combine, reverse=True)
        nv = sa * carry_v + sb
        # A of the first counted token at or after every position.
        delta = r + gamma * nv - v
        sa, sb = tl.associative_scan((tl.where(counted, zero + gamma_lam, one), tl.where(counted, delta, zero)),
                                     0, _affine_combine, reverse=True)
        y = sa * carry_a + sb
        tl.store(adv_ptr + offs, tl.where(counted, y, zero), mask=inside)
        tl.store(ret_ptr + offs, tl.where(counted, y + v, zero), mask=inside)
        first = lanes == 0
        carry_v = tl.sum(tl.where(first, nv, zero), axis=0)
        carry_a = tl.sum(tl.where(first, y, zero), axis=0)


def gae_scan(rewards: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor], cu_seqlens: torch.Tensor,
             gamma: float, lam: float, *, max_len: Optional[int] = None, block: Optional[int] = None):
    """Advantages and returns of flat contiguous ``rewards``/``values`` (float32 or float64).

    ``max_len`` bounds every sequence's length (default N); blocks are the next power of two of it, at
    most 1024 tokens (``block`` overrides, e.g. tiny blocks to test the carry under the interpreter).
    """
    adv = torch.empty_like(rewards)
    ret = torch.empty_like(rewards)
    num_seqs = cu_seqlens.numel() - 1
    if num_seqs == 0 or rewards.numel() == 0:
        return adv.zero_(), ret.zero_()
    if block is None:
        bound = rewards.numel() if max_len is None else max_len
        block = min(triton.next_power_of_2(max(bound, 1)), _MAX_BLOCK_T)
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # zero-copy: one byte per token either way
    _gae_kernel[(num_seqs,)](
        rewards, values, mask if mask is not None else rewards, cu_seqlens, adv, ret,
        float(gamma), float(gamma * lam),
        HAS_MASK=mask is not None, BLOCK_T=block, num_warps=4,
    )
    return adv, ret
