"""``fastpo.multi_reward_advantages``: several rewards per sequence, balanced before or after the sum.

TRL 1.16's ``scale_rewards`` (group / batch / none) and ``multi_objective_aggregation``
(sum_then_normalize / normalize_then_sum, ``GRPOTrainer._generate_and_score_completions``), and verl
0.9.1's ``gdpo`` (``compute_gdpo_outcome_advantage``). A composition of the segment statistics of
:mod:`fastpo.ops.group_stats`: the K per-reward normalisations run as one pass over ``B·K`` elements
(group ``g·K + k``), so there is no loop over rewards or groups and no host sync.
"""

from __future__ import annotations

from numbers import Real
from typing import Optional, Sequence, Union

import torch

from fastpo import _validation as check
from fastpo import reference
from fastpo._backend import select_backend
from fastpo._layout import accumulation_dtype
from fastpo._validation import shape_of
from fastpo.ops.group_advantages import check_grouping, sequence_advantages
from fastpo.ops.group_stats import dense_groups, masked_std, safe_div
from fastpo.ops.whiten import check_eps, weighted_whiten

__all__ = ["multi_reward_advantages", "multi_reward_core", "AGGREGATIONS", "SCALE_REWARDS"]

AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum", "gdpo")
SCALE_REWARDS = ("group", "batch", "none")
_SUM_METHOD = {"group": "grpo", "batch": "grpo_batch_std", "none": "dr_grpo"}


def _per_reward(s: torch.Tensor, g: torch.Tensor, method: str, eps, singleton_raw: bool) -> torch.Tensor:
    """[B, K] group-normalised rewards, each reward k in its own groups (g·K + k)."""
    batch, k = s.shape
    gk = (g[:, None] * k + torch.arange(k, device=s.device)).reshape(-1)
    return sequence_advantages(s.reshape(-1), gk, method, eps, singleton_raw=singleton_raw).reshape(batch, k)


def multi_reward_core(s: torch.Tensor, w: torch.Tensor, g: torch.Tensor, lengths: Optional[torch.Tensor],
                      aggregation: str, scale_rewards: str, eps, *, singleton_raw: bool = False) -> torch.Tensor:
    """Advantages [B] of rewards ``s [B, K]`` (NaN = does not apply) with weights ``w [K]``."""
    unscorable = torch.isnan(s).all(1)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    nan = torch.full((), float("nan"), dtype=s.dtype, device=s.device)
    if aggregation == "sum_then_normalize":
        total = torch.where(torch.isnan(s), zero, s * w).sum(1)
        return sequence_advantages(torch.where(unscorable, nan, total), g, _SUM_METHOD[scale_rewards], eps)
    method = "grpo" if scale_rewards == "group" else "dr_grpo"
    total = (_per_reward(s, g, method, eps, singleton_raw) * w).sum(1)
    scored = ~unscorable
    if aggregation == "normalize_then_sum":  # TRL: (r − mean) / (std + eps) over the scored sequences
        mean = torch.where(scored, total, zero).sum() / scored.to(s.dtype).sum().clamp(min=1.0)
        adv = safe_div(total - mean, (masked_std(total, scored) + eps).expand_as(total))
    else:  # gdpo (verl): masked_whiten over the counted tokens, i.e. each sequence weighted by its length
        weights = torch.ones_like(total) if lengths is None else lengths
        adv = weighted_whiten(total, torch.where(scored, weights, zero), 1e-8)
    return torch.where(scored, adv, zero)


def _check_options(aggregation, scale_rewards):
    if not isinstance(aggregation, str) or aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if not isinstance(scale_rewards, str) or scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if aggregation == "normalize_then_sum" and scale_rewards != "group":
        raise ValueError("aggregation='normalize_then_sum' normalises each reward by its group std and the sum by "
                         f"the batch std (TRL ignores scale_rewards there): pass scale_rewards='group', got "
                         f"{scale_rewards!r}")
    if aggregation == "gdpo" and scale_rewards == "batch":
        raise ValueError("aggregation='gdpo' takes scale_rewards='group' (GRPO per reward) or 'none' (Dr.GRPO per "
                         "reward), got 'batch'")


def _weights(reward_weights, k: int, like: torch.Tensor) -> torch.Tensor:
    if reward_weights is None:
        return torch.ones(k, dtype=like.dtype, device=like.device)
    if isinstance(reward_weights, torch.Tensor):
        check.check_float_tensor(reward_weights, "reward_weights")
        w = reward_weights
    else:
        if not all(isinstance(v, Real) and not isinstance(v, bool) for v in reward_weights):
            raise TypeError(f"reward_weights must be a float tensor or a sequence of numbers, got {reward_weights!r}")
        w = torch.tensor([float(v) for v in reward_weights])
    if tuple(w.shape) != (k,):
        raise ValueError(f"reward_weights must have shape (K,) = ({k},) for scores [B, K], got {shape_of(w)}")
    return w.detach().to(device=like.device, dtype=like.dtype)


def multi_reward_advantages(scores: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                            reward_weights: Optional[Union[torch.Tensor, Sequence[float]]] = None,
                            group_size: Optional[int] = None, group_ids: Optional[torch.Tensor] = None,
                            aggregation: str = "sum_then_normalize", scale_rewards: str = "group",
                            eps: Optional[float] = None) -> torch.Tensor:
    """Advantages of K rewards per sequence, ``scores [B, K]`` (or ``[B]``: K = 1) with ``reward_weights [K]``.

    With w the weights, groups g as in :func:`fastpo.group_advantages` (``group_size`` or ``group_ids``)
    and std Bessel-corrected::

        sum_then_normalize   r = Σ_k w_k·s_k, then  scale_rewards='group': (r − mean_g)/(std_g + eps)
                                                     'batch': (r − mean_g)/(std_batch + eps); 'none': r − mean_g
        normalize_then_sum   a_k = (s_k − mean_g,k)/(std_g,k + eps);  r = Σ_k w_k·a_k;
                             A = (r − mean_batch(r))/(std_batch(r) + eps)              (TRL)
        gdpo                 a_k as above (scale_rewards='none': s_k − mean_g,k);  r = Σ_k w_k·a_k;
                             A = whiten(r) over the counted tokens of ``mask`` (eps 1e-8)  (verl)

    ``eps`` defaults to TRL's 1e-4 (verl's 1e-6 for gdpo). NaN follows TRL: a NaN reward does not apply
    to that sequence (it drops out of that reward's statistics and of the sum); a sequence whose every
    reward is NaN is unscorable: advantage 0 and left out of the batch statistics. A group with fewer
    than two scored members gives 0 for that reward (fastpo's group-of-one rule; TRL agrees for groups
    of one). ``mask [B, T]`` (optional) weights gdpo's whitening by response length and broadcasts the
    result over the counted tokens, ``[B, T]``; without it the result is ``[B]``. float32 (float64 for
    float64 scores); no gradient.
    """
    check.check_float_tensor(scores, "scores")
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must be [B] or [B, K] (K rewards per sequence), got shape {shape_of(scores)}")
    _check_options(aggregation, scale_rewards)
    eps = (1e-6 if aggregation == "gdpo" else 1e-4) if eps is None else check_eps(eps)
    batch = scores.shape[0]
    s = scores.detach().to(accumulation_dtype(scores.dtype))
    s = s[:, None] if s.dim() == 1 else s
    w = _weights(reward_weights, s.shape[1], s)
    m = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dim() != 2 or mask.shape[0] != batch:
            raise ValueError(f"mask must be [B, T] with B = {batch} (the response mask), got {shape_of(mask)}")
        check.check_same_device(scores=scores, mask=mask)
        m = mask.detach() != 0
    check_grouping(batch, group_size, group_ids, scores.device, required=True)
    if select_backend(scores) == "reference":
        return reference.multi_reward_advantages(scores, mask, reward_weights=w, group_size=group_size,
                                                 group_ids=group_ids, aggregation=aggregation,
                                                 scale_rewards=scale_rewards, eps=eps)
    g = dense_groups(batch, group_ids, group_size, s.device)
    lengths = None if m is None else m.sum(-1).to(s.dtype)
    adv = multi_reward_core(s, w, g, lengths, aggregation, scale_rewards, eps)
    return adv if m is None else torch.where(m, adv[:, None], torch.zeros((), dtype=adv.dtype, device=adv.device))
