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

GROUP_METHODS = ("grpo", "dr_grpo", "grpo_batch_std", "rloo", "reinforce_pp", "remax", "opo", "gpg", "grpo_passk",
                 "dr_grpo_passk")


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


def _passk(x: torch.Tensor) -> torch.Tensor:
    """r_max − r_2nd at the unique best element, 0 elsewhere (a tie for the best gives 0 to all)."""
    out = torch.zeros_like(x)
    best = x.max()
    if int((x == best).sum()) == 1:
        i = int(x.argmax())
        out[i] = best - torch.cat([x[:i], x[i + 1:]]).max()
    return out


def group_advantages(scores, mask=None, *, group_size=None, group_ids=None, method: str = "grpo",
                     eps: float = 1e-6, baseline=None):
    """Group-relative outcome advantages (one scalar per sequence, written group by group).

    s_i = scores[i] (or the sum of rewards[i, t] over the counted tokens for token rewards ``[B, T]``;
    masked values are never read); per group g, n_g scored members (Bessel std)::

        grpo            (s − mean_g) / (std_g + eps)
        dr_grpo         s − mean_g
        grpo_batch_std  (s − mean_g) / (std_batch + eps)
        rloo            s − mean of the other n_g − 1 members = n_g/(n_g − 1)·(s − mean_g)
        reinforce_pp    whiten(s − mean_g) over the batch (over counted tokens for ``[B, T]`` input, as verl)
        remax           s − baseline                          (no groups)
        opo             s − Σ_g |y|·s / Σ_g |y|               (|y| = counted tokens)
        gpg             α·(s − mean_g), α = #scored / #(scored with s ≠ 0)
        grpo_passk      (s_max − s_2nd)/(std_g + eps) at the unique best member, 0 elsewhere
        dr_grpo_passk   s_max − s_2nd at the unique best member, 0 elsewhere

    NaN scores are "not scored" (TRL): advantage 0, and left out of every statistic. A group with
    fewer than two scored members gets 0. ``[B]`` scores give ``[B]``; ``[B, T]`` token rewards give
    the sequence advantage broadcast over the counted tokens, ``[B, T]`` (0 at masked positions).
    """
    dtype = accumulation_dtype(scores.dtype)
    token_level = scores.dim() == 2
    lengths = None
    if token_level:
        m = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask != 0
        s = torch.where(m, scores.detach().to(dtype), torch.zeros((), dtype=dtype)).sum(-1)
        lengths = m.sum(-1).to(dtype)
    else:
        s = scores.detach().to(dtype)
    batch = s.numel()
    valid = ~torch.isnan(s)
    out = torch.zeros_like(s)
    if method == "remax":
        b = baseline.detach().to(dtype)
        ok = valid & ~torch.isnan(b)
        out[ok] = s[ok] - b[ok]
    else:
        gidx, num_groups = _group_index(batch, group_size, group_ids, s.device)
        centred = torch.zeros_like(s)
        scored = s[valid]
        nonzero = max(int((scored != 0).sum()), 1)
        for g in range(num_groups):
            members = ((gidx == g) & valid).nonzero().flatten()
            x = s[members]
            n = x.numel()
            if n < 2:
                continue  # a group of one scored member: advantage 0
            if method == "grpo":
                out[members] = _scale(x - x.mean(), _std(x) + eps)
            elif method == "dr_grpo" or method == "reinforce_pp":
                centred[members] = x - x.mean()
                out[members] = centred[members]
            elif method == "grpo_batch_std":
                out[members] = _scale(x - x.mean(), _std(scored) + eps)
            elif method == "rloo":
                out[members] = x - (x.sum() - x) / (n - 1)
            elif method == "opo":
                ln = lengths[members]
                out[members] = x - ((ln * x).sum() / ln.sum() if float(ln.sum()) > 0 else 0.0)
            elif method == "gpg":
                out[members] = (x - x.mean()) * scored.numel() / nonzero
            elif method in ("grpo_passk", "dr_grpo_passk"):
                out[members] = _passk(x)
                if method == "grpo_passk":
                    out[members] = _scale(out[members], _std(x) + eps)
            else:
                raise ValueError(f"unknown method {method!r}")
        if method == "reinforce_pp":
            counts = torch.zeros(batch, dtype=torch.int64)
            for g in range(num_groups):
                sel = (gidx == g) & valid
                counts[sel] = int(sel.sum())
            keep = counts > 1
            if token_level:
                w = m & valid[:, None]
                out = whiten(centred[:, None] * m, w, eps=1e-8) * m
                return torch.where(keep[:, None], out, torch.zeros_like(out))
            out = whiten(centred, valid, eps=1e-8)
            out = torch.where(keep, out, torch.zeros_like(out))
    if token_level:
        return torch.where(m, out[:, None], torch.zeros((), dtype=dtype))
    return out


def process_advantages(step_rewards, step_ends, step_mask, *, group_size=None, group_ids=None,
                       num_tokens: int, eps: float = 1e-6):
    """Process-supervision advantages (DeepSeekMath): ``[B, S]`` step rewards → ``[B, num_tokens]``.

    The counted step rewards of each group (all its sequences' steps together) are normalised to
    r̃ = (r − mean_g)/(std_g + eps) (Bessel, as grpo; a group with fewer than two counted steps gives
    r̃ = 0). Token t of sequence i gets Σ r̃_{i,j} over the counted steps j with step_ends[i, j] ≥ t.
    Masked steps are never read; a NaN counted reward is left out of the statistics and contributes 0.
    """
    dtype = accumulation_dtype(step_rewards.dtype)
    batch, steps = step_rewards.shape
    gidx, num_groups = _group_index(batch, group_size, group_ids, step_rewards.device)
    counted = step_mask != 0
    r = step_rewards.detach().to(dtype)
    counted = counted & ~torch.isnan(r)  # a NaN counted step reward is "not scored" (TRL's semantics)
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
    flat input with eps = 0. Masked elements never enter the statistics (a NaN there stays where it is).
    """
    dtype = accumulation_dtype(x.dtype)
    xf = x.to(dtype)
    counted = torch.ones_like(xf, dtype=torch.bool) if mask is None else mask != 0
    n = counted.sum()
    mean = xf[counted].sum() / n.clamp(min=1)
    var = (xf[counted] - mean).square().sum() / (n - 1).clamp(min=1)
    if float(n) < 2 or float(var.detach() + eps) == 0:
        out = xf - mean
    else:
        out = (xf - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean
