"""The lm_head steps shared by the fused linear ops (``linear_token_logprobs``, ``linear_policy_loss``):
operand checks, one chunk's logits, and one chunk's gradient GEMMs.

For a chunk of rows ``h_c [C, D]`` with logit gradient ``G_c = ∂L/∂(h_c·Wᵀ + b) [C, V]``:
    ∂L/∂h_c = G_c·W,   ∂L/∂W += G_cᵀ·h_c,   ∂L/∂b += Σ_rows G_c
with ∂L/∂W and ∂L/∂b accumulated in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastpo import _validation as check
from fastpo.ops.row_kernels import result_dtype

__all__ = ["check_head_operands", "chunk_logits", "gradient_buffers", "add_chunk_gradients"]


def check_head_operands(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """``hidden [..., D]``, ``weight [V, D]`` (V >= 1) and ``bias [V]`` or None, floating, one dtype."""
    check.check_float_tensor(hidden, "hidden")
    check.check_float_tensor(weight, "weight")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or weight.shape[0] < 1:
        raise ValueError(
            f"hidden [..., D] and weight [V, D] must share D (and V >= 1), got hidden {check.shape_of(hidden)} "
            f"and weight {check.shape_of(weight)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None:
        check.check_float_tensor(bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {check.shape_of(bias)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.linear(hidden, weight, bias)


def gradient_buffers(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], needs_hidden: bool,
                     needs_weight: bool, needs_bias: bool):
    """(grad_hidden in hidden's dtype, grad_weight and grad_bias zero-filled accumulators in float32), each
    empty when not needed (a frozen lm_head, no bias)."""
    acc = result_dtype(weight.dtype)
    grad_hidden = hidden.new_empty(hidden.shape) if needs_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_weight else weight.new_empty(0)
    needs_bias = needs_bias and bias is not None
    grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if needs_bias else weight.new_empty(0)
    return grad_hidden, grad_weight, grad_bias


def add_chunk_gradients(grad_logits: torch.Tensor, hidden_rows: torch.Tensor, weight: torch.Tensor, rows: slice,
                        grad_hidden: torch.Tensor, grad_weight: torch.Tensor, grad_bias: torch.Tensor) -> None:
    """Write ∂L/∂h of the chunk ``rows`` into ``grad_hidden[rows]`` and add its ∂L/∂W, ∂L/∂b to the
    accumulators (each skipped when its buffer is empty)."""
    if grad_hidden.numel():
        torch.mm(grad_logits, weight, out=grad_hidden[rows])
    if grad_weight.numel() or grad_bias.numel():
        grad_logits_acc = grad_logits.to(grad_weight.dtype if grad_weight.numel() else grad_bias.dtype)
        if grad_weight.numel():
            grad_weight.addmm_(grad_logits_acc.t(), hidden_rows.to(grad_logits_acc.dtype))
        if grad_bias.numel():
            grad_bias += grad_logits_acc.sum(dim=0)
