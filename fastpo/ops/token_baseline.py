"""``fastpo.optimal_token_baseline``: verl 0.9.1's Optimal Token Baseline (OTB) and its multi-turn form.

Per group of responses to one prompt and per token position t (verl's
``compute_optimal_token_baseline_advantage`` / ``compute_multi_turn_optimal_token_baseline_advantage``)::

    G_t = Σ_{t' ≥ t} m·r                       (reward to go)
    w_t = (1 − 2·π_t + Σπ²_t)·ρ_t²             (π_t = exp(old_logp_t); ρ the rollout IS weight, 1 without)
    W_t = Σ_{t' ≤ t} m·w                       (cumulative path-variance proxy)
    B_t = Σ_i G_{i,t}·W_{i,t}·m_{i,t} / (Σ_i W_{i,t}·m_{i,t} + eps),     A_t = (G_t − B_t)·m_t

``multi_turn`` (verl's ``tir_optimal_token_baseline``) first packs each response's counted tokens to
the left, so that position k means "the k-th counted token" (observation tokens between turns do not
shift the alignment), computes B over packed positions, and unpacks; empty responses leave their group.
``handle_zero_tail``: a group's unique longest response gets B = 0 past the second-longest length.
Vectorised: segment sums of ``[B, T]`` rows into group bins (no loop over groups), one scatter to pack.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastpo import _validation as check
from fastpo import reference
from fastpo._backend import select_backend
from fastpo._layout import accumulation_dtype
from fastpo._validation import shape_of
from fastpo.ops.group_advantages import check_grouping
from fastpo.ops.group_stats import dense_groups, group_sum
from fastpo.ops.whiten import check_eps

__all__ = ["optimal_token_baseline", "otb_core"]


def _rows_sum(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per row: the sum of the [B, T] rows of its group."""
    return x.new_zeros(x.shape).index_add(0, g, x)[g]


def _baseline(G, W, m, g, member, handle_zero_tail: bool, eps):
    """B [B, T] over the member rows (0 for rows outside a group of ≥ 2 members); m bool [B, T]."""
    zero = torch.zeros((), dtype=G.dtype, device=G.device)
    mw = torch.where(m & member[:, None], W, zero)
    b = _rows_sum(G * mw, g) / (_rows_sum(mw, g) + eps)
    count = group_sum(member.to(G.dtype), g)
    b = torch.where((count >= 2.0)[:, None], b, zero)
    if handle_zero_tail:
        length = m.sum(-1).to(G.dtype)
        neg = torch.full_like(length, -1.0)
        mine = torch.where(member, length, neg)
        lmax = neg.scatter_reduce(0, g, mine, "amax")[g]
        nmax = group_sum((member & (length == lmax)).to(G.dtype), g)
        second = neg.scatter_reduce(0, g, torch.where(member & (length < lmax), length, neg), "amax")[g]
        tail = member & (length == lmax) & (nmax == 1.0) & (count >= 2.0)
        pos = torch.arange(G.shape[1], device=G.device, dtype=G.dtype)
        b = torch.where(tail[:, None] & (pos[None, :] >= second[:, None]), zero, b)
    return b


def otb_core(rewards, mask, old_logp, sum_pi_squared, rollout_is_weights, g, *, multi_turn: bool,
             handle_zero_tail: bool, eps, singleton_raw: bool = False):
    """(advantages, returns) [B, T]; ``mask`` bool; every input already in the accumulation dtype."""
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    m = mask
    returns = torch.where(m, rewards, zero).flip(-1).cumsum(-1).flip(-1)
    w = 1.0 - 2.0 * torch.exp(torch.where(m, old_logp, zero)) + torch.where(m, sum_pi_squared, zero)
    if rollout_is_weights is not None:
        w = w * torch.where(m, rollout_is_weights, zero).square()
    W = torch.where(m, w, zero).cumsum(-1)
    length = m.sum(-1)
    member = length > 0 if multi_turn else torch.ones_like(length, dtype=torch.bool)
    if multi_turn:  # pack counted tokens left: token t goes to column k = (# counted before t)
        batch, t = m.shape
        k = torch.where(m, m.cumsum(-1) - 1, torch.full_like(length[:, None], t).expand(batch, t))
        pack = lambda x: x.new_zeros(batch, t + 1).scatter_add(1, k, torch.where(m, x, zero))[:, :t]  # noqa: E731
        pm = torch.arange(t, device=m.device)[None, :] < length[:, None]
        b = _baseline(pack(returns), pack(W), pm, g, member, handle_zero_tail, eps)
        adv_packed = pack(returns) - b
        if not singleton_raw:
            adv_packed = torch.where((group_sum(member.to(W.dtype), g) >= 2.0)[:, None], adv_packed, zero)
        adv = torch.where(m, adv_packed.gather(1, torch.where(m, k, torch.zeros_like(k))), zero)
        return adv, returns
    b = _baseline(returns, W, m, g, member, handle_zero_tail, eps)
    adv = torch.where(m, returns - b, zero)
    if not singleton_raw:
        adv = torch.where((group_sum(member.to(W.dtype), g) >= 2.0)[:, None], adv, zero)
    return adv, returns


def optimal_token_baseline(rewards: torch.Tensor, mask: Optional[torch.Tensor], old_logp: torch.Tensor,
                           sum_pi_squared: torch.Tensor, *, group_size: Optional[int] = None,
                           group_ids: Optional[torch.Tensor] = None, rollout_is_weights: Optional[torch.Tensor] = None,
                           handle_zero_tail: bool = True, multi_turn: bool = False, eps: float = 1e-8):
    """Optimal Token Baseline advantages (verl's ``optimal_token_baseline`` / ``tir_optimal_token_baseline``).

    ``rewards``, ``mask``, ``old_logp`` (log-prob of each sampled token under the rollout policy),
    ``sum_pi_squared`` (Σ_v π(v)² per token: ``fastpo.token_logprobs`` can return it, or any source) and
    the optional ``rollout_is_weights`` are ``[B, T]``; groups as in :func:`fastpo.group_advantages`.
    The formulas are in this module's docstring. Returns ``(advantages, returns)``, ``[B, T]`` float32
    (float64 for float64 rewards): advantages are 0 at masked positions, returns are the reward to go at
    every position (as verl). A group of one gets advantage 0 (verl keeps A = G there: the
    ``fastpo_optimal_token_baseline`` verl estimator does). Masked positions are never read. No gradient.
    """
    check.check_float_tensor(rewards, "rewards")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T], got shape {shape_of(rewards)}")
    tensors = {"old_logp": old_logp, "sum_pi_squared": sum_pi_squared}
    if rollout_is_weights is not None:
        tensors["rollout_is_weights"] = rollout_is_weights
    for name, t in tensors.items():
        check.check_float_tensor(t, name)
        if tuple(t.shape) != tuple(rewards.shape):
            raise ValueError(f"{name} must have the shape of rewards, got {name} {shape_of(t)} and rewards "
                             f"{shape_of(rewards)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(rewards.shape):
            raise ValueError(f"mask must have the shape of rewards, got mask {shape_of(mask)} and rewards "
                             f"{shape_of(rewards)}")
    check.check_same_device(rewards=rewards, mask=mask, **tensors)
    check.check_bool(handle_zero_tail, "handle_zero_tail")
    check.check_bool(multi_turn, "multi_turn")
    eps = check_eps(eps)
    check_grouping(rewards.shape[0], group_size, group_ids, rewards.device, required=True)
    if select_backend(rewards) == "reference":
        return reference.optimal_token_baseline(
            rewards, mask, old_logp, sum_pi_squared, group_size=group_size, group_ids=group_ids,
            rollout_is_weights=rollout_is_weights, handle_zero_tail=handle_zero_tail, multi_turn=multi_turn, eps=eps)
    dtype = accumulation_dtype(rewards.dtype)
    cast = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    m = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.detach() != 0
    g = dense_groups(rewards.shape[0], group_ids, group_size, rewards.device)
    return otb_core(cast(rewards), m, cast(old_logp), cast(sum_pi_squared), cast(rollout_is_weights), g,
                    multi_turn=multi_turn, handle_zero_tail=handle_zero_tail, eps=eps)
