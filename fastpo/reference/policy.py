"""Eager specification of ``policy_loss`` and ``value_loss`` (autograd by torch, float64-capable).

Both take padded ``[B, T]`` + mask or packed ``[N]`` + ``cu_seqlens`` and work on the flat ``[N]``
view with one sequence id per token. Only ``logp`` / ``entropy`` (``values``) carry gradient; the
other inputs are detached. Counted tokens are the mask's non-zeros (all tokens without a mask).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastpo._layout import accumulation_dtype, flat_mask, segment_ids, segment_sum, token_layout
from fastpo.loss_output import LossOutput
from fastpo.ops.policy_prepass import needs_prepass, run_prepass
from fastpo.policy_config import GRPO, PolicyLossConfig
from fastpo.reference.surrogates import SURROGATE_FNS, Ctx, safe_div, seq_mean

__all__ = ["policy_loss", "value_loss", "LOG_RATIO_CLAMP"]

LOG_RATIO_CLAMP = 20.0  # every log-ratio is clamped to ±20 before exp


def _aggregate(per_token, m, seg, layout, aggregation, num_tokens, norm_length, count_empty=False):
    """The aggregations of DESIGN.md over the counted tokens (``per_token`` is 0 elsewhere)."""
    dt = per_token.dtype
    total = per_token.sum()
    if aggregation == "token_sum":
        return total
    if aggregation == "token_mean":
        den = m.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=dt, device=m.device)
        return safe_div(total, den)
    if aggregation == "token_sum_norm":
        if norm_length is None:
            lengths = layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]
            norm_length = layout.padded_len if layout.is_padded else (lengths.max() if lengths.numel() else 0)
        return safe_div(total, torch.as_tensor(layout.num_seqs * norm_length, dtype=dt, device=m.device))
    counts = segment_sum(m, seg, layout.num_seqs)
    seq_sums = segment_sum(per_token, seg, layout.num_seqs)
    per_seq = safe_div(seq_sums, counts) if aggregation == "seq_mean_token_mean" else seq_sums
    num = torch.as_tensor(float(layout.num_seqs), dtype=dt, device=m.device) if count_empty else (counts > 0).sum().to(dt)
    return safe_div(per_seq.sum(), num)


def _setup(x, name, mask, cu_seqlens):
    layout = token_layout(x, name, mask, cu_seqlens)
    dt = accumulation_dtype(x.dtype)
    n = layout.num_tokens
    return layout, dt, flat_mask(layout, dt), segment_ids(layout.cu_seqlens, n)


def _masked_mean(x, m):
    return safe_div(torch.where(m > 0, x, torch.zeros_like(x)).sum(), m.sum())


def _counted_values(t, m, dt):
    """``t`` flat in ``dt`` with 0 at masked positions: whatever they hold (NaN, ±inf) reaches no sum,
    metric or gradient."""
    return torch.where(m > 0, t.reshape(-1).to(dt), 0.0)


def _rollout_weight(cfg, old, rollout_logp, is_weights, m, seg, B, dt, prepassed=False):
    """The detached per-token rollout weight (None without one) and whether it is the caller's is_weights
    (or the pre-pass's weights, ``prepassed``)."""
    if is_weights is not None:
        return _counted_values(is_weights.detach(), m, dt), True
    if cfg.rollout_is == "none" or prepassed:
        return None, False
    # a NaN rollout log-prob (a token vLLM could not score) gives Δ = 0, as TRL
    log_w = torch.nan_to_num(old - _counted_values(rollout_logp.detach(), m, dt), nan=0.0)
    log_w = torch.clamp(log_w, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if cfg.rollout_is.startswith("sequence"):
        log_w = seq_mean(log_w, m, seg, B)[seg]
    w = torch.exp(log_w)
    if cfg.rollout_is.endswith("truncate"):
        return torch.clamp(w, max=cfg.rollout_is_cap), False
    return torch.where(w > cfg.rollout_is_cap, torch.zeros_like(w), w), False


def _kl(cfg, ref_logp, x, ratio, m, dt):
    """clamp(k(δ), ±kl_clamp), δ = clamp(ref − x, ±20); kX+: that value with the gradient of k2;
    kl_bias_correction: times the ratio (differentiable)."""
    d = torch.clamp(_counted_values(ref_logp.detach(), m, dt) - x, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    base = cfg.kl_estimator.rstrip("+")
    kl = {"k1": lambda: -d, "k2": lambda: 0.5 * d * d, "k3": lambda: torch.exp(d) - d - 1.0,
          "abs": lambda: d.abs()}[base]()
    if cfg.kl_clamp is not None:
        kl = torch.clamp(kl, -cfg.kl_clamp, cfg.kl_clamp)
    if cfg.kl_estimator.endswith("+"):
        k2 = 0.5 * d * d
        kl = k2 - k2.detach() + kl.detach()
    if cfg.kl_bias_correction:
        kl = kl * ratio
    return kl


def policy_loss(logp, old_logp, advantages, mask=None, *, cu_seqlens=None, ref_logp=None, entropy=None,
                rollout_logp=None, is_weights=None, num_tokens=None, config: PolicyLossConfig = GRPO,
                process_group=None, generator=None, entropy_threshold=None) -> LossOutput:
    """Per counted token, with Δ = clamp(logp − old_logp, ±20)::

        r  = exp(Δ)                                    (ratio_level="token")
        r  = exp(logp − sg(logp) + sg(log s_i)),  log s_i = masked mean of Δ over sequence i
        pg = the surrogate of ``config.surrogate`` (fastpo.reference.surrogates; "clip" is
             max(−A·r, −A·clip(r, 1 − clip_low, 1 + clip_high)), A < 0 and dual_clip c: min(pg, −c·A))
        w  = sg(rollout IS weight, or the given is_weights) (1 without either)
        k  = clamp(k_est(clamp(ref_logp − logp, ±20)), ±kl_clamp)
        l  = w·(pg + kl_cov_coef·|logp − old_logp|·1[KL-Cov selected]) + kl_coef·k − entropy_coef·entropy

    aggregated by ``config.aggregation`` (see :func:`fastpo.policy_loss`). The rollout IS weights, the
    rejection mask and the token selections come from ``fastpo.ops.policy_prepass`` (w and the mask).
    """
    cfg = config
    layout, dt, m, seg = _setup(logp, "logp", mask, cu_seqlens)
    pre = None
    if needs_prepass(cfg):
        pre = run_prepass(cfg, layout, logp, old_logp, advantages, entropy=entropy, rollout_logp=rollout_logp,
                          is_weights=is_weights, process_group=process_group, generator=generator,
                          entropy_threshold=entropy_threshold)
        is_weights = pre.weights
        if pre.mask is not None:
            m = pre.mask.to(dt)
    B = layout.num_seqs
    x = _counted_values(logp, m, dt)
    old = _counted_values(old_logp.detach(), m, dt)
    adv = _counted_values(advantages.detach(), m, dt)

    delta = torch.clamp(x - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if cfg.ratio_level == "sequence":
        log_s = seq_mean(delta.detach(), m, seg, B)[seg]
        ratio = torch.exp(x - x.detach() + log_s)
    else:
        ratio = torch.exp(delta)
    w, w_given = _rollout_weight(cfg, old, rollout_logp, is_weights, m, seg, B, dt, prepassed=pre is not None)
    terms = SURROGATE_FNS[cfg.surrogate](Ctx(x, old, adv, delta, ratio, m, seg, B, w, w_given), cfg)
    pg = terms.pg
    if pre is not None and pre.kl_cov_index is not None:  # KL-Cov's term, part of the policy term (as verl)
        selected = torch.zeros_like(m).index_fill(0, pre.kl_cov_index, 1.0)
        pg = pg + cfg.kl_cov_coef * selected * (x - old).abs()
    if w is not None and not terms.weighted:
        pg = pg * w

    per_token = pg
    kl = None
    if ref_logp is not None:
        kl = _kl(cfg, ref_logp, x, ratio, m, dt)
        if cfg.kl_coef != 0.0:
            per_token = per_token + cfg.kl_coef * kl
    ent = None
    if entropy is not None:
        ent = _counted_values(entropy, m, dt)
        if cfg.entropy_coef != 0.0:
            per_token = per_token - cfg.entropy_coef * ent

    counted = m > 0
    per_token = torch.where(counted, per_token, torch.zeros_like(per_token))
    loss = _aggregate(per_token, m, seg, layout, cfg.aggregation, num_tokens, cfg.norm_length,
                      cfg.count_empty_sequences)

    with torch.no_grad():
        r = ratio.detach()
        low, high = terms.low.to(dt), terms.high.to(dt)
        big = torch.finfo(dt).max
        any_counted = counted.any()
        zero = m.new_zeros(())
        metrics = {
            "clip_frac": _masked_mean(low + high, m),
            "clip_frac_low": _masked_mean(low, m),
            "clip_frac_high": _masked_mean(high, m),
            "dual_clip_frac": _masked_mean(terms.dual.to(dt), m),
            "ppo_kl": _masked_mean(-delta.detach(), m),
            "ref_kl": _masked_mean(kl.detach(), m) if kl is not None else zero,
            "ratio_mean": _masked_mean(r, m),
            "ratio_min": torch.where(any_counted, torch.where(counted, r, big).amin(), zero) if r.numel() else zero,
            "ratio_max": torch.where(any_counted, torch.where(counted, r, -big).amax(), zero) if r.numel() else zero,
            "entropy": _masked_mean(ent.detach(), m) if ent is not None else zero,
        }
        if pre is not None:
            metrics.update(pre.metrics)
    return LossOutput(loss, metrics)


def value_loss(values, old_values, returns, mask=None, *, cu_seqlens=None, clip: Optional[float] = 0.2,
               aggregation: str = "token_mean") -> LossOutput:
    """0.5·agg(max((v − R)², (clip(v, v_old − clip, v_old + clip) − R)²)); ``clip=None`` leaves v unclipped.

    ``metrics["vf_clip_frac"]``: the share of counted tokens whose clipped branch is the larger
    (their gradient is zero).
    """
    layout, dt, m, seg = _setup(values, "values", mask, cu_seqlens)
    v = _counted_values(values, m, dt)
    v_old = _counted_values(old_values.detach(), m, dt)
    ret = _counted_values(returns.detach(), m, dt)
    unclipped = (v - ret) ** 2
    if clip is None:
        clipped_v = v
    else:
        clipped_v = torch.maximum(torch.minimum(v, v_old + clip), v_old - clip)
    clipped = (clipped_v - ret) ** 2
    is_clipped = clipped > unclipped
    per_token = 0.5 * torch.where(is_clipped, clipped, unclipped)
    per_token = torch.where(m > 0, per_token, torch.zeros_like(per_token))
    loss = _aggregate(per_token, m, seg, layout, aggregation, None, None)
    return LossOutput(loss, {"vf_clip_frac": _masked_mean(is_clipped.to(dt), m).detach()})
