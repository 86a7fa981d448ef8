"""Reference advantage estimators: GAE, group-relative advantages, process supervision, whitening.

Plain eager PyTorch (and, for GAE, a plain Python loop over the counted tokens): the executable
specification of ``fastpo.gae``, ``fastpo.group_advantages``, ``fastpo.process_advantages`` and
``fastpo.whiten``. Results are float32 (float64 for float64 inputs). None of these carries a gradient
except ``whiten``, which is an ordinary differentiable composition.
"""

from __future__ import annotations

import torch

from fastpo._layout import accumulation_dtype, flat_mask, token_layout

__all__ = ["gae", "group_advantages", "process_advantages", "whiten", "GROUP_METHODS"]

GROUP_METHODS = ("grpo", "dr_grpo", "grpo_batch_std", "rloo", "reinforce_pp", "remax")


def gae(rewards, values, mask=None, *, gamma: float = 1.0, lam: float = 0.95, cu_seqlens=None):
    """Generalised advantage estimation over the counted tokens of each sequence.

    Walking each sequence backwards over its counted tokens only (masked tokens are skipped)::

        δ_t = r_t + γ·V_next − V_t,    A_t = δ_t + γλ·A_next,    R_t = A_t + V_t

    where "next" is the next *counted* token of the same sequence (V_next = A_next = 0 past the last).
    Masked positions get 0 in both outputs. Padded ``[B, T]`` + mask or packed ``[N]`` + ``cu_seqlens``.
    """
    layout = token_layout(rewards, "rewards", mask, cu_seqlens)
    dtype = accumulation_dtype(rewards.dtype)
    r = rewards.detach().reshape(-1).to(torch.float64).tolist()
    v = values.detach().reshape(-1).to(torch.float64).tolist()
    counted = flat_mask(layout, torch.bool).tolist()
    cu = layout.cu_seqlens.tolist()
    adv = [0.0] * len(r)
    ret = [0.0] * len(r)
    for i in range(layout.num_seqs):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(cu[i], cu[i + 1])):
            if not counted[t]:
                continue
            delta = r[t] + gamma * next_value - v[t]
            next_adv = delta + gamma * lam * next_adv
            next_value = v[t]
            adv[t], ret[t] = next_adv, next_adv + v[t]
    as_tensor = lambda xs: layout.unflatten(torch.tensor(xs, dtype=torch.float64).to(dtype))  # noqa: E731
    return as_tensor(adv).to(rewards.device), as_tensor(ret).to(rewards.device)


def _group_index(batch: int, group_size, group_ids, device):
    """(dense group index [B] int64, number of groups)."""
    if group_ids is None:
        if group_size is None:
            return torch.zeros(batch, dtype=torch.int64, device=device), 1
        return torch.arange(batch, device=device) // group_size, batch // group_size
    uniq, inverse = torch.unique(group_ids.reshape(-1), return_inverse=True)
    return inverse.to(torch.int64), uniq.numel()


def _scale(x: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """x / denom, 0 when denom is 0 (a flat group with eps = 0)."""
    return x / denom if float(denom) > 0 else torch.zeros_like(x)


def _std(x: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std of a 1-D tensor, 0 with fewer than two elements."""
    return x.std() if x.numel() > 1 else x.new_zeros(())


def group_advantages(scores, mask=None, *, group_size=None, group_ids=None, method: str = "grpo",
                     eps: float = 1e-6, baseline=None):
    """Group-relative outcome advantages (one scalar per sequence, written group by group).

    s_i = scores[i] (or Σ_t mask·rewards[i, t] for token rewards ``[B, T]``); per group g, n_g members::

        grpo            (s − mean_g) / (std_g + eps)          std with Bessel's correction
        dr_grpo         s − mean_g
        grpo_batch_std  (s − mean_g) / (std_batch + eps)
        rloo            s − mean of the other n_g − 1 members = n_g/(n_g − 1)·(s − mean_g)
        reinforce_pp    whiten(s − mean_g) over the batch (over counted tokens for ``[B, T]`` input, as verl)
        remax           s − baseline                          (no groups)

    A group of one gets 0 (every grouped method). ``[B]`` scores give ``[B]``; ``[B, T]`` token rewards
    give the sequence advantage broadcast over the counted tokens, ``[B, T]`` (0 at masked positions).
    """
    dtype = accumulation_dtype(scores.dtype)
    token_level = scores.dim() == 2
    if token_level:
        m = torch.ones_like(scores, dtype=dtype) if mask is None else (mask != 0).to(dtype)
        s = (scores.detach().to(dtype) * m).sum(-1)
    else:
        s = scores.detach().to(dtype)
    batch = s.numel()
    out = torch.zeros_like(s)
    if method == "remax":
        out = s - baseline.detach().to(dtype)
    else:
        gidx, num_groups = _group_index(batch, group_size, group_ids, s.device)
        centred = torch.zeros_like(s)
        for g in range(num_groups):
            members = (gidx == g).nonzero().flatten()
            x = s[members]
            n = x.numel()
            if n < 2:
                continue  # a group of one: advantage 0
            if method == "grpo":
                out[members] = _scale(x - x.mean(), _std(x) + eps)
            elif method == "dr_grpo" or method == "reinforce_pp":
                centred[members] = x - x.mean()
                out[members] = centred[members]
            elif method == "grpo_batch_std":
                out[members] = _scale(x - x.mean(), _std(s) + eps)
            elif method == "rloo":
                out[members] = x - (x.sum() - x) / (n - 1)
            else:
                raise ValueError(f"unknown method {method!r}")
        if method == "reinforce_pp":
            counts = torch.bincount(gidx, minlength=num_groups)[gidx]
            if token_level:
                out = whiten(centred[:, None] * m, m, eps=1e-8) * m
                return torch.where(counts[:, None] > 1, out, torch.zeros_like(out))
            out = whiten(centred, eps=1e-8)
            out = torch.where(counts > 1, out, torch.zeros_like(out))
    if token_level:
        return out[:, None] * m
    return out


def process_advantages(step_rewards, step_ends, step_mask, *, group_size=None, group_ids=None,
                       num_tokens: int, eps: float = 1e-6):
    """Process-supervision advantages (DeepSeekMath): ``[B, S]`` step rewards → ``[B, num_tokens]``.

    The counted step rewards of each group (all its sequences' steps together) are normalised to
    r̃ = (r − mean_g)/(std_g + eps) (Bessel, as grpo; a group with fewer than two counted steps gives
    r̃ = 0). Token t of sequence i gets Σ r̃_{i,j} over the counted steps j with step_ends[i, j] ≥ t.
    """
    dtype = accumulation_dtype(step_rewards.dtype)
    batch, steps = step_rewards.shape
    gidx, num_groups = _group_index(batch, group_size, group_ids, step_rewards.device)
    counted = step_mask != 0
    r = step_rewards.detach().to(dtype)
    normalised = torch.zeros_like(r)
    for g in range(num_groups):
        sel = (gidx == g)[:, None] & counted
        x = r[sel]
        if x.numel() < 2:
            continue
        normalised[sel] = _scale(x - x.mean(), x.std() + eps)
    out = torch.zeros(batch, num_tokens, dtype=dtype, device=step_rewards.device)
    for i in range(batch):
        for j in range(steps):
            if counted[i, j]:
                out[i, : int(step_ends[i, j]) + 1] += normalised[i, j]
    return out


def whiten(x, mask=None, *, shift_mean: bool = True, eps: float = 1e-8):
    """(x − mean)·rsqrt(var + eps) with mean and Bessel-corrected var over the counted elements.

    As verl's ``masked_whiten``: every position is transformed (masked ones too) with the statistics of
    the counted ones; ``shift_mean=False`` adds the mean back. With fewer than two counted elements it
    returns x − mean (x itself with none counted; + mean when ``shift_mean=False``), as it does for a
    flat input with eps = 0.
    """
    dtype = accumulation_dtype(x.dtype)
    xf = x.to(dtype)
    m = torch.ones_like(xf) if mask is None else (mask != 0).to(dtype)
    n = m.sum()
    mean = (xf * m).sum() / n.clamp(min=1)
    var = ((xf - mean).square() * m).sum() / (n - 1).clamp(min=1)
    if float(n) < 2 or float(var.detach() + eps) == 0:
        out = xf - mean
    else:
        out = (xf - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean
