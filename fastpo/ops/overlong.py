"""``fastpo.overlong_penalty``: DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13).

verl 0.9.1 (``verl/workers/reward_manager/dapo.py``, ``overlong_buffer``) and TRL 1.16
(``trl.rewards.get_soft_overlong_punishment``) compute, with L the response length::

    R(L) = 0                                   L ≤ max_len − buffer
           ((max_len − buffer) − L)/buffer·factor   max_len − buffer < L ≤ max_len
           −factor                             L > max_len      (TRL; verl keeps the linear ramp)

One elementwise expression, so it traces under ``torch.compile``.
"""

from __future__ import annotations

from numbers import Real

import torch

from fastpo import _validation as check

__all__ = ["overlong_penalty"]


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """The soft overlong penalty (≤ 0) to add to each response's reward.

    ``lengths [B]`` (integer or floating: response lengths in tokens), ``max_len`` the generation
    limit L_max, ``buffer`` the soft-punishment span L_cache (``0 ≤ buffer ≤ max_len``; 0 = no ramp:
    only L > max_len is punished), ``factor`` the penalty at the end of the ramp (verl's
    ``penalty_factor``; TRL's is 1). Returns float32 ``[B]``: 0 up to ``max_len − buffer``, falling
    linearly to −factor at ``max_len``, and −factor beyond (TRL; verl's formula keeps falling past
    ``max_len``, which its generation limit never reaches).
    """
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be a torch.Tensor, got {type(lengths).__name__}")
    if lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"lengths must be an integer or floating tensor, got {lengths.dtype}")
    max_len = check.check_int(max_len, "max_len")
    buffer = check.check_int(buffer, "buffer")
    if max_len < 1 or not 0 <= buffer <= max_len:
        raise ValueError(f"need max_len >= 1 and 0 <= buffer <= max_len, got max_len={max_len}, buffer={buffer}")
    if isinstance(factor, bool) or not isinstance(factor, Real) or not 0.0 <= float(factor) < float("inf"):
        raise ValueError(f"factor must be a finite number >= 0, got {factor!r}")
    length = lengths.detach().to(torch.float64 if lengths.dtype == torch.float64 else torch.float32)
    if buffer == 0:
        return torch.where(length > max_len, -float(factor), 0.0).to(length.dtype)
    ramp = ((max_len - buffer) - length) / buffer
    return ramp.clamp(min=-1.0, max=0.0) * float(factor)
