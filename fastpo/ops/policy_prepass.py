"""The detached pass over the batch before the fused policy loss: rollout correction and token selection.

:func:`fastpo.policy_loss` (every backend) runs it when the config asks for any of them
(:func:`needs_prepass`). It reuses ``fastpo.ops.rollout_correction`` and ``fastpo.ops.token_selection`` on a
``[B, T]`` grid of the tokens (a packed batch is laid out on one) and returns:

* ``weights``: the per-token constants that multiply the policy term, in the kernels' ``is_weights`` slot:
  w = (the caller's is_weights or the rollout IS weight) · Clip-Cov's keep · the high-entropy mask · OPSM's
  sequence keep (None when nothing weighs the tokens);
* ``mask``: the counted tokens after verl's rejection sampling (rejected tokens leave every denominator);
* ``kl_cov_index`` / ``kl_cov_scale``: KL-Cov's selected tokens (flat indices) and the constant
  kl_cov_coef·w_t·(1/n_i for seq_mean_token_mean, else 1) of their term |logp − old_logp|, which the
  fused path adds times the aggregation's global scale (the reference adds it per token);
* ``metrics``: detached 0-d tensors (see :func:`fastpo.policy_loss`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fastpo._layout import TokenLayout, accumulation_dtype, segment_ids, segment_sum
from fastpo._validation import is_tracing
from fastpo.ops.rollout_correction import rejection_mask, rollout_is_metrics, rollout_is_weights
from fastpo.ops.token_selection import (
    clip_cov_weights, high_entropy_mask, kl_cov_index, kl_cov_tokens, off_policy_sequence_mask,
)
from fastpo.policy_config import PolicyLossConfig

__all__ = ["Prepass", "needs_prepass", "run_prepass"]

LOG_RATIO_CLAMP = 20.0


class Prepass(NamedTuple):
    weights: Optional[torch.Tensor]        # [N] accumulation dtype, or None
    mask: Optional[torch.Tensor]           # [N] bool, or None (the caller's mask unchanged)
    kl_cov_index: Optional[torch.Tensor]   # [k] int64 flat indices, or None
    kl_cov_scale: Optional[torch.Tensor]   # [k] accumulation dtype, or None
    metrics: dict


def needs_prepass(config: PolicyLossConfig) -> bool:
    """Whether the config asks for more than the kernels' own rollout modes (the per-token or geometric-mean
    weight, capped or masked above), which they compute in the fused pass itself."""
    c = config
    return (c.selects_tokens or c.rollout_rejection is not None or c.rollout_is_floor is not None
            or c.rollout_is_batch_normalize or (c.rollout_is.startswith("sequence")
                                                and c.rollout_is_sequence_ratio == "product"))


class _Grid:
    """The flat tokens [N] of a layout on a [B, T] grid (a padded batch is one already)."""

    def __init__(self, layout: TokenLayout, device):
        self.layout, self.B = layout, layout.num_seqs
        n = layout.num_tokens
        if layout.is_padded:
            self.T, self.index = layout.padded_len, None
        else:
            cu = layout.cu_seqlens
            self.seg = segment_ids(cu, n)
            lengths = cu[1:] - cu[:-1]
            self.T = int(lengths.max()) if lengths.numel() else 0
            self.index = (self.seg, torch.arange(n, device=device) - cu[self.seg])

    def grid(self, flat: torch.Tensor, fill=0.0) -> torch.Tensor:
        if self.index is None:
            return flat.reshape(self.B, self.T)
        out = flat.new_full((self.B, self.T), fill)
        out[self.index] = flat
        return out

    def flat(self, grid: torch.Tensor) -> torch.Tensor:
        return grid.reshape(-1) if self.index is None else grid[self.index]


def _frac(part: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (part & m).sum().double() / m.sum().clamp(min=1).double()


@torch.no_grad()
def run_prepass(config: PolicyLossConfig, layout: TokenLayout, logp, old_logp, advantages, *, entropy=None,
                rollout_logp=None, is_weights=None, process_group=None, generator=None,
                entropy_threshold=None) -> Prepass:
    """See the module docstring; inputs are the caller's (validated) tensors, any layout."""
    cfg = config
    dt = accumulation_dtype(logp.dtype)
    g = _Grid(layout, logp.device)
    flat = lambda t: t.detach().reshape(-1).to(dt)  # noqa: E731
    if layout.mask is None:
        m0 = torch.ones(layout.num_tokens, dtype=torch.bool, device=logp.device)
    else:  # a bool mask is used as it is (no pass over the batch)
        m0 = layout.mask.reshape(-1)
        m0 = m0 if m0.dtype == torch.bool else m0 != 0
    mg = g.grid(m0, False)
    x, old, adv = (g.grid(flat(t)) for t in (logp, old_logp, advantages))
    metrics = {}
    w = None if is_weights is None else g.grid(flat(is_weights))

    roll = None if rollout_logp is None else g.grid(flat(rollout_logp), float("nan"))
    if cfg.rollout_is != "none":
        level, mode = cfg.rollout_is.split("_")
        w = rollout_is_weights(old, roll, mg, level=level, mode=mode, upper=cfg.rollout_is_cap,
                               lower=cfg.rollout_is_floor, log_clamp=LOG_RATIO_CLAMP,
                               batch_normalize=cfg.rollout_is_batch_normalize, group=process_group,
                               sequence_ratio=cfg.rollout_is_sequence_ratio)
        for k, v in rollout_is_metrics(w, mg).items():
            metrics[f"is_{k}"] = v
    m = mg
    if cfg.rollout_rejection is not None:
        m = rejection_mask(old, roll, mg, cfg.rollout_rejection, cfg.rollout_rejection_threshold)
        metrics["rejection_frac"] = _frac(~m, mg)

    def weigh(factor):
        nonlocal w
        factor = factor.to(dt)
        w = factor if w is None else w * factor

    if cfg.clip_cov_ratio is not None:
        keep = clip_cov_weights(x, old, adv, m, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                clip_cov_ratio=cfg.clip_cov_ratio, clip_cov_lb=cfg.clip_cov_lower,
                                clip_cov_ub=cfg.clip_cov_upper, generator=generator, group=process_group)
        metrics["clip_cov_frac"] = _frac(keep == 0, m)
        weigh(keep)
    if cfg.top_entropy_quantile < 1.0:
        keep = high_entropy_mask(g.grid(flat(entropy)), m, cfg.top_entropy_quantile, threshold=entropy_threshold,
                                 group=process_group)
        metrics["entropy_mask_frac"] = _frac(keep, m)
        weigh(keep)
    if cfg.off_policy_mask_threshold is not None:
        sampling = old if rollout_logp is None else roll
        mf = m.to(dt)
        seq_adv = (torch.where(m, adv, 0.0)).sum(-1) / mf.sum(-1).clamp(min=1.0)
        keep = off_policy_sequence_mask(x, sampling, seq_adv, m, cfg.off_policy_mask_threshold).expand_as(m)
        metrics["off_policy_mask_frac"] = _frac(keep == 0, m)
        weigh(keep)

    index = scale = None
    if cfg.kl_cov_ratio is not None:
        if g.index is None and process_group is None and not is_tracing():  # padded: flat index = token index
            index, count = kl_cov_index(x, adv, m, kl_cov_ratio=cfg.kl_cov_ratio)
            metrics["kl_cov_frac"] = torch.tensor(index.numel() / max(count, 1), dtype=torch.float64,
                                                  device=logp.device)
        else:
            sel = kl_cov_tokens(x, adv, m, kl_cov_ratio=cfg.kl_cov_ratio, group=process_group)
            metrics["kl_cov_frac"] = _frac(sel, m)
            index = torch.nonzero(g.flat(sel), as_tuple=True)[0]
        scale = torch.full((index.numel(),), cfg.kl_cov_coef, dtype=dt, device=logp.device)
        if w is not None:
            scale = scale * g.flat(w)[index]
        if cfg.aggregation == "seq_mean_token_mean":
            seg = segment_ids(layout.cu_seqlens, layout.num_tokens)
            counts = segment_sum(g.flat(m).to(dt), seg, layout.num_seqs)
            scale = scale / counts[seg[index]]
    mask = None if m is mg else g.flat(m)
    weights = None if w is None else torch.where(g.flat(m), g.flat(w).to(dt), 0.0)
    return Prepass(weights, mask, index, scale, metrics)
