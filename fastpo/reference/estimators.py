"""Reference multi-reward advantages and the Optimal Token Baseline: loops over groups, rewards and tokens.

The executable specification of ``fastpo.multi_reward_advantages`` and
``fastpo.optimal_token_baseline`` (float32, float64 for float64 input; no gradient).
"""

from __future__ import annotations

import torch

from fastpo._layout import accumulation_dtype
from fastpo.reference.advantages import _group_index, group_advantages, whiten

__all__ = ["multi_reward_advantages", "optimal_token_baseline"]


def _nan_std(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.std()) if x.numel() > 1 else 0.0


def multi_reward_advantages(scores, mask=None, *, reward_weights=None, group_size=None, group_ids=None,
                            aggregation: str = "sum_then_normalize", scale_rewards: str = "group", eps=1e-4):
    """See ``fastpo.multi_reward_advantages``. Each reward's normalisation is ``group_advantages``."""
    dtype = accumulation_dtype(scores.dtype)
    s = scores.detach().to(dtype)
    s = s[:, None] if s.dim() == 1 else s
    batch, k = s.shape
    w = torch.ones(k, dtype=dtype) if reward_weights is None else torch.as_tensor(reward_weights).to(dtype)
    grouping = dict(group_size=group_size, group_ids=group_ids)
    unscorable = torch.isnan(s).all(1)
    if aggregation == "sum_then_normalize":
        r = torch.zeros(batch, dtype=dtype)
        for j in range(k):
            r += torch.where(torch.isnan(s[:, j]), 0.0, s[:, j] * w[j])
        r[unscorable] = float("nan")
        method = {"group": "grpo", "batch": "grpo_batch_std", "none": "dr_grpo"}[scale_rewards]
        adv = group_advantages(r, method=method, eps=eps, **grouping)
    else:
        method = "grpo" if scale_rewards == "group" else "dr_grpo"
        r = torch.zeros(batch, dtype=dtype)
        for j in range(k):
            r += w[j] * group_advantages(s[:, j], method=method, eps=eps, **grouping)
        scored = ~unscorable
        adv = torch.zeros(batch, dtype=dtype)
        if aggregation == "normalize_then_sum":
            x = r[scored]
            std = _nan_std(x) + eps
            if x.numel():
                adv[scored] = (x - x.mean()) / std if std > 0 else torch.zeros_like(x)
        else:  # gdpo: whiten over the counted tokens of the scored sequences
            if mask is None:
                adv = whiten(r, scored, eps=1e-8)
            else:
                m = mask != 0
                adv = whiten(r[:, None].expand_as(m), m & scored[:, None], eps=1e-8)[:, 0]
            adv[unscorable] = 0.0
    if mask is None:
        return adv
    return torch.where(mask != 0, adv[:, None], torch.zeros((), dtype=dtype))


def optimal_token_baseline(rewards, mask, old_logp, sum_pi_squared, *, group_size=None, group_ids=None,
                           rollout_is_weights=None, handle_zero_tail: bool = True, multi_turn: bool = False,
                           eps: float = 1e-8):
    """See ``fastpo.optimal_token_baseline``: each group, each (packed) position, written out."""
    dtype = accumulation_dtype(rewards.dtype)
    batch, t = rewards.shape
    m = torch.ones(batch, t, dtype=torch.bool) if mask is None else mask != 0
    f = lambda x: torch.where(m, x.detach().to(dtype), torch.zeros((), dtype=dtype))  # noqa: E731
    r, lp, sp = f(rewards), f(old_logp), f(sum_pi_squared)
    returns = torch.zeros(batch, t, dtype=dtype)
    W = torch.zeros(batch, t, dtype=dtype)
    for i in range(batch):
        acc = 0.0
        for j in reversed(range(t)):
            acc += float(r[i, j])
            returns[i, j] = acc
        acc = 0.0
        for j in range(t):
            if m[i, j]:
                wj = 1.0 - 2.0 * float(torch.exp(lp[i, j])) + float(sp[i, j])
                if rollout_is_weights is not None:
                    wj *= float(rollout_is_weights[i, j]) ** 2
                acc += wj
            W[i, j] = acc
    # rows as sequences of (position, G, W): every position, or the counted ones packed (multi_turn)
    cols = [list(range(t)) if not multi_turn else m[i].nonzero().flatten().tolist() for i in range(batch)]
    lengths = [int(m[i].sum()) for i in range(batch)]
    gidx, num_groups = _group_index(batch, group_size, group_ids, rewards.device)
    adv = torch.zeros(batch, t, dtype=dtype)
    for g in range(num_groups):
        members = [i for i in range(batch) if int(gidx[i]) == g and (lengths[i] > 0 or not multi_turn)]
        if len(members) < 2:
            continue  # a group of one: advantage 0
        width = max(len(cols[i]) for i in members)
        base = []
        for p in range(width):
            num = den = 0.0
            for i in members:
                if p < len(cols[i]) and (multi_turn or m[i, cols[i][p]]):
                    num += float(returns[i, cols[i][p]] * W[i, cols[i][p]])
                    den += float(W[i, cols[i][p]])
            base.append(num / (den + eps))
        ls = sorted(lengths[i] for i in members)
        for i in members:
            b = list(base)
            if handle_zero_tail and lengths[i] == ls[-1] and ls[-1] > ls[-2]:
                b[ls[-2]:] = [0.0] * len(b[ls[-2]:])
            for p, j in enumerate(cols[i]):
                if m[i, j]:
                    adv[i, j] = returns[i, j] - b[p]
    return adv.to(rewards.device), returns.to(rewards.device)
