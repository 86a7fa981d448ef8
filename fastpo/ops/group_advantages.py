"""``fastpo.group_advantages`` and ``fastpo.process_advantages``: group-relative advantages as
vectorised segment reductions (no Python loop over groups, no host sync, no data-dependent shape).

The statistics are :mod:`fastpo.ops.group_stats`: dense group indices by a stable sort, ``index_add``
segment sums into B bins, two passes (mean, then centred squares). Token rewards ``[B, T]`` are summed
per sequence by ``fastpo.sequence_logprobs`` (the C++/torch CPU path or the Triton segment kernel),
which never reads a masked value. Everything else is a plain composition of torch ops, so the public
functions trace under ``torch.compile(dynamic=True, fullgraph=True)`` with ``eps`` a symbolic float (no
recompile when it changes); the one data-dependent check (the range of ``step_ends``) is a
``torch.library`` custom op. No gradient flows: advantages are targets, computed from detached scores.

NaN semantics (TRL 1.16's ``GRPOTrainer``): a NaN score means "this reward does not apply to this
sample". It is left out of every group and batch statistic, and its own advantage is 0; a group with
fewer than two scored members gives 0 (an all-NaN group too). A NaN at a masked position is ignored
entirely. ±inf counted scores are not rewards: they propagate (their group's advantages are NaN).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastpo import _validation as check
from fastpo import reference
from fastpo._backend import select_backend
from fastpo._layout import accumulation_dtype
from fastpo._validation import shape_of
from fastpo.ops.group_stats import dense_groups, group_moments, group_sum, masked_std, safe_div
from fastpo.ops.whiten import check_eps, weighted_whiten
from fastpo.reference.advantages import GROUP_METHODS

__all__ = ["group_advantages", "process_advantages", "sequence_scores", "sequence_advantages", "check_grouping"]

# Methods that need the response length of each sequence (token rewards with a mask).
_NEEDS_LENGTHS = ("opo",)


# --------------------------------------------------------------------------------------------
# Per-method advantages of per-sequence scores (shared with fastpo.integrations.verl_advantages)
# --------------------------------------------------------------------------------------------


def _passk(x, valid, g, count):
    """(r_max − r_2nd at the unique best member of each group, 0 elsewhere)."""
    neg_inf = torch.full_like(x, float("-inf"))
    gmax = neg_inf.scatter_reduce(0, g, torch.where(valid, x, neg_inf), "amax")[g]
    is_max = valid & (x == gmax)
    nmax = group_sum(is_max.to(x.dtype), g)
    second = neg_inf.scatter_reduce(0, g, torch.where(valid & ~is_max, x, neg_inf), "amax")[g]
    unique = is_max & (nmax == 1.0) & (count >= 2.0)
    return torch.where(unique, gmax - torch.where(unique, second, gmax), torch.zeros_like(x))


def sequence_advantages(s: torch.Tensor, g: Optional[torch.Tensor], method: str, eps, *,
                        lengths: Optional[torch.Tensor] = None, baseline: Optional[torch.Tensor] = None,
                        singleton_raw: bool = False) -> torch.Tensor:
    """Advantages ``[B]`` of per-sequence scores ``s [B]`` (float32/float64, NaN = not scored).

    ``lengths [B]``: counted tokens per sequence (REINFORCE++ whitens over tokens, OPO weights by
    length), None = 1 each. ``singleton_raw``: verl's convention for a group of one (mean 0, std 1),
    instead of fastpo's (advantage 0).
    """
    valid = ~torch.isnan(s)
    if method == "remax":
        ok = valid & ~torch.isnan(baseline)
        return torch.where(ok, s - torch.where(ok, baseline, torch.zeros_like(baseline)), torch.zeros_like(s))
    mo = group_moments(s, valid, g, singleton_raw=singleton_raw)
    count, centred = mo.count, mo.centred
    if method == "grpo":
        adv = safe_div(centred, mo.var.sqrt() + eps)
    elif method in ("dr_grpo", "reinforce_pp"):
        adv = centred
    elif method == "grpo_batch_std":
        adv = safe_div(centred, (masked_std(s, valid) + eps).expand_as(centred))
    elif method == "rloo":
        adv = centred * count / (count - 1.0).clamp(min=1.0)
    elif method == "opo":  # s − Σ_g |y|·s / Σ_g |y|
        w = torch.where(valid, lengths, torch.zeros_like(lengths))
        bsl = safe_div(group_sum(w * mo.x, g), group_sum(w, g))
        if singleton_raw:
            bsl = torch.where(count == 1.0, torch.zeros_like(bsl), bsl)
        adv = torch.where(valid, mo.x - bsl, torch.zeros_like(s))
    elif method == "gpg":  # α·(s − mean_g), α = (scored sequences) / (scored sequences with s ≠ 0)
        nonzero = (valid & (mo.x != 0)).to(s.dtype).sum()
        adv = centred * valid.to(s.dtype).sum() / nonzero.clamp(min=1.0)
    elif method in ("grpo_passk", "dr_grpo_passk"):
        adv = _passk(mo.x, valid, g, count)
        if method == "grpo_passk":
            adv = safe_div(adv, mo.var.sqrt() + eps)
    else:
        raise ValueError(f"method must be one of {GROUP_METHODS}, got {method!r}")
    keep = valid & ((count >= 1.0) if singleton_raw else (count > 1.0))
    adv = torch.where(keep, adv, torch.zeros_like(adv))
    if method == "reinforce_pp":
        w = torch.ones_like(s) if lengths is None else lengths
        adv = weighted_whiten(adv, torch.where(valid, w, torch.zeros_like(w)), 1e-8)
        adv = torch.where(keep, adv, torch.zeros_like(adv))
    return adv


def sequence_scores(scores: torch.Tensor, mask: Optional[torch.Tensor]):
    """(s [B] in the accumulation dtype, counted tokens [B] or None, mask as bool [B, T] or None).

    ``[B]`` scores are upcast; ``[B, T]`` token rewards are summed over the counted tokens by
    ``fastpo.sequence_logprobs`` (masked values are never read).
    """
    from fastpo.ops.sequence_logprobs import sequence_logprobs

    dtype = accumulation_dtype(scores.dtype)
    if scores.dim() == 1:
        return scores.detach().to(dtype), None, None
    m = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.detach() != 0
    s = sequence_logprobs(scores.detach(), m).to(dtype)
    return s, m.sum(-1).to(dtype), m


def check_grouping(batch: int, group_size, group_ids, device, *, required: bool):
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


def _check_token_mask(scores, mask):
    if mask is None:
        return
    if scores.dim() != 2:
        raise ValueError(f"mask is only accepted with [B, T] token rewards, got scores {shape_of(scores)}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(scores.shape):
        raise ValueError(f"mask must have the shape of scores, got mask {shape_of(mask)} and scores {shape_of(scores)}")
    check.check_same_device(scores=scores, mask=mask)


# --------------------------------------------------------------------------------------------
# group_advantages
# --------------------------------------------------------------------------------------------


def group_advantages(scores: torch.Tensor, mask: Optional[torch.Tensor] = None, *, group_size: Optional[int] = None,
                     group_ids: Optional[torch.Tensor] = None, method: str = "grpo", eps: float = 1e-6,
                     baseline: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Group-relative outcome advantages: GRPO, Dr.GRPO, RLOO, REINFORCE++, ReMax, OPO, GPG, pass@k.

    ``scores [B]`` (one outcome reward per sequence) or token rewards ``[B, T]`` with an optional
    ``mask [B, T]``, summed over the counted tokens first (a masked value, NaN or ±inf included, is
    never read). Groups are contiguous runs of ``group_size`` (which must divide B) or arbitrary
    integer ``group_ids [B]`` (unsorted, uneven sizes); pass exactly one. With s the sequence score,
    per group g (Bessel-corrected std)::

        grpo            (s − mean_g) / (std_g + eps)
        dr_grpo         s − mean_g
        grpo_batch_std  (s − mean_g) / (std_batch + eps)
        rloo            s − mean of the other members  = n_g/(n_g − 1)·(s − mean_g)
        reinforce_pp    s − mean_g, then whitened over the batch (eps 1e-8; for [B, T] input over the
                        counted tokens, i.e. each sequence weighted by its length): verl's
                        reinforce_plus_plus_baseline
        remax           s − baseline     (``baseline [B]``, e.g. the greedy response's reward; groups
                                           optional and unused)
        opo             s − Σ_g |y|·s / Σ_g |y|      (|y| = counted tokens; needs [B, T] input)
        gpg             α·(s − mean_g),  α = #scored / #(scored with s ≠ 0) over the batch (f_norm 1)
        grpo_passk      the unique best member of a group gets (s_max − s_2nd)/(std_g + eps), every
                        other member 0 (a tie for the best gives 0 to all)
        dr_grpo_passk   the same without the std: s_max − s_2nd

    A group of one gets 0; a zero-variance group gets 0 (never NaN). NaN scores follow TRL: a NaN
    (counted) score means "this reward does not apply": that sequence gets 0 and is left out of its
    group's and the batch's statistics; a group with fewer than two scored members gives 0. A NaN at
    a counted token makes its sequence's score NaN. ±inf counted scores propagate.

    Returns float32 (float64 for float64 scores): ``[B]`` for ``[B]`` scores, and for ``[B, T]``
    token rewards the sequence advantage broadcast over the counted tokens, ``[B, T]`` (0 where
    masked), as verl returns it. No gradient flows (the scores are detached).
    """
    check.check_float_tensor(scores, "scores")
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must be [B] (sequence scores) or [B, T] (token rewards), got shape {shape_of(scores)}")
    if not isinstance(method, str) or method not in GROUP_METHODS:
        raise ValueError(f"method must be one of {GROUP_METHODS}, got {method!r}")
    eps = check_eps(eps)
    _check_token_mask(scores, mask)
    if method in _NEEDS_LENGTHS and scores.dim() != 2:
        raise ValueError(f"method={method!r} weights by response length: pass token rewards [B, T] (with their "
                         f"mask), got scores {shape_of(scores)}")
    batch = scores.shape[0]
    check_grouping(batch, group_size, group_ids, scores.device, required=method != "remax")
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
    s, lengths, m = sequence_scores(scores, mask)
    g = None if method == "remax" else dense_groups(batch, group_ids, group_size, s.device)
    adv = sequence_advantages(s, g, method, eps, lengths=lengths,
                              baseline=None if baseline is None else baseline.detach().to(s.dtype))
    return adv if m is None else torch.where(m, adv[:, None], torch.zeros((), dtype=adv.dtype, device=adv.device))


# --------------------------------------------------------------------------------------------
# process_advantages
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastpo::process_step_ends", mutates_args=())
def _process_step_ends(step_ends: torch.Tensor, step_mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The int64 step ends with masked steps set to 0, after checking counted ends lie in [0, num_tokens)."""
    ends = torch.where(step_mask, step_ends.to(torch.int64), torch.zeros((), dtype=torch.int64))
    bad = step_mask & ((step_ends < 0) | (step_ends >= num_tokens))
    if bool(bad.any()):
        raise ValueError(f"step_ends of counted steps must lie in [0, num_tokens={num_tokens}), found "
                         f"{step_ends[bad][0].item()} in step_ends of shape {shape_of(step_ends)}")
    return ends


@_process_step_ends.register_fake
def _(step_ends, step_mask, num_tokens):
    return torch.empty_like(step_ends, dtype=torch.int64)


def process_advantages(step_rewards: torch.Tensor, step_ends: torch.Tensor, step_mask: torch.Tensor, *,
                       group_size: Optional[int] = None, group_ids: Optional[torch.Tensor] = None, num_tokens: int,
                       eps: float = 1e-6) -> torch.Tensor:
    """Process-supervision advantages (DeepSeekMath): per-step rewards → per-token advantages.

    ``step_rewards [B, S]`` holds the reward of step j of sequence i, ``step_ends [B, S]`` (integer) the
    index of the token where that step ends, ``step_mask [B, S]`` which steps exist (non-zero =
    counted). All counted step rewards of a group (every step of every member) are normalised together,
    r̃ = (r − mean_g)/(std_g + eps) (Bessel, as grpo; a group with fewer than two counted steps gives 0).
    Token t of sequence i gets Σ r̃_{i,j} over the counted steps with ``step_ends[i, j] ≥ t``, so tokens
    after the last step end get 0. A masked step is ignored whatever its reward and end hold (NaN,
    ±inf, out of range); a NaN counted step reward means "not scored" (TRL's semantics): it is left out
    of the group statistics and contributes 0. Returns ``[B, num_tokens]`` float32 (float64 for float64
    rewards); multiply by your response mask as needed. Counted step ends must lie in ``[0, num_tokens)``.
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
    check_grouping(step_rewards.shape[0], group_size, group_ids, step_rewards.device, required=True)

    if select_backend(step_rewards) == "reference":
        counted = step_mask != 0
        if bool((counted & ((step_ends < 0) | (step_ends >= num_tokens))).any()):
            raise ValueError(f"step_ends of counted steps must lie in [0, num_tokens={num_tokens})")
        return reference.process_advantages(step_rewards, step_ends, step_mask, group_size=group_size,
                                            group_ids=group_ids, num_tokens=num_tokens, eps=eps)
    batch, steps = step_rewards.shape
    counted = step_mask.detach() != 0
    ends = _process_step_ends(step_ends.detach(), counted, num_tokens)
    r = step_rewards.detach().to(accumulation_dtype(step_rewards.dtype))
    valid = (counted & ~torch.isnan(r)).reshape(-1)
    g = dense_groups(batch, group_ids, group_size, r.device).repeat_interleave(steps)
    mo = group_moments(r.reshape(-1), valid, g)
    normalised = torch.where(mo.count >= 2.0, safe_div(mo.centred, mo.var.sqrt() + eps), torch.zeros_like(mo.centred))
    at_end = r.new_zeros(batch, num_tokens).scatter_add(1, ends, normalised.reshape(batch, steps))
    # Token t collects every step ending at or after t: a reverse cumulative sum over tokens.
    return at_end.flip(1).cumsum(1).flip(1)
