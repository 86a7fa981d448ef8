"""Rollout correction as verl 0.9 (``rollout_corr_helper.py``) and TRL 1.16 (``vllm_importance_sampling_*``) do
it: importance weights π_old/π_rollout and divergence-based rejection of tokens or sequences.

Both are detached per-token tensors computed in one pass over the batch; feed the weights to
``fastpo.policy_loss(..., is_weights=w)`` and the kept tokens as its mask (``mask & keep``), and the loss
stays one fused pass. With Δ_t = old_logp − rollout_logp on counted tokens (a NaN rollout log-prob, a
token vLLM could not score, gives Δ = 0: weight 1 and no evidence for rejection, as TRL):

* :func:`rollout_is_weights`: w = exp(clamp(Δ_t)) per token, or exp(clamp(Σ_t Δ_t)) per sequence (the
  product of the token ratios, as both peers; fastpo's ``PolicyLossConfig.rollout_is`` sequence modes
  use the geometric mean instead); then "truncate" (TIS: clamp to [lower, upper], lower None = no floor)
  or "mask" (IcePop / TRL's *_mask: 0 outside [lower, upper]); optionally divided by the batch mean
  (verl's ``rollout_is_batch_normalize``; over sequences at sequence level; global with a process group).
* :func:`rejection_mask`: verl's ``rollout_rs`` options, comma-chainable (ANDed): ``token_k1/k2/k3``,
  ``seq_sum_k1/k2/k3``, ``seq_mean_k1/k2/k3``, ``seq_max_k2/k3`` with k1 = −Δ, k2 = ½Δ², k3 = e^Δ − 1 − Δ
  (Δ clamped ±20); k1 options keep log(lower) <= stat <= log(upper) (lower defaults to 1/upper), the
  others stat <= upper.
* :func:`rollout_is_metrics`: the weights' mean / min / max / std and effective sample size over the
  counted tokens, as verl's ``rollout_is_*`` metrics.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

__all__ = ["rollout_is_weights", "rejection_mask", "rollout_is_metrics", "parse_rejection", "RS_OPTIONS"]

RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
              "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
SAFETY_BOUND = 20.0


def _log_ratio(old_logp, rollout_logp, mask):
    if old_logp.shape != rollout_logp.shape or old_logp.shape != mask.shape:
        raise ValueError(f"old_logp, rollout_logp and mask must have one shape [B, T], got {tuple(old_logp.shape)}, "
                         f"{tuple(rollout_logp.shape)} and {tuple(mask.shape)}")
    m = mask != 0
    lr = torch.nan_to_num(old_logp.detach().float() - rollout_logp.detach().float(), nan=0.0)
    return torch.where(m, lr, 0.0), m


def _all_reduce(x, group):
    if group is not None:
        import torch.distributed as dist
        dist.all_reduce(x, group=group)
    return x


@torch.no_grad()
def rollout_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, *,
                       level: str = "token", mode: str = "truncate", upper: Optional[float] = 2.0,
                       lower: Optional[float] = None, log_clamp: Optional[float] = SAFETY_BOUND,
                       batch_normalize: bool = False, group=None,
                       sequence_ratio: str = "product") -> torch.Tensor:
    """The rollout importance weights [B, T] (0 on uncounted tokens); see the module docstring.

    verl: ``level`` = ``rollout_is``, a float ``rollout_is_threshold`` is ``mode="truncate", upper=it``, a
    "lo_hi" one is ``mode="mask", lower=lo, upper=hi``. TRL: ``vllm_importance_sampling_mode`` =
    "{level}_{mode}", ``lower`` / ``upper`` = ``vllm_importance_sampling_clip_min`` / ``_max`` and
    ``log_clamp=None`` (TRL does not clamp the log-ratio). ``sequence_ratio="geometric_mean"``: the
    sequence weight is exp(mean_t clamp(Δ_t)) instead (fastpo's ``PolicyLossConfig.rollout_is`` default).
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    if mode not in ("truncate", "mask"):
        raise ValueError(f"mode must be 'truncate' or 'mask', got {mode!r}")
    if upper is not None and not upper > 0 or lower is not None and upper is not None and lower > upper:
        raise ValueError(f"need 0 < upper and lower <= upper, got lower={lower}, upper={upper}")
    if sequence_ratio not in ("product", "geometric_mean"):
        raise ValueError(f"sequence_ratio must be 'product' or 'geometric_mean', got {sequence_ratio!r}")
    lr, m = _log_ratio(old_logp, rollout_logp, mask)
    if level == "sequence" and sequence_ratio == "geometric_mean":
        if log_clamp is not None:
            lr = lr.clamp(-log_clamp, log_clamp)
        lr = lr.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        lr = lr.expand_as(m)
    elif level == "sequence":
        lr = lr.sum(-1, keepdim=True).expand_as(lr)
    if log_clamp is not None:
        lr = lr.clamp(-log_clamp, log_clamp)
    w = torch.where(m, torch.exp(lr), 0.0)
    lo = -math.inf if lower is None else lower
    hi = math.inf if upper is None else upper
    if mode == "truncate":
        w = torch.where(m, w.clamp(min=lo, max=hi), w)
    else:
        w = torch.where((w >= lo) & (w <= hi) & m, w, 0.0)
    if batch_normalize:
        mf = m.to(w.dtype)
        if level == "token":
            stats = torch.stack([(w * mf).sum(), mf.sum()])
        else:
            counts = mf.sum(-1)
            seq = (w * mf).sum(-1) / counts.clamp_min(1e-8)
            nonempty = (counts > 0).to(w.dtype)
            stats = torch.stack([(seq * nonempty).sum(), nonempty.sum()])
        stats = _all_reduce(stats, group)
        mean = stats[0] / stats[1].clamp_min(1e-8)
        if mean > 1e-8:
            w = w / mean
    return w.to(old_logp.dtype)


def parse_rejection(options: str, threshold: Union[str, float, Sequence]):
    """[(option, log-space lower or None, upper)] of verl's ``rollout_rs`` / ``rollout_rs_threshold``
    (ValueError naming the bad option or threshold)."""
    if not isinstance(options, str):
        raise TypeError(f"options must be a comma-separated str, got {type(options).__name__}")
    opts = list(dict.fromkeys(o.strip() for o in options.split(",") if o.strip()))
    bad = [o for o in opts if o not in RS_OPTIONS]
    if not opts or bad:
        raise ValueError(f"options must be a comma list of {RS_OPTIONS}, got {options!r}")
    return [(o, lo, hi) for o, (lo, hi) in zip(opts, _thresholds(opts, threshold))]


def _thresholds(options: Sequence[str], spec: Union[str, float, Sequence]):
    specs = [spec] if isinstance(spec, (int, float)) else (
        [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec))
    if len(specs) not in (1, len(options)):
        raise ValueError(f"rejection_threshold: one threshold or one per option ({len(options)}), got {spec!r}")
    specs = specs * len(options) if len(specs) == 1 else specs
    out = []
    for opt, s in zip(options, specs):
        s = str(s)
        if opt.endswith("k1"):
            lo, hi = (s.split("_", 1) if "_" in s else (str(1.0 / float(s)), s))
            lo, hi = float(lo), float(hi)
            if not (0 < lo <= hi):
                raise ValueError(f"rejection_threshold for {opt!r} needs 0 < lower <= upper, got {s!r}")
            out.append((math.log(lo), math.log(hi)))
        else:
            if "_" in s or not float(s) > 0:
                raise ValueError(f"rejection_threshold for {opt!r} must be one upper bound > 0, got {s!r}")
            out.append((None, float(s)))
    return out


@torch.no_grad()
def rejection_mask(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, options: str,
                   threshold: Union[str, float, Sequence]) -> torch.Tensor:
    """Tokens kept by verl's rejection sampling, bool [B, T] (``mask`` and every option's test)."""
    parsed = parse_rejection(options, threshold)
    lr, m = _log_ratio(old_logp, rollout_logp, mask)
    lr = lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    stats = {"k1": -lr, "k2": 0.5 * lr * lr, "k3": torch.exp(lr) - 1.0 - lr}
    mf = m.to(lr.dtype)
    keep = m.clone()
    for opt, lo, hi in parsed:
        level, k = opt.rsplit("_", 1)
        stat = torch.where(m, stats[k], torch.zeros_like(lr))
        if level == "seq_sum":
            stat = stat.sum(-1, keepdim=True)
        elif level == "seq_mean":
            stat = stat.sum(-1, keepdim=True) / mf.sum(-1, keepdim=True).clamp(min=1e-8)
        elif level == "seq_max":
            top = torch.where(m, stat, torch.full_like(stat, -math.inf)).amax(-1, keepdim=True)
            stat = torch.where(torch.isinf(top), torch.zeros_like(top), top)
        ok = stat <= hi if lo is None else (stat >= lo) & (stat <= hi)
        keep &= ok.expand_as(m)
    return keep


@torch.no_grad()
def rollout_is_metrics(weights: torch.Tensor, mask: torch.Tensor, *, upper: Optional[float] = None) -> dict:
    """verl's token-level weight statistics over the counted tokens, as 0-d tensors: ``mean``, ``min``,
    ``max``, ``std`` (population, of the weights clamped to [0, upper]) and ``eff_sample_size`` =
    1 / mean((w / mean w)²) of those clamped weights (verl's ``rollout_is_eff_sample_size``; 1 for equal
    weights, → 1/N when one token carries them all). Nothing counted gives zeros."""
    m = mask != 0
    w = weights.detach().float()
    n = m.sum()
    if n == 0:
        zero = w.new_zeros(())
        return {k: zero for k in ("mean", "min", "max", "std", "eff_sample_size")}
    mean = lambda v: torch.where(m, v, torch.zeros_like(v)).sum() / n  # noqa: E731
    c = w.clamp(min=0.0, max=math.inf if upper is None else upper)
    mc = mean(c)
    std = torch.sqrt(torch.clamp(mean(c * c) - mc * mc, min=0.0)) if n > 1 else w.new_zeros(())
    return {"mean": mean(w), "min": torch.where(m, w, torch.full_like(w, math.inf)).amin(),
            "max": torch.where(m, w, torch.full_like(w, -math.inf)).amax(), "std": std,
            "eff_sample_size": 1.0 / mean((c / (mc + 1e-8)) ** 2)}
