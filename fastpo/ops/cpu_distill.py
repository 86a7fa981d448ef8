"""The CPU path of the distillation row step: one chunk of both models' logits, in torch.

Same contract as ``fastpo.kernels.distill.distill_rows`` (the Triton kernel, whose comment derives the
gradient): for ``student [C, V]`` and ``teacher [C, V]`` logits, the per-row divergence D and student
entropy H, and, when ``row_weight [C]`` is given, w_i·∂D_i/∂x_s written into ``student`` in place
(0 on rows whose weight is 0, whatever their logits). Computed in float32 (float64 for float64 logits).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastpo._layout import accumulation_dtype

__all__ = ["distill_rows", "divergence_mode"]


def divergence_mode(beta: float) -> int:
    """0: forward KL (β = 0), 1: reverse KL (β = 1), 2: generalised JSD."""
    return 0 if beta == 0.0 else 1 if beta == 1.0 else 2


def _transform(x: torch.Tensor, softcap: float, scale: float, tau: float, dt):
    """(z/τ, tanh(k·x/c) or None) with z = c·tanh(k·x/c) (k·x when ``softcap`` is 0)."""
    y = x.to(dt) * scale if scale != 1.0 else x.to(dt)
    if softcap:
        th = torch.tanh(y / softcap)
        return th * (softcap / tau), th
    return y / tau, None


def _plogr(w, log_a, log_b):
    return (w * torch.where(w > 0, log_a - log_b, 0.0)).sum(-1)


def distill_rows(student: torch.Tensor, teacher: torch.Tensor, row_weight: Optional[torch.Tensor], beta: float,
                 tau: float, s_softcap: float, s_scale: float, t_softcap: float, t_scale: float):
    dt = torch.promote_types(accumulation_dtype(student.dtype), accumulation_dtype(teacher.dtype))
    s, th = _transform(student, s_softcap, s_scale, tau, dt)
    t, _ = _transform(teacher, t_softcap, t_scale, tau, dt)
    log_p = torch.log_softmax(s, dim=-1)
    log_q = torch.log_softmax(t, dim=-1)
    del s, t
    p, q = log_p.exp(), log_q.exp()
    entropy = -_plogr(p, log_p, torch.zeros((), dtype=dt))
    mode = divergence_mode(beta)
    if mode == 0:
        div = _plogr(q, log_q, log_p)
    elif mode == 1:
        div = _plogr(p, log_p, log_q)
    else:
        log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
        kl_pm = _plogr(p, log_p, log_m)
        div = beta * _plogr(q, log_q, log_m) + (1 - beta) * kl_pm
    if row_weight is not None:
        w = row_weight.to(dt).unsqueeze(-1)
        if mode == 0:
            grad = p - q
        elif mode == 1:
            grad = p * torch.where(p > 0, log_p - log_q - div.unsqueeze(-1), 0.0)
        else:
            grad = (1 - beta) * p * torch.where(p > 0, log_p - log_m - kl_pm.unsqueeze(-1), 0.0)
        scale = s_scale / tau
        grad = grad * (w * scale) if th is None else grad * (w * scale) * (1 - th * th)
        student.copy_(torch.where(w != 0, grad, 0.0))
    return div, entropy
