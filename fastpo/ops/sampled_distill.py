"""``fastpo.sampled_distill_loss``: the cheap sampled-token form of on-policy distillation, from the
per-token log-probs of the sampled tokens under the student and the teacher (``[...]`` each; no vocabulary).

The math is ``fastpo.reference.distill.sampled_distill_loss`` (TRL's SDPO/SDFT ``sampled_token`` mode
and verl's ``kl_penalty`` distillation estimators). It is elementwise over N tokens, so it is a plain
composition of torch ops (fused by ``torch.compile``), not a kernel of its own; this module validates.
"""

from __future__ import annotations

import torch

from fastpo import _validation as check
from fastpo.reference import distill as ref

__all__ = ["sampled_distill_loss"]


def sampled_distill_loss(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask=None, *,
                         estimator: str = "reinforce", reduction: str = "batchmean", num_items_in_batch=None):
    """Per token, δ = student_logp − teacher_logp: ``"reinforce"`` sg(δ)·student_logp (its gradient is the
    on-policy estimate of ∇KL(student‖teacher); TRL), ``"k1"`` δ, ``"abs"`` |δ|, ``"k2"`` δ²/2, ``"k3"``
    clamp(e^{−δ'} + δ' − 1, ±10) with δ' = clamp(δ, ±20) (verl). Counted where ``mask != 0``; reduced as
    :func:`fastpo.linear_distill_loss` (``"mean"`` = ``"batchmean"`` here: V = 1). The teacher gets no gradient."""
    check.check_float_tensor(student_logp, "student_logp")
    check.check_float_tensor(teacher_logp, "teacher_logp")
    if tuple(teacher_logp.shape) != tuple(student_logp.shape):
        raise ValueError(f"teacher_logp must have student_logp's shape {check.shape_of(student_logp)}, "
                         f"got {check.shape_of(teacher_logp)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(student_logp.shape):
            raise ValueError(f"mask must have student_logp's shape {check.shape_of(student_logp)}, "
                             f"got {check.shape_of(mask)}")
    check.check_same_device(student_logp=student_logp, teacher_logp=teacher_logp, mask=mask)
    check.check_choice(estimator, "estimator", ref.SAMPLED_ESTIMATORS)
    check.check_choice(reduction, "reduction", ref.REDUCTIONS)
    return ref.sampled_distill_loss(student_logp, teacher_logp, mask, estimator=estimator, reduction=reduction,
                                    num_items_in_batch=num_items_in_batch)
