"""Reference distillation losses: full ``[N, V]`` logits of both models, eager and float64-capable.

Student logits x_s, teacher logits x_t (the teacher is a constant: no gradient reaches it). Each is
transformed as TRL does, z = c·tanh(k·x/c) (``logit_scale`` k, ``logit_softcap`` c; k·x without a
softcap), then divided by the temperature τ. With p = softmax(z_s/τ) (student), q = softmax(z_t/τ)
(teacher), per token (TRL 1.16's ``ChunkedDivergenceFunction`` and GKD's ``generalized_jsd_loss``):
    β = 0:      D = KL(q‖p) = Σ_j q_j (log q_j − log p_j)                    (forward KL)
    β = 1:      D = KL(p‖q) = Σ_j p_j (log p_j − log q_j)                    (reverse KL)
    0 < β < 1:  m = (1 − β)·p + β·q,  D = β·KL(q‖m) + (1 − β)·KL(p‖m)        (generalised JSD)
A term whose weight (q_j, or p_j) is 0 counts 0 (0·log 0 = 0), so a vocabulary masked to −inf in one
model gives no NaN. The student entropy H = −Σ_j p_j log p_j is returned detached.

Reductions (GKD's): ``"batchmean"`` Σ D / (number of counted tokens, at least 1), or / the leading
size of ``student_hidden`` without a mask (``kl_div``'s batchmean); ``"sum"``; ``"mean"`` Σ D / (counted
tokens · V, at least 1: TRL's mean over the ``[n, V]`` elements); ``"none"`` the per-token D shaped like
the tokens (0 where not counted; TRL returns the ``[n, V]`` elements). ``num_items_in_batch`` overrides
the reduction with Σ D / num_items_in_batch (gradient accumulation), as TRL does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastpo._layout import accumulation_dtype
from fastpo.reference.logprobs import transform_logits

__all__ = ["linear_distill_loss", "distill_divergence", "reduce_distill", "sampled_distill_loss",
           "reduce_total", "counted_tokens", "REDUCTIONS",
           "SAMPLED_ESTIMATORS"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")
SAMPLED_ESTIMATORS = ("reinforce", "k1", "abs", "k2", "k3")


def _plogr(w: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Σ_j w_j·(log a_j − log b_j) with 0 where w_j = 0 (the difference is masked before the product, so
    neither the value nor the gradient meets 0·inf)."""
    diff = torch.where(w > 0, log_a - log_b, torch.zeros((), dtype=w.dtype, device=w.device))
    return (w * diff).sum(-1)


def distill_divergence(student_logits, teacher_logits, beta: float, temperature: float = 1.0,
                       student_logit_softcap=None, student_logit_scale=1.0, teacher_logit_softcap=None,
                       teacher_logit_scale=1.0):
    """(D, H) per row of ``[..., V]`` logits: the divergence of the module docstring (differentiable w.r.t.
    the student logits) and the student entropy (detached)."""
    s = transform_logits(student_logits, student_logit_softcap, student_logit_scale) / temperature
    t = transform_logits(teacher_logits.detach(), teacher_logit_softcap, teacher_logit_scale) / temperature
    dt = torch.promote_types(s.dtype, t.dtype)
    log_p = torch.log_softmax(s.to(dt), dim=-1)
    log_q = torch.log_softmax(t.to(dt), dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if beta == 0:
        div = _plogr(q, log_q, log_p)
    elif beta == 1:
        div = _plogr(p, log_p, log_q)
    else:
        log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
        div = beta * _plogr(q, log_q, log_m) + (1 - beta) * _plogr(p, log_p, log_m)
    with torch.no_grad():
        entropy = -_plogr(p, log_p, torch.zeros_like(log_p))
    return div, entropy


def reduce_distill(per_token: torch.Tensor, counted: Optional[torch.Tensor], reduction: str, num_items_in_batch,
                   lead_size: int, vocab_size: int):
    """The reduction of the module docstring over ``per_token`` (already 0 where not ``counted``)."""
    if reduction == "none" and num_items_in_batch is None:
        return per_token
    return reduce_total(per_token.sum(), counted, per_token.numel(), reduction, num_items_in_batch, lead_size,
                        vocab_size)


def reduce_total(total: torch.Tensor, counted: Optional[torch.Tensor], n_tokens: int, reduction: str,
                 num_items_in_batch, lead_size: int, vocab_size: int):
    """A reduced loss from ``total`` = Σ D over the counted tokens (``reduction`` other than ``"none"``, or
    ``num_items_in_batch``)."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        denom = counted.sum().clamp_min(1) if counted is not None else max(lead_size, 1)
    else:  # "mean": TRL's mean over the [n, V] elements
        denom = (counted.sum() * vocab_size).clamp_min(1) if counted is not None else max(n_tokens * vocab_size, 1)
    return total / denom


def counted_tokens(lead_shape, labels=None, mask=None, ignore_index: int = -100):
    """The bool ``[...]`` of counted tokens (None: all of them) from ``labels != ignore_index`` or ``mask``."""
    if labels is not None:
        return labels != ignore_index
    if mask is not None:
        return mask.reshape(lead_shape) != 0
    return None


def linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *, mask=None,
                        beta: float = 0.5, temperature: float = 1.0, student_bias=None, teacher_bias=None,
                        student_logit_softcap=None, student_logit_scale=1.0, teacher_logit_softcap=None,
                        teacher_logit_scale=1.0, ignore_index: int = -100, reduction: str = "batchmean",
                        num_items_in_batch=None, return_entropy: bool = False):
    """The distillation loss of ``fastpo.linear_distill_loss`` from the full logits of both models; with
    ``return_entropy`` also the per-token student entropy (detached, 0 where not counted)."""
    s_logits = torch.nn.functional.linear(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        t_logits = torch.nn.functional.linear(teacher_hidden, teacher_weight, teacher_bias)
    div, entropy = distill_divergence(s_logits, t_logits, beta, temperature, student_logit_softcap,
                                      student_logit_scale, teacher_logit_softcap, teacher_logit_scale)
    lead = tuple(student_hidden.shape[:-1])
    counted = counted_tokens(lead, labels, mask, ignore_index)
    if counted is not None:
        zero = torch.zeros((), dtype=div.dtype, device=div.device)
        div, entropy = torch.where(counted, div, zero), torch.where(counted, entropy, zero)
    lead_size = lead[0] if lead else 1
    loss = reduce_distill(div, counted, reduction, num_items_in_batch, lead_size, student_weight.shape[0])
    return (loss, entropy) if return_entropy else loss


def sampled_distill_loss(student_logp, teacher_logp, mask=None, *, estimator: str = "reinforce",
                         reduction: str = "batchmean", num_items_in_batch=None):
    """On-policy distillation on the sampled tokens only, from the per-token log-probs of the sampled
    token under the student (differentiable) and the teacher (constant). With δ = logp_s − logp_t:
        ``"reinforce"``  l = sg(δ)·logp_s: its gradient sg(δ)·∇logp_s is the score-function estimate of
                         ∇KL(p‖q) on student samples (TRL's SDPO/SDFT ``sampled_token`` mode);
        ``"k1"`` δ, ``"abs"`` |δ|, ``"k2"`` δ²/2, ``"k3"`` clamp(e^{−δ'} + δ' − 1, ±10) with δ' = clamp(δ, ±20)
                         (verl's ``kl_penalty`` estimators of its distillation losses).
    Reduced as :func:`linear_distill_loss` (``"mean"`` is the token mean here: no vocabulary)."""
    dt = accumulation_dtype(student_logp.dtype)
    x = student_logp.to(dt)
    delta = x - teacher_logp.detach().to(dt)
    if estimator == "reinforce":
        per_token = delta.detach() * x
    elif estimator == "k1":
        per_token = delta
    elif estimator == "abs":
        per_token = delta.abs()
    elif estimator == "k2":
        per_token = 0.5 * delta.square()
    else:  # "k3"
        d = torch.clamp(-delta, -20.0, 20.0)
        per_token = torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)
    counted = None if mask is None else mask != 0
    if counted is not None:
        per_token = torch.where(counted, per_token, torch.zeros((), dtype=dt, device=per_token.device))
    lead_size = student_logp.shape[0] if student_logp.dim() else 1
    return reduce_distill(per_token, counted, reduction, num_items_in_batch, lead_size, 1)
