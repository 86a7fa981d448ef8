"""``fastpo.group_advantages`` and ``fastpo.process_advantages``: group-relative advantages as
vectorised segment reductions (no Python loop over groups).

Groups are dense indices g(i) ∈ [0, G): ``i // group_size`` for contiguous runs, or the inverse of
``torch.unique(group_ids)`` for arbitrary (unsorted, uneven) ids. Per-group counts, means and
Bessel-corrected variances are ``index_add`` segment sums (two passes: mean, then centred squares).
The data-dependent parts (unique, range checks) live inside ``torch.library`` custom ops, so the
public functions trace under ``torch.compile(fullgraph=True)``. The ops have no autograd: advantages
are targets, computed from detached scores. One implementation serves CPU and CUDA tensors (a handful
of elementwise/segment kernels; there is no per-group launch to fuse away).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastpo import _validation as check
from fastpo import reference
from fastpo._backend import select_backend
from fastpo._layout import accumulation_dtype
from fastpo._validation import shape_of
from fastpo.ops.whiten import check_eps, weighted_whiten
from fastpo.reference.advantages import GROUP_METHODS

__all__ = ["group_advantages", "process_advantages"]


# --------------------------------------------------------------------------------------------
# Segment statistics
# --------------------------------------------------------------------------------------------


def _dense_groups(batch: int, group_ids: Optional[torch.Tensor], group_size: int, device) -> tuple:
    """(g [B] int64 in [0, G), G)."""
    if group_ids is None:
        return torch.arange(batch, device=device) // group_size, batch // group_size
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse.reshape(-1).to(torch.int64), uniq.numel()


def _segment_moments(x: torch.Tensor, g: torch.Tensor, num_groups: int, w: torch.Tensor):
    """Per element: (count of its group, x − group mean, Bessel-corrected group variance), weights w ∈ {0, 1}."""
    zeros = x.new_zeros(num_groups)
    count = zeros.index_add(0, g, w)
    mean = zeros.index_add(0, g, w * x) / count.clamp(min=1.0)
    centred = x - mean[g]
    var = zeros.index_add(0, g, w * centred.square()) / (count - 1.0).clamp(min=1.0)
    return count[g], centred, var[g]


def _scaled(centred: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """centred / denom, and 0 where denom is 0 (a flat group with eps = 0: 0/0)."""
    ok = denom > 0
    return torch.where(ok, centred / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(centred))


def _batch_std(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    if n < 2:
        return x.new_zeros(())
    return ((x - x.mean()).square().sum() / (n - 1)).sqrt()


# --------------------------------------------------------------------------------------------
# group_advantages
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastpo::group_advantages", mutates_args=())
def _group_advantages_op(
    scores: torch.Tensor, group_ids: Optional[torch.Tensor], group_size: int, weights: Optional[torch.Tensor],
    baseline: Optional[torch.Tensor], method: str, eps: float,
) -> torch.Tensor:
    """Advantages [B] of per-sequence scores [B] (float32/float64). ``weights`` [B]: the REINFORCE++
    whitening weight of each sequence (its counted tokens), None = 1."""
    if method == "remax":
        return scores - baseline
    g, num_groups = _dense_groups(scores.numel(), group_ids, group_size, scores.device)
    count, centred, var = _segment_moments(scores, g, num_groups, torch.ones_like(scores))
    if method == "grpo":
        adv = _scaled(centred, var.sqrt() + eps)
    elif method == "dr_grpo":
        adv = centred
    elif method == "grpo_batch_std":
        adv = _scaled(centred, (_batch_std(scores) + eps).expand_as(centred))
    elif method == "rloo":
        adv = centred * count / (count - 1.0).clamp(min=1.0)
    else:  # reinforce_pp
        w = torch.ones_like(scores) if weights is None else weights
        adv = weighted_whiten(centred, w, 1e-8)
    return torch.where(count > 1.0, adv, torch.zeros_like(adv))


@_group_advantages_op.register_fake
def _(scores, group_ids, group_size, weights, baseline, method, eps):
    return torch.empty_like(scores)


def _check_grouping(batch: int, group_size, group_ids, device, *, required: bool):
    """Exactly one of group_size / group_ids (or neither when not ``required``)."""
    if group_size is not None and group_ids is not None:
        raise ValueError("pass either group_size or group_ids, not both")
    if group_size is None and group_ids is None:
        if required:
            raise ValueError("one of group_size (contiguous groups) or group_ids (a group id per sequence) is required")
        return
    if group_size is not None:
        group_size = check.check_int(group_size, "group_size")
        if group_size < 1 or batch % group_size != 0:
            raise ValueError(f"group_size must be >= 1 and divide the batch size B={batch}, got {group_size}")
    else:
        check.check_int_tensor(group_ids, "group_ids")
        if tuple(group_ids.shape) != (batch,):
            raise ValueError(f"group_ids must have shape (B,) = ({batch},), got {shape_of(group_ids)}")
        if group_ids.device != device:
            raise ValueError(f"all tensors must be on one device, got group_ids on {group_ids.device} and "
                             f"scores on {device}")


def group_advantages(scores: torch.Tensor, mask: Optional[torch.Tensor] = None, *, group_size: Optional[int] = None,
                     group_ids: Optional[torch.Tensor] = None, method: str = "grpo", eps: float = 1e-6,
                     baseline: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Group-relative outcome advantages: GRPO, Dr.GRPO, GRPO with batch std, RLOO, REINFORCE++, ReMax.

    ``scores [B]`` (one outcome reward per sequence) or token rewards ``[B, T]`` with an optional
    ``mask [B, T]``, summed per sequence first. Groups are contiguous runs of ``group_size`` (which
    must divide B) or arbitrary integer ``group_ids [B]`` (unsorted, uneven sizes); pass exactly one.
    With s the sequence score, per group g (Bessel-corrected std)::

        grpo            (s − mean_g) / (std_g + eps)
        dr_grpo         s − mean_g
        grpo_batch_std  (s − mean_g) / (std_batch + eps)
        rloo            s − mean of the other members  = n_g/(n_g − 1)·(s − mean_g)
        reinforce_pp    s − mean_g, then whitened over the batch (eps 1e-8; for [B, T] input over the
                        counted tokens, i.e. each sequence weighted by its length, as verl)
        remax           s − baseline     (``baseline [B]``, e.g. the greedy response's reward; groups
                                           optional and unused)

    A group of one gets 0; a zero-variance group gets 0 (never NaN). Returns float32 (float64 for
    float64 scores): ``[B]`` for ``[B]`` scores, and for ``[B, T]`` token rewards the sequence
    advantage broadcast over the counted tokens, ``[B, T]`` (0 where masked), as verl returns it.
    No gradient flows (the scores are detached).
    """
    check.check_float_tensor(scores, "scores")
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must be [B] (sequence scores) or [B, T] (token rewards), got shape {shape_of(scores)}")
    if not isinstance(method, str) or method not in GROUP_METHODS:
        raise ValueError(f"method must be one of {GROUP_METHODS}, got {method!r}")
    eps = check_eps(eps)
    token_level = scores.dim() == 2
    batch = scores.shape[0]
    if mask is not None:
        if not token_level:
            raise ValueError(f"mask is only accepted with [B, T] token rewards, got scores {shape_of(scores)}")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(scores.shape):
            raise ValueError(f"mask must have the shape of scores, got mask {shape_of(mask)} and scores {shape_of(scores)}")
        check.check_same_device(scores=scores, mask=mask)
    _check_grouping(batch, group_size, group_ids, scores.device, required=method != "remax")
    if method == "remax":
        if baseline is None:
            raise ValueError("method='remax' needs baseline [B] (the reward of the greedy response)")
        check.check_float_tensor(baseline, "baseline")
        if tuple(baseline.shape) != (batch,):
            raise ValueError(f"baseline must have shape (B,) = ({batch},), got {shape_of(baseline)}")
        check.check_same_device(scores=scores, baseline=baseline)
    elif baseline is not None:
        raise ValueError(f"baseline is only used by method='remax', got it with method={method!r}")

    if select_backend(scores) == "reference":
        return reference.group_advantages(scores, mask, group_size=group_size, group_ids=group_ids, method=method,
                                          eps=eps, baseline=baseline)

    dtype = accumulation_dtype(scores.dtype)
    x = scores.detach().to(dtype)
    m = None
    if token_level:
        m = torch.ones_like(x) if mask is None else (mask.detach() != 0).to(dtype)
        x = (x * m).sum(-1)
    weights = m.sum(-1) if (token_level and method == "reinforce_pp") else None
    adv = _group_advantages_op(
        x, None if group_ids is None else group_ids.detach(), group_size or 0, weights,
        None if baseline is None else baseline.detach().to(dtype), method, eps)
    return adv[:, None] * m if token_level else adv


# --------------------------------------------------------------------------------------------
# process_advantages
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastpo::process_advantages", mutates_args=())
def _process_advantages_op(
    step_rewards: torch.Tensor, step_ends: torch.Tensor, step_mask: torch.Tensor, group_ids: Optional[torch.Tensor],
    group_size: int, num_tokens: int, eps: float,
) -> torch.Tensor:
    """[B, num_tokens] advantages from step rewards [B, S] (float32/float64), ends [B, S] int64, mask [B, S] bool."""
    batch, steps = step_rewards.shape
    ends = torch.where(step_mask, step_ends, torch.zeros_like(step_ends))
    if ends.numel() and bool(((ends < 0) | (ends >= num_tokens)).any()):
        bad = step_ends[step_mask & ((step_ends < 0) | (step_ends >= num_tokens))][0].item()
        raise ValueError(f"step_ends of counted steps must lie in [0, num_tokens={num_tokens}), found {bad} "
                         f"in step_ends of shape {shape_of(step_ends)}")
    g, num_groups = _dense_groups(batch, group_ids, group_size, step_rewards.device)
    w = step_mask.to(step_rewards.dtype).reshape(-1)
    count, centred, var = _segment_moments(step_rewards.reshape(-1), g.repeat_interleave(steps), num_groups, w)
    normalised = torch.where(count >= 2.0, _scaled(centred, var.sqrt() + eps), torch.zeros_like(centred)) * w
    at_end = step_rewards.new_zeros(batch, num_tokens).scatter_add_(1, ends, normalised.reshape(batch, steps))
    # Token t collects every step ending at or after t: a reverse cumulative sum over tokens.
    return at_end.flip(1).cumsum(1).flip(1)


@_process_advantages_op.register_fake
def _(step_rewards, step_ends, step_mask, group_ids, group_size, num_tokens, eps):
    return step_rewards.new_empty(step_rewards.shape[0], num_tokens)


def process_advantages(step_rewards: torch.Tensor, step_ends: torch.Tensor, step_mask: torch.Tensor, *,
                       group_size: Optional[int] = None, group_ids: Optional[torch.Tensor] = None, num_tokens: int,
                       eps: float = 1e-6) -> torch.Tensor:
    """Process-supervision advantages (DeepSeekMath): per-step rewards → per-token advantages.

    ``step_rewards [B, S]`` holds the reward of step j of sequence i, ``step_ends [B, S]`` (integer) the
    index of the token where that step ends, ``step_mask [B, S]`` which steps exist (non-zero =
    counted). All counted step rewards of a group (every step of every member) are normalised together,
    r̃ = (r − mean_g)/(std_g + eps) (Bessel, as grpo; a group with fewer than two counted steps gives 0).
    Token t of sequence i gets Σ r̃_{i,j} over the counted steps with ``step_ends[i, j] ≥ t``, so tokens
    after the last step end get 0. Returns ``[B, num_tokens]`` float32 (float64 for float64 rewards);
    multiply by your response mask as needed. Counted step ends must lie in ``[0, num_tokens)``.
    """
    check.check_float_tensor(step_rewards, "step_rewards")
    if step_rewards.dim() != 2:
        raise ValueError(f"step_rewards must be [B, S], got shape {shape_of(step_rewards)}")
    check.check_int_tensor(step_ends, "step_ends")
    for name, t in (("step_ends", step_ends), ("step_mask", step_mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(step_rewards.shape):
            raise ValueError(f"{name} must have the shape of step_rewards, got {name} {shape_of(t)} and "
                             f"step_rewards {shape_of(step_rewards)}")
    check.check_same_device(step_rewards=step_rewards, step_ends=step_ends, step_mask=step_mask)
    num_tokens = check.check_int(num_tokens, "num_tokens")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    eps = check_eps(eps)
    _check_grouping(step_rewards.shape[0], group_size, group_ids, step_rewards.device, required=True)

    if select_backend(step_rewards) == "reference":
        counted = step_mask != 0
        if bool((counted & ((step_ends < 0) | (step_ends >= num_tokens))).any()):
            raise ValueError(f"step_ends of counted steps must lie in [0, num_tokens={num_tokens})")
        return reference.process_advantages(step_rewards, step_ends, step_mask, group_size=group_size,
                                            group_ids=group_ids, num_tokens=num_tokens, eps=eps)
    dtype = accumulation_dtype(step_rewards.dtype)
    return _process_advantages_op(
        step_rewards.detach().to(dtype).contiguous(), step_ends.detach().to(torch.int64).contiguous(),
        (step_mask.detach() != 0).contiguous(), None if group_ids is None else group_ids.detach(),
        group_size or 0, num_tokens, eps)
