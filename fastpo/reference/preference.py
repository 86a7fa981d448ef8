"""Reference preference optimisation: per-sequence log-probs and the DPO family of losses.

The spec of ``fastpo.sequence_logprobs``, ``dpo_loss``, ``simpo_loss``, ``orpo_loss`` and
``kto_loss``. The losses act on one value per pair (or sample) and are small composites of
numerically stable torch ops (log-sigmoid, ``log1p``/``expm1`` forms): the public functions validate
their arguments and run these same functions, which trace under ``torch.compile``.

Conventions shared by the losses: inputs of any floating dtype, computed in float32 (float64 when an
input is float64); reference log-probs are constants (detached); the loss is the mean over pairs
(0 for an empty batch, not NaN); metrics are detached scalars computed in the same pass.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from fastpo._layout import accumulation_dtype
from fastpo.loss_output import LossOutput

__all__ = ["sequence_logprobs", "dpo_loss", "simpo_loss", "orpo_loss", "kto_loss", "DPO_LOSS_TYPES"]

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def sequence_logprobs(token_logp: torch.Tensor, mask: Optional[torch.Tensor] = None,
                      cu_seqlens: Optional[torch.Tensor] = None, average: bool = False) -> torch.Tensor:
    """Per-sequence masked sum (or mean) of token log-probs: ``[B]`` float32 (float64 for float64).

    ``seq_i = Σ_{t ∈ i, mask_t ≠ 0} logp_t``; with ``average`` it is divided by the number of counted
    tokens ``n_i`` (an empty sequence gives 0). Masked tokens are ignored whatever their value.
    Padded: ``token_logp [B, T]``; packed: ``token_logp [N]`` with ``cu_seqlens [B+1]``.
    """
    x = token_logp.to(accumulation_dtype(token_logp.dtype))
    counted = torch.ones_like(x, dtype=torch.bool) if mask is None else mask != 0
    x = torch.where(counted, x, torch.zeros_like(x))
    if cu_seqlens is None:
        sums, counts = x.sum(-1), counted.sum(-1)
    else:
        bounds = cu_seqlens.tolist()
        pieces = [(x[a:b].sum(), counted[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
        sums = torch.stack([s for s, _ in pieces]) if pieces else x[:0]
        counts = torch.stack([n for _, n in pieces]) if pieces else counted[:0]
    if average:
        sums = sums / counts.clamp(min=1).to(x.dtype)
    return sums


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    dtypes = [accumulation_dtype(t.dtype) for t in tensors if t is not None]
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over all elements; 0 (not NaN) for an empty tensor."""
    return x.sum() / max(x.numel(), 1)


def _masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, x, torch.zeros_like(x)).sum() / keep.sum().clamp(min=1).to(x.dtype)


def _pair_metrics(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> dict:
    """Implicit-reward metrics of a paired loss: means of the rewards, accuracy and margin (detached)."""
    rc, rr = reward_chosen.detach(), reward_rejected.detach()
    return {
        "reward_chosen": _mean(rc),
        "reward_rejected": _mean(rr),
        "reward_accuracy": _mean((rc > rr).to(rc.dtype)),
        "reward_margin": _mean(rc - rr),
    }


def dpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor,
             ref_chosen_logp: Optional[torch.Tensor] = None, ref_rejected_logp: Optional[torch.Tensor] = None,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> LossOutput:
    """DPO and its variants, averaged over pairs.

    With x = (chosen − ref_chosen) − (rejected − ref_rejected) (reference-free: refs are 0), z = βx, ε
    the label smoothing::

        sigmoid = −(1−ε)·logσ(z) − ε·logσ(−z)             (DPO; cDPO for ε > 0)
        robust  = ((1−ε)·(−logσ(z)) + ε·logσ(−z)) / (1−2ε)
        hinge   = relu(1 − z)                             (SLiC)
        ipo     = (x − 1/(2β))²                           (IPO: pass length-averaged log-probs)

    Implicit rewards: β·(chosen − ref_chosen) and β·(rejected − ref_rejected).
    """
    dtype = _compute_dtype(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    chosen, rejected = chosen_logp.to(dtype), rejected_logp.to(dtype)
    if ref_chosen_logp is not None:
        chosen = chosen - ref_chosen_logp.detach().to(dtype)
    if ref_rejected_logp is not None:
        rejected = rejected - ref_rejected_logp.detach().to(dtype)
    x = chosen - rejected
    z = beta * x
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "robust":
        losses = ((1 - eps) * -F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    elif loss_type == "ipo":
        losses = (x - 1 / (2 * beta)).square()
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    return LossOutput(_mean(losses), _pair_metrics(beta * chosen, beta * rejected))


def simpo_loss(chosen_avg_logp: torch.Tensor, rejected_avg_logp: torch.Tensor,
               beta: float = 2.0, gamma: float = 1.0) -> LossOutput:
    """SimPO: mean of −logσ(β·(c − r) − γ) over pairs of length-averaged log-probs (no reference).

    Implicit rewards: β·c and β·r.
    """
    dtype = _compute_dtype(chosen_avg_logp, rejected_avg_logp)
    chosen, rejected = chosen_avg_logp.to(dtype), rejected_avg_logp.to(dtype)
    losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return LossOutput(_mean(losses), _pair_metrics(beta * chosen, beta * rejected))


def log_odds(logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 − p)) = logp − log(1 − e^logp), stable from logp = −1e4 up to 0.

    log(1 − e^x) is ``log(−expm1(x))`` for x > −ln 2 and ``log1p(−exp(x))`` below (each accurate on
    its side). logp is clamped to ≤ −eps(dtype) first: a probability of 1 has infinite odds (logp
    values above the clamp get no gradient).
    """
    x = logp.clamp(max=-torch.finfo(logp.dtype).eps)
    log1mexp = torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return x - log1mexp


def orpo_loss(chosen_avg_logp: torch.Tensor, rejected_avg_logp: torch.Tensor, beta: float = 0.1) -> LossOutput:
    """ORPO's odds-ratio term: mean of −β·logσ(log odds(c) − log odds(r)) (add it to your SFT loss).

    β is the paper's λ, applied outside the log-sigmoid as in TRL's ORPOTrainer. Inputs are
    length-averaged log-probs. Metrics add ``log_odds_ratio`` (mean logσ(·)) and ``log_odds_chosen``
    (mean log odds(c) − log odds(r)); implicit rewards are β·c and β·r.
    """
    dtype = _compute_dtype(chosen_avg_logp, rejected_avg_logp)
    chosen, rejected = chosen_avg_logp.to(dtype), rejected_avg_logp.to(dtype)
    odds = log_odds(chosen) - log_odds(rejected)
    log_ratio = F.logsigmoid(odds)
    metrics = _pair_metrics(beta * chosen, beta * rejected)
    metrics["log_odds_ratio"] = _mean(log_ratio.detach())
    metrics["log_odds_chosen"] = _mean(odds.detach())
    return LossOutput(_mean(-beta * log_ratio), metrics)


def kto_loss(logp: torch.Tensor, ref_logp: torch.Tensor, desirable: torch.Tensor, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             kl_ref_point: Union[None, float, torch.Tensor] = None) -> LossOutput:
    """KTO on unpaired samples: mean over the batch of the per-sample loss

        desirable:    w_d·(1 − σ(β·(ℓ − z0))) = w_d·σ(β·(z0 − ℓ))
        undesirable:  w_u·(1 − σ(β·(z0 − ℓ))) = w_u·σ(β·(ℓ − z0))

    with ℓ = logp − ref_logp and z0 = max(kl_ref_point, 0), detached (None: 0). Metrics: mean
    rewards β·ℓ of the desirable (``reward_chosen``) and undesirable (``reward_rejected``) samples
    (0 when there are none), their difference (``reward_margin``), the fraction of samples whose
    β·(ℓ − z0) has the sign of their label (``reward_accuracy``) and z0 (``kl_ref_point``).
    """
    dtype = _compute_dtype(logp, ref_logp)
    ratio = logp.to(dtype) - ref_logp.detach().to(dtype)
    if kl_ref_point is None:
        z0 = torch.zeros((), dtype=dtype, device=ratio.device)
    else:
        z0 = torch.as_tensor(kl_ref_point, dtype=dtype, device=ratio.device).detach().reshape(()).clamp(min=0)
    good = desirable != 0
    shifted = beta * (ratio - z0)
    losses = torch.where(good, desirable_weight * torch.sigmoid(-shifted),
                         undesirable_weight * torch.sigmoid(shifted))
    rewards = (beta * ratio).detach()
    reward_chosen, reward_rejected = _masked_mean(rewards, good), _masked_mean(rewards, ~good)
    shifted = shifted.detach()
    right = torch.where(good, shifted > 0, shifted < 0)
    metrics = {
        "reward_chosen": reward_chosen,
        "reward_rejected": reward_rejected,
        "reward_accuracy": _mean(right.to(dtype)),
        "reward_margin": reward_chosen - reward_rejected,
        "kl_ref_point": z0,
    }
    return LossOutput(_mean(losses), metrics)
