"""Reference preference optimisation: per-sequence log-probs and the DPO family of losses.

The spec of ``fastpo.sequence_logprobs``, ``simpo_loss``, ``orpo_loss``, ``kto_loss``, ``cpo_loss``
and ``nll_loss`` (``dpo_loss`` is in ``fastpo.reference.dpo``). The losses act on one value per
pair (or sample) and are small composites of numerically stable torch ops (log-sigmoid,
``log1p``/``expm1`` forms): the public functions validate their arguments and run these same
functions, which trace under ``torch.compile``.

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

__all__ = ["sequence_logprobs", "simpo_loss", "orpo_loss", "kto_loss", "cpo_loss", "nll_loss", "kto_kl_ref_point",
           "KTO_LOSS_TYPES", "CPO_LOSS_TYPES"]

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


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
    """Mean over all elements; 0 (not NaN) for an empty tensor (no guard on a symbolic size)."""
    return x.sum() / torch.sym_max(x.numel(), 1)


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


def kto_loss(logp: torch.Tensor, ref_logp: torch.Tensor, desirable: torch.Tensor, beta=0.1,
             desirable_weight=1.0, undesirable_weight=1.0,
             kl_ref_point: Union[None, float, torch.Tensor] = None, loss_type: str = "kto") -> LossOutput:
    """KTO on unpaired samples: the batch mean of the per-sample loss, with ℓ = logp − ref_logp

        kto                desirable: w_d·(1 − σ(β·(ℓ − z0)))    undesirable: w_u·(1 − σ(β·(z0 − ℓ)))
        apo_zero_unpaired  desirable: w_d·(1 − σ(β·ℓ))           undesirable: w_u·σ(β·ℓ)

    z0 = max(kl_ref_point, 0), detached (None: 0; apo_zero_unpaired has no reference point). Metrics:
    mean rewards β·ℓ and log-probs of the desirable (``reward_chosen``, ``logps_chosen``) and
    undesirable (``reward_rejected``, ``logps_rejected``) samples (0 when there are none), their
    difference (``reward_margin``), the fraction of samples whose β·(ℓ − z0) has the sign of their
    label (``reward_accuracy``) and z0 (``kl_ref_point``, TRL's ``kl``).
    """
    dtype = _compute_dtype(logp, ref_logp)
    policy = logp.to(dtype)
    ratio = policy - ref_logp.detach().to(dtype)
    z0 = torch.zeros((), dtype=dtype, device=ratio.device)
    if kl_ref_point is not None:
        z0 = (z0 + (kl_ref_point.detach().to(dtype).reshape(()) if isinstance(kl_ref_point, torch.Tensor)
                    else kl_ref_point)).clamp(min=0)
    good = desirable != 0
    shifted = beta * (ratio - z0)
    if loss_type == "kto":
        losses = torch.where(good, desirable_weight * torch.sigmoid(-shifted),
                             undesirable_weight * torch.sigmoid(shifted))
    elif loss_type == "apo_zero_unpaired":
        losses = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * ratio)),
                             undesirable_weight * torch.sigmoid(beta * ratio))
    else:
        raise ValueError(f"loss_type must be one of {KTO_LOSS_TYPES}, got {loss_type!r}")
    rewards = (beta * ratio).detach()
    reward_chosen, reward_rejected = _masked_mean(rewards, good), _masked_mean(rewards, ~good)
    shifted = shifted.detach()
    right = torch.where(good, shifted > 0, shifted < 0)
    metrics = {
        "reward_chosen": reward_chosen,
        "reward_rejected": reward_rejected,
        "reward_accuracy": _mean(right.to(dtype)),
        "reward_margin": reward_chosen - reward_rejected,
        "logps_chosen": _masked_mean(policy.detach(), good),
        "logps_rejected": _masked_mean(policy.detach(), ~good),
        "kl_ref_point": z0,
    }
    return LossOutput(_mean(losses), metrics)


def kto_kl_ref_point(kl_logp: torch.Tensor, ref_kl_logp: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 as TRL estimates it: max(mean(kl_logp − ref_kl_logp), 0), detached.

    ``kl_logp`` / ``ref_kl_logp``: policy / reference sequence log-probs of mismatched (prompt,
    completion) pairs, the completions rotated by one within the batch: (x_1, y_n), (x_2, y_1), ...,
    (x_n, y_{n−1}). 0 for an empty batch. Under data parallelism TRL averages the per-rank means
    (``gather_for_metrics(kl).mean()``) before the clamp: all-reduce the mean yourself, then clamp.
    """
    dtype = _compute_dtype(kl_logp, ref_kl_logp)
    diff = kl_logp.detach().to(dtype) - ref_kl_logp.detach().to(dtype)
    return _mean(diff).clamp(min=0)


def nll_loss(token_logp: torch.Tensor, mask: Optional[torch.Tensor] = None,
             cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """−Σ counted logp / (number of counted tokens): the token-mean NLL over the whole batch, 0-d.

    The normalisation of TRL's NLL terms (DPO's ``sft`` loss type, hence RPO, and CPO's
    ``cpo_alpha`` term, a ``CrossEntropyLoss`` over the chosen tokens): one mean over every counted
    token of the batch, not a mean of per-sequence means. 0 when nothing is counted.
    """
    if token_logp.dim() == 1 and cu_seqlens is None:
        token_logp, mask = token_logp.unsqueeze(0), None if mask is None else mask.unsqueeze(0)
    seq = sequence_logprobs(token_logp, mask, cu_seqlens)
    return token_mean_nll(seq, token_logp, mask)


def token_mean_nll(seq: torch.Tensor, token_logp: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """−Σ seq / max(counted tokens, 1), from the per-sequence sums ``seq`` of ``token_logp``."""
    if mask is None:
        return -seq.sum() / torch.sym_max(token_logp.numel(), 1)
    return -seq.sum() / (mask != 0).sum().clamp(min=1).to(seq.dtype)


def alphapo_rewards(logp: torch.Tensor, alpha) -> torch.Tensor:
    """AlphaPO's reward shape (Gupta et al. 2025): (1 − p^(−α))/α = −expm1(−α·logp)/α, with p = e^logp.

    The exponent is clamped to ≤ 20 (fastpo's clamp of extreme log-ratios; TRL does not clamp), so
    logp = −1e4 gives a large finite reward. Call with α ≠ 0 (α = 0 is the log-prob itself).
    """
    return -torch.expm1((-alpha * logp).clamp(max=20.0)) / alpha


def cpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, beta=0.1, loss_type: str = "sigmoid",
             label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0, nll: Optional[torch.Tensor] = None,
             cpo_alpha=0.0) -> LossOutput:
    """CPO (Xu et al. 2024) and its SimPO / AlphaPO forms, as TRL's ``CPOTrainer``: no reference model.

    With u = c − r (or the AlphaPO rewards' difference when α ≠ 0)::

        sigmoid  −(1−ε)·logσ(βu) − ε·logσ(−βu)
        simpo    the same with u − γ/β (alphapo is simpo, with no NLL term)
        hinge    relu(1 − βu)
        ipo      (u − 1/(2β))²

    loss = mean(·) + cpo_alpha·nll. Rewards (metrics): β·logp, or β·AlphaPO reward.
    """
    dtype = _compute_dtype(chosen_logp, rejected_logp)
    chosen, rejected = chosen_logp.to(dtype), rejected_logp.to(dtype)
    if loss_type == "alphapo":
        loss_type = "simpo"
    if isinstance(alpha, (int, float)) and alpha == 0:
        reward_c, reward_r = chosen, rejected
    else:
        reward_c, reward_r = alphapo_rewards(chosen, alpha), alphapo_rewards(rejected, alpha)
    u = reward_c - reward_r
    if loss_type == "simpo":
        u = u - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * u) - label_smoothing * F.logsigmoid(-beta * u)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * u)
    elif loss_type == "ipo":
        losses = (u - 1 / (2 * beta)).square()
    else:
        raise ValueError(f"loss_type must be one of {CPO_LOSS_TYPES}, got {loss_type!r}")
    loss = _mean(losses)
    metrics = _pair_metrics(beta * reward_c, beta * reward_r)
    metrics["logps_chosen"] = _mean(chosen.detach())
    metrics["logps_rejected"] = _mean(rejected.detach())
    if nll is not None:
        nll = nll.to(dtype)
        loss = loss + cpo_alpha * nll
        metrics["nll_loss"] = nll.detach()
    return LossOutput(loss, metrics)
