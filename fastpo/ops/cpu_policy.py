"""CPU path of the per-token losses: the fused C++ kernel ``fastpo._C.token_loss_forward``.

Same contract as ``fastpo.kernels.policy_loss`` (see ``fastpo.ops.loss_spec``): one pass per
sequence of ``cu_seqlens`` computes every token's loss and ∂loss/∂x up to the global scale (``unit``),
the per-sequence statistics and the metrics, so the backward is one multiply. Inputs reach C++
zero-copy through NumPy views when they are already contiguous in the accumulation dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastpo import _C
from fastpo._layout import accumulation_dtype
from fastpo.ops.cpu_logprobs import _as_numpy
from fastpo.ops.loss_spec import STATS, TokenLossSpec
from fastpo.policy_config import AGGREGATIONS
from fastpo.reference.policy import LOG_RATIO_CLAMP

__all__ = ["token_loss_forward", "token_loss_backward"]


_KERNEL_SPECS: dict = {}
# Masks the kernel reads as they are (non-zero = counted): a float mask (verl's response_mask) needs no
# `mask != 0` pass over the batch first.
_KERNEL_MASK_DTYPES = (torch.bool, torch.uint8, torch.float32, torch.float64)


def _kernel_spec(s: TokenLossSpec, num_tokens: Optional[torch.Tensor]) -> dict:
    """The extension's spec dict, cached per spec (shared: read it, never edit it; a copy when num_tokens is set)."""
    spec = _KERNEL_SPECS.get(s)
    if spec is None:
        spec = s._asdict()
        spec.update(rollout_seq=s.rollout_seq, rollout_mask=s.rollout_mask, rollout_given=s.rollout_given,
                    aggregation=AGGREGATIONS[s.aggregation], log_ratio_clamp=LOG_RATIO_CLAMP)
        if len(_KERNEL_SPECS) >= 512:
            _KERNEL_SPECS.clear()
        _KERNEL_SPECS[s] = spec
    if num_tokens is not None:
        spec = dict(spec, num_tokens=float(num_tokens))
    return spec


def token_loss_forward(x, old, adv, ref: Optional[torch.Tensor], ent: Optional[torch.Tensor],
                       roll: Optional[torch.Tensor], mask: Optional[torch.Tensor], cu_seqlens: torch.Tensor,
                       num_tokens: Optional[torch.Tensor], s: TokenLossSpec):
    """(loss, stats, unit, unit_entropy) of the flat inputs ``[N]`` (see ``fastpo.ops.loss_spec``)."""
    dt = accumulation_dtype(x.dtype)
    N = x.numel()
    # The kernel takes exactly the optional inputs the spec reads (none for the value loss).
    ref, ent, roll = (t if used else None for t, used in ((ref, s.kl), (ent, s.has_entropy), (roll, s.rollout)))
    flat = lambda t: None if t is None else t.detach().to(dt).contiguous()  # noqa: E731
    x, old, adv, ref, ent, roll = map(flat, (x, old, adv, ref, ent, roll))
    if mask is not None and mask.dtype not in _KERNEL_MASK_DTYPES:
        mask = mask != 0
    m = None if mask is None else mask.detach().contiguous()
    unit = torch.empty(N, dtype=dt)
    unit_ent = torch.empty(N if s.has_entropy else 0, dtype=dt)
    stats = torch.empty(len(STATS), dtype=dt)
    _C.token_loss_forward(_as_numpy(x), _as_numpy(old), _as_numpy(adv), _as_numpy(ref), _as_numpy(ent),
                          _as_numpy(roll), _as_numpy(m), _as_numpy(cu_seqlens.to(torch.int64).contiguous()),
                          _as_numpy(unit), _as_numpy(unit_ent) if s.has_entropy else None, _as_numpy(stats),
                          _kernel_spec(s, num_tokens))
    return stats[0].clone(), stats, unit, unit_ent


def token_loss_backward(grad_loss, stats, unit, unit_ent, out_dtype, ent_dtype):
    """(∂L/∂x, ∂L/∂entropy) = g·scale·(unit, unit_entropy), in the inputs' dtypes."""
    c = grad_loss.to(unit.dtype) * stats[1]
    return (c * unit).to(out_dtype), (c * unit_ent).to(ent_dtype)
