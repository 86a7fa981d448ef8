"""verl 0.9's ``rollout_corr/*`` diagnostics, computed by fastpo: the statistics verl's
``compute_rollout_correction_and_rejection_mask`` logs for the rollout IS weights, for each rejection
option and for the mismatch between the training and the rollout policy (KL, perplexities, χ²).

With Δ_t = logp_t − rollout_logp_t over the counted tokens M (n = |M|; rows b with n_b = |M_b|):

* IS weights (``rollout_is`` set): raw w_t = e^{clamp(Δ_t, ±20)} per token, or e^{clamp(Σ_{t∈M_b} Δ_t)} per
  sequence; applied w = min(raw, upper) (TIS) or raw·1[lower <= raw <= upper] (IcePop). Logged: mean, min,
  max (sequence level: of e^{ΣΔ} over rows, clamped above at e^20), ratio_fraction_high/low (raw above
  upper / below lower = 1/upper by default), std (population, of min(w, upper)), eff_sample_size
  1 / mean((c / (mean c + 1e-8))²) with c = min(w, upper), the row means of w (seq_mean/std/max/min,
  seq_max_deviation = max|·−1|), the share of rows whose raw row mean is out of bounds, IcePop's
  oob_ratio, and batch_norm_factor (the mean weight, per token or per non-empty row; over every rank of
  the default process group when torch.distributed is initialised, as verl).
* Rejection option o with statistic k1 = −Δ, k2 = ½Δ², k3 = e^Δ − 1 − Δ (Δ clamped ±20), per token or
  per row (sum / mean / max over M_b): mean, min, max, fraction_high/low, std of the statistic clamped to
  [lower, upper], the statistics of the row values (seq_*), the share of tokens and of rows it masks;
  then the combined rollout_rs_masked_fraction / seq_masked_fraction.
* Mismatch: training/rollout (log) perplexity = mean_b e^{−mean_t logp} (empty rows count with
  logp-mean 0, as verl), kl = mean(rollout_logp − logp), k3_kl, log_ppl_diff (mean, |mean|, max, min),
  ppl_ratio, chi2_token = mean e^{2 clamp Δ} − 1, chi2_seq = mean_b e^{2 clamp ΣΔ} − 1.

Everything is one set of torch reductions over [B, T] / [B] and one host transfer at the end; masked
entries are selected away (``torch.where``), so NaN or inf in padding changes nothing.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch

from fastpo.ops.rollout_correction import SAFETY_BOUND, parse_rejection

__all__ = ["verl_rollout_corr_metrics", "parse_is_threshold"]


def parse_is_threshold(spec) -> tuple:
    """(upper, lower or None) of verl's ``rollout_is_threshold``: a float (TIS) or "lo_hi" (IcePop)."""
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise TypeError(f"rollout_is_threshold must be a float or a 'lower_upper' string, got {spec!r}")
    if isinstance(spec, str):
        s = spec.strip()
        if not s:
            raise ValueError("rollout_is_threshold must not be an empty string.")
        lo, hi = s.split("_", 1) if "_" in s else (None, s)
        try:
            upper, lower = float(hi), None if lo is None else float(lo)
        except ValueError as exc:
            raise ValueError(f"Invalid rollout_is_threshold '{spec}'.") from exc
    else:
        upper, lower = float(spec), None
    if upper <= 0 or lower is not None and not 0 < lower <= upper:
        raise ValueError(f"rollout_is_threshold needs 0 < lower <= upper, got {spec!r}")
    return upper, lower


class _Masked:
    """verl_F.masked_mean / masked_sum over a bool mask (values selected, so padding can hold NaN)."""

    def __init__(self, m: torch.Tensor, dtype):
        self.m, self.mf = m, m.to(dtype)
        self.n_row = self.mf.sum(-1)
        self.n = self.n_row.sum()
        self.valid = self.n_row > 0  # rows with a counted token
        self.n_valid = self.valid.sum()

    def sum(self, v, axis=None):
        # a product, not a select: every v here is formed from inputs already selected to 0 at padding
        # (verl_rollout_corr_metrics), so it is finite there and v·0 = 0
        v = v * self.mf
        return v.sum() if axis is None else v.sum(axis)

    def mean(self, v, axis=None):
        return self.sum(v, axis) / ((self.n if axis is None else self.n_row) + 1e-8)

    def max(self, v):
        return torch.where(self.m, v, -math.inf).amax()

    def min(self, v):
        return torch.where(self.m, v, math.inf).amin()

    def row_stats(self, s, prefix, out):
        """mean, std (unbiased; 0 for one row), max, min of the per-row values ``s`` over non-empty rows."""
        v, nv = self.valid, self.n_valid
        mean = torch.where(v, s, 0.0).sum() / nv
        var = torch.where(v, (s - mean) ** 2, 0.0).sum() / (nv - 1).clamp(min=1)
        out[f"{prefix}_seq_mean"] = mean
        out[f"{prefix}_seq_std"] = torch.where(nv > 1, var.sqrt(), 0.0)
        out[f"{prefix}_seq_max"] = torch.where(v, s, -math.inf).amax()
        out[f"{prefix}_seq_min"] = torch.where(v, s, math.inf).amin()
        return mean

    def row_frac(self, cond):
        return (cond & self.valid).sum() / self.n_valid


def _is_metrics(lr, mm: _Masked, level, threshold, batch_normalize, out):
    upper, lower = parse_is_threshold(threshold)
    if level == "token":
        raw = torch.exp(lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)) * mm.mf
    elif level == "sequence":
        lsum = mm.sum(lr, -1)
        raw = torch.exp(lsum.clamp(-SAFETY_BOUND, SAFETY_BOUND))[:, None].expand_as(lr) * mm.mf
    else:
        raise ValueError(f"Invalid rollout_is: {level}. Must be one of {{'token', 'sequence'}}.")
    w = raw.clamp(max=upper) if lower is None else torch.where((raw >= lower) & (raw <= upper), raw, 0.0)
    lo = 1.0 / upper if lower is None else lower
    p = "rollout_is"
    if level == "sequence":  # over all rows (an empty row has ΣΔ = 0), in log space
        out[f"{p}_max"] = torch.exp(lsum.max().clamp(max=SAFETY_BOUND))
        out[f"{p}_min"] = torch.exp(lsum.min())
        out[f"{p}_mean"] = mm.mean(w)
        out[f"{p}_ratio_fraction_high"] = (lsum > math.log(upper)).float().mean()
        out[f"{p}_ratio_fraction_low"] = (lsum < math.log(lo)).float().mean()
    else:
        out[f"{p}_mean"] = mm.mean(w)
        out[f"{p}_ratio_fraction_high"] = mm.mean((raw > upper).to(lr.dtype))
        out[f"{p}_ratio_fraction_low"] = mm.mean((raw < lo).to(lr.dtype))
        out[f"{p}_max"], out[f"{p}_min"] = mm.max(w), mm.min(w)
    c = w.clamp(min=0.0, max=upper)
    mc = mm.mean(c)
    out[f"{p}_std"] = torch.where(mm.n > 1, (mm.mean(c * c) - mc * mc).clamp(min=0.0).sqrt(), 0.0)
    out[f"{p}_eff_sample_size"] = 1.0 / mm.mean((c / (mc + 1e-8)) ** 2)
    rows = mm.mean(w, -1)  # over every row, empty ones giving 0 (verl)
    out[f"{p}_seq_mean"] = rows.mean()
    out[f"{p}_seq_std"] = rows.std() if rows.numel() > 1 else rows.new_zeros(())
    out[f"{p}_seq_max"], out[f"{p}_seq_min"] = rows.max(), rows.min()
    out[f"{p}_seq_max_deviation"] = (rows - 1.0).abs().max()
    raw_rows = mm.mean(raw, -1)
    out[f"{p}_seq_fraction_high"] = (raw_rows > upper).float().mean()
    out[f"{p}_seq_fraction_low"] = (raw_rows < lo).float().mean()
    if lower is not None:
        out[f"{p}_oob_ratio"] = mm.mean(((raw < lower) | (raw > upper)).to(lr.dtype))
    if batch_normalize:  # the mean weight; global over the default process group when one is initialised
        vf = mm.valid.to(lr.dtype)
        stats = torch.stack([mm.sum(w), mm.n]) if level == "token" else torch.stack([(mm.mean(w, -1) * vf).sum(),
                                                                                       vf.sum()])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
            mean = stats[0] / stats[1]
        else:
            mean = stats[0] / (stats[1] + 1e-8 if level == "token" else stats[1].clamp_min(1e-8))
        out[f"{p}_batch_norm_factor"] = torch.where(mean > 1e-8, mean, 1.0)


def _rs_metrics(lr, mm: _Masked, options, threshold, out):
    lr = lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    ks = {"k1": -lr, "k2": 0.5 * lr ** 2, "k3": torch.exp(lr) - 1.0 - lr}
    keep_all = torch.ones_like(mm.m)
    for opt, lo_log, hi in parse_rejection(options, threshold):
        level, k = opt.rsplit("_", 1)
        is_k1, p = lo_log is not None, f"rollout_rs_{opt}"
        lower = lo_log if is_k1 else 0.0
        stat = ks[k]
        if level == "token":
            rows = mm.mean(stat, -1)
        elif level == "seq_sum":
            rows = mm.sum(stat, -1)
        elif level == "seq_mean":
            rows = mm.mean(stat, -1)
        else:  # seq_max: an empty row gives 0
            top = torch.where(mm.m, stat, -math.inf).amax(-1)
            rows = torch.where(torch.isinf(top), 0.0, top)
        if level != "token":
            stat = rows[:, None].expand_as(lr)
        keep = (stat >= lower) & (stat <= hi) if is_k1 else stat <= hi
        keep_all &= keep
        out[f"{p}_mean"] = mm.mean(stat)
        if level == "token":
            out[f"{p}_max"], out[f"{p}_min"] = mm.max(stat), mm.min(stat)
            out[f"{p}_fraction_high"] = mm.mean((stat > hi).to(lr.dtype))
            out[f"{p}_fraction_low"] = mm.mean((stat < lower).to(lr.dtype)) if is_k1 else lr.new_zeros(())
        else:
            out[f"{p}_max"] = torch.where(mm.valid, rows, -math.inf).amax()
            out[f"{p}_min"] = torch.where(mm.valid, rows, math.inf).amin()
            out[f"{p}_fraction_high"] = mm.row_frac(rows > hi)
            out[f"{p}_fraction_low"] = mm.row_frac(rows < lower) if is_k1 else lr.new_zeros(())
        c = stat.clamp(min=lower, max=hi)
        mc = mm.mean(c)
        out[f"{p}_std"] = torch.where(mm.n > 1, (mm.mean(c * c) - mc * mc).clamp(min=0.0).sqrt(), 0.0)
        mm.row_stats(rows, p, out)
        out[f"{p}_seq_max_deviation"] = torch.where(mm.valid, rows.abs(), -math.inf).amax()
        out[f"{p}_seq_fraction_high"] = mm.row_frac(rows > hi)
        if is_k1:
            out[f"{p}_seq_fraction_low"] = mm.row_frac(rows < lower)
        out[f"{p}_masked_fraction"] = mm.mean((~keep).to(lr.dtype))
        out[f"{p}_seq_masked_fraction"] = mm.row_frac((~keep & mm.m).any(-1))
    out["rollout_rs_masked_fraction"] = mm.mean((~keep_all).to(lr.dtype))
    out["rollout_rs_seq_masked_fraction"] = (~keep_all & mm.m).any(-1).float().mean()


def _offpolicy_metrics(logp, rlogp, lr, mm: _Masked, out):
    mt, mr = mm.mean(logp, -1), mm.mean(rlogp, -1)
    out["training_ppl"], out["training_log_ppl"] = torch.exp(-mt).mean(), (-mt).mean()
    out["kl"] = mm.mean(rlogp - logp)
    out["k3_kl"] = mm.mean(torch.exp(lr) - lr - 1)
    out["rollout_ppl"], out["rollout_log_ppl"] = torch.exp(-mr).mean(), (-mr).mean()
    d = mr - mt
    out["log_ppl_diff"], out["log_ppl_abs_diff"] = d.mean(), d.abs().mean()
    out["log_ppl_diff_max"], out["log_ppl_diff_min"] = d.max(), d.min()
    out["ppl_ratio"] = torch.exp(d).mean()
    out["chi2_token"] = mm.mean(torch.exp(lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)) ** 2) - 1.0
    out["chi2_seq"] = torch.exp(2.0 * mm.sum(lr, -1).clamp(-SAFETY_BOUND, SAFETY_BOUND)).mean() - 1.0


@torch.no_grad()
def verl_rollout_corr_metrics(log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, mask: torch.Tensor, *,
                              rollout_is: Optional[str] = None,
                              rollout_is_threshold: Union[str, float, None] = 2.0,
                              rollout_is_batch_normalize: bool = False, rollout_rs: Optional[str] = None,
                              rollout_rs_threshold: Union[str, float, None] = None) -> Dict[str, float]:
    """verl's ``rollout_corr/<key>`` metrics (Python floats) of the ratio π(log_prob)/π(rollout_log_prob)
    over the counted tokens of ``mask`` [B, T], for verl's ``RolloutCorrectionConfig`` fields; see the
    module docstring. ValueError if nothing is counted or the shapes differ (as verl)."""
    if log_prob.dim() != 2 or log_prob.shape != rollout_log_prob.shape or log_prob.shape != mask.shape:
        raise ValueError(f"log_prob, rollout_log_prob and mask must have one shape [B, T], got "
                         f"{tuple(log_prob.shape)}, {tuple(rollout_log_prob.shape)} and {tuple(mask.shape)}")
    m = mask != 0
    if not bool(m.any()):
        raise ValueError("response_mask must contain at least one valid token (1).")
    if rollout_rs is not None and rollout_rs_threshold is None:
        raise ValueError("rollout_rs_threshold must be explicitly provided when rollout_rs is enabled.")
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    logp = torch.where(m, log_prob.detach().to(dtype), 0.0)
    rlogp = torch.where(m, rollout_log_prob.detach().to(dtype), 0.0)
    lr = logp - rlogp
    mm = _Masked(m, dtype)
    out: Dict[str, torch.Tensor] = {}
    if rollout_is is not None and rollout_is_threshold is not None:
        _is_metrics(lr, mm, rollout_is, rollout_is_threshold, rollout_is_batch_normalize, out)
    if rollout_rs is not None:
        _rs_metrics(lr, mm, rollout_rs, rollout_rs_threshold, out)
    _offpolicy_metrics(logp, rlogp, lr, mm, out)
    values = torch.stack([v.to(dtype).reshape(()) for v in out.values()]).tolist()  # one host transfer
    return {f"rollout_corr/{k}": v for k, v in zip(out, values)}
