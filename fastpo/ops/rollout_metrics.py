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

One pass over [B, T] forms a table of per-row sums (``fastpo.ops.rollout_row_stats``: C++ for CPU tensors,
torch otherwise); every metric is finished from it over [B] in float64, with one host transfer at the end.
Padding is selected away before any arithmetic, so NaN or inf there changes nothing.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch

from fastpo.ops.rollout_correction import SAFETY_BOUND, parse_rejection
from fastpo.ops.rollout_row_stats import COLUMNS, OPTION_COLUMNS, ISBounds, RejectionStat, row_table

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


_COL = {k: i for i, k in enumerate(COLUMNS)}
_OPT = {k: i for i, k in enumerate(OPTION_COLUMNS)}
_EPS = 1e-8


class _Rows:
    """The batch reductions of a row table (rollout_row_stats): verl_F.masked_mean over the counted tokens
    is Σ / (n + 1e-8); row means Σ_b / (n_b + 1e-8); non-empty rows are the ``valid`` ones."""

    def __init__(self, table: torch.Tensor):
        self.t = table
        self.n_row = table[:, _COL["n"]]
        self.n = self.n_row.sum()
        self.valid = self.n_row > 0
        self.n_valid = self.valid.sum()
        self.zero = table.new_zeros(())

    def col(self, name, j=None):
        return self.t[:, _COL[name] if j is None else len(COLUMNS) + len(OPTION_COLUMNS) * j + _OPT[name]]

    def mean(self, row_sums):
        return row_sums.sum() / (self.n + _EPS)

    def row_mean(self, row_sums):
        return row_sums / (self.n_row + _EPS)

    def std(self, sum_c, sum_c2):
        """sqrt(max(E c² − (E c)², 0)) over the counted tokens, 0 for one token. The means divide by n itself,
        not verl's n + 1e-8: in float64 that 1e-8 would leave a constant c a std of ~sqrt(1e-8 / n), which
        verl's float32 rounds away."""
        n = self.n.clamp(min=1.0)
        mc = sum_c.sum() / n
        return torch.where(self.n > 1, (sum_c2.sum() / n - mc * mc).clamp(min=0.0).sqrt(), 0.0)

    def vmax(self, v):
        return torch.where(self.valid, v, -math.inf).amax()

    def vmin(self, v):
        return torch.where(self.valid, v, math.inf).amin()

    def row_stats(self, s, prefix, out):
        """mean, std (unbiased; 0 for one row), max, min of the per-row values ``s`` over non-empty rows."""
        v, nv = self.valid, self.n_valid
        mean = torch.where(v, s, 0.0).sum() / nv
        var = torch.where(v, (s - mean) ** 2, 0.0).sum() / (nv - 1).clamp(min=1)
        out[f"{prefix}_seq_mean"] = mean
        out[f"{prefix}_seq_std"] = torch.where(nv > 1, var.sqrt(), 0.0)
        out[f"{prefix}_seq_max"], out[f"{prefix}_seq_min"] = self.vmax(s), self.vmin(s)

    def row_frac(self, cond):
        return (cond & self.valid).sum() / self.n_valid


def _is_metrics(rows: _Rows, level, upper, lower, batch_normalize, out):
    lo = 1.0 / upper if lower is None else lower
    p, n_b = "rollout_is", rows.n_row
    if level == "token":
        sum_w, sum_w2, sum_raw, oob = (rows.col(k) for k in ("sum_w", "sum_w2", "sum_raw", "oob"))
        out[f"{p}_mean"] = rows.mean(sum_w)
        out[f"{p}_ratio_fraction_high"] = rows.mean(rows.col("high"))
        out[f"{p}_ratio_fraction_low"] = rows.mean(rows.col("low"))
        out[f"{p}_max"], out[f"{p}_min"] = rows.vmax(rows.col("max_w")), rows.vmin(rows.col("min_w"))
    else:  # one weight per row from e^{Σ d}; over all rows (an empty row has Σ d = 0), in log space
        lsum = rows.col("sum_delta")
        raw = torch.exp(lsum.clamp(-SAFETY_BOUND, SAFETY_BOUND))
        inside = (raw >= lower) & (raw <= upper) if lower is not None else None
        w = raw.clamp(max=upper) if lower is None else torch.where(inside, raw, 0.0)
        sum_w, sum_w2, sum_raw = n_b * w, n_b * w * w, n_b * raw
        oob = n_b * (~inside).double() if lower is not None else None
        out[f"{p}_max"] = torch.exp(lsum.max().clamp(max=SAFETY_BOUND))
        out[f"{p}_min"] = torch.exp(lsum.min())
        out[f"{p}_mean"] = rows.mean(sum_w)
        out[f"{p}_ratio_fraction_high"] = (lsum > math.log(upper)).double().mean()
        out[f"{p}_ratio_fraction_low"] = (lsum < math.log(lo)).double().mean()
    # c = clamp(w, 0, upper) is w itself (w <= upper in both modes)
    mc = rows.mean(sum_w)
    out[f"{p}_std"] = rows.std(sum_w, sum_w2)
    out[f"{p}_eff_sample_size"] = 1.0 / (rows.mean(sum_w2) / (mc + _EPS) ** 2)
    means = rows.row_mean(sum_w)  # over every row, empty ones giving 0 (verl)
    out[f"{p}_seq_mean"] = means.mean()
    out[f"{p}_seq_std"] = means.std() if means.numel() > 1 else rows.zero
    out[f"{p}_seq_max"], out[f"{p}_seq_min"] = means.max(), means.min()
    out[f"{p}_seq_max_deviation"] = (means - 1.0).abs().max()
    raw_means = rows.row_mean(sum_raw)
    out[f"{p}_seq_fraction_high"] = (raw_means > upper).double().mean()
    out[f"{p}_seq_fraction_low"] = (raw_means < lo).double().mean()
    if lower is not None:
        out[f"{p}_oob_ratio"] = rows.mean(oob)
    if batch_normalize:  # the mean weight; global over the default process group when one is initialised
        vf = rows.valid.double()
        stats = torch.stack([sum_w.sum(), rows.n] if level == "token" else [(means * vf).sum(), vf.sum()])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            stats = stats.float()  # verl reduces float32 sums
            torch.distributed.all_reduce(stats)
            mean = stats[0].double() / stats[1].double()
        else:
            mean = stats[0] / (stats[1] + _EPS if level == "token" else stats[1].clamp_min(_EPS))
        out[f"{p}_batch_norm_factor"] = torch.where(mean > _EPS, mean, 1.0)


def _rejection_stats(rules) -> list:
    """The C++ / torch pass's option records of parse_rejection's [(option, log-lower or None, upper)]."""
    kinds = {"k1": 1, "k2": 2, "k3": 3}
    return [RejectionStat(kinds[opt[-2:]], 0.0 if lo is None else lo, hi, lo is not None, opt.startswith("token_"))
            for opt, lo, hi in rules]


def _rs_metrics(rows: _Rows, rules, out):
    n_b, valid = rows.n_row, rows.valid
    rejected_rows = torch.zeros_like(valid)  # rows a sequence-level option rejects
    for j, (opt, lo_log, hi) in enumerate(rules):
        level = opt.rsplit("_", 1)[0]
        is_k1, p = lo_log is not None, f"rollout_rs_{opt}"
        lower = lo_log if is_k1 else 0.0
        sum_s = rows.col("sum_s", j)
        if level == "token":
            vals = rows.row_mean(sum_s)
            out[f"{p}_mean"] = rows.mean(sum_s)
            out[f"{p}_max"], out[f"{p}_min"] = rows.vmax(rows.col("max_s", j)), rows.vmin(rows.col("min_s", j))
            out[f"{p}_fraction_high"] = rows.mean(rows.col("above", j))
            out[f"{p}_fraction_low"] = rows.mean(rows.col("below", j)) if is_k1 else rows.zero
            out[f"{p}_std"] = rows.std(rows.col("sum_c", j), rows.col("sum_c2", j))
            dropped = rows.col("rejected", j)
            drops_row = dropped > 0
        else:
            if level == "seq_sum":
                vals = sum_s
            elif level == "seq_mean":
                vals = rows.row_mean(sum_s)
            else:  # seq_max: an empty row gives 0
                vals = torch.where(valid, rows.col("max_s", j), 0.0)
            keep = (vals >= lower) & (vals <= hi) if is_k1 else vals <= hi
            out[f"{p}_mean"] = rows.mean(n_b * vals)
            out[f"{p}_max"], out[f"{p}_min"] = rows.vmax(vals), rows.vmin(vals)
            out[f"{p}_fraction_high"] = rows.row_frac(vals > hi)
            out[f"{p}_fraction_low"] = rows.row_frac(vals < lower) if is_k1 else rows.zero
            c = vals.clamp(min=lower, max=hi)
            out[f"{p}_std"] = rows.std(n_b * c, n_b * c * c)
            dropped, drops_row = n_b * (~keep).double(), ~keep
            rejected_rows |= ~keep
        rows.row_stats(vals, p, out)
        out[f"{p}_seq_max_deviation"] = rows.vmax(vals.abs())
        out[f"{p}_seq_fraction_high"] = rows.row_frac(vals > hi)
        if is_k1:
            out[f"{p}_seq_fraction_low"] = rows.row_frac(vals < lower)
        out[f"{p}_masked_fraction"] = rows.mean(dropped)
        out[f"{p}_seq_masked_fraction"] = rows.row_frac(drops_row)
    dropped = torch.where(rejected_rows, n_b, rows.col("any_rejected"))
    out["rollout_rs_masked_fraction"] = rows.mean(dropped)
    out["rollout_rs_seq_masked_fraction"] = (dropped > 0).double().mean()


def _offpolicy_metrics(rows: _Rows, out):
    mt, mr = rows.row_mean(rows.col("sum_logp")), rows.row_mean(rows.col("sum_rollout"))
    sum_d = rows.col("sum_delta")
    out["training_ppl"], out["training_log_ppl"] = torch.exp(-mt).mean(), (-mt).mean()
    out["kl"] = -rows.mean(sum_d)
    out["k3_kl"] = rows.mean(rows.col("sum_k3"))
    out["rollout_ppl"], out["rollout_log_ppl"] = torch.exp(-mr).mean(), (-mr).mean()
    d = -rows.row_mean(sum_d)  # mean rollout − mean logp per row, from the one sum of differences
    out["log_ppl_diff"], out["log_ppl_abs_diff"] = d.mean(), d.abs().mean()
    out["log_ppl_diff_max"], out["log_ppl_diff_min"] = d.max(), d.min()
    out["ppl_ratio"] = torch.exp(d).mean()
    out["chi2_token"] = rows.mean(rows.col("sum_ratio2")) - 1.0
    out["chi2_seq"] = torch.exp(2.0 * sum_d.clamp(-SAFETY_BOUND, SAFETY_BOUND)).mean() - 1.0


@torch.no_grad()
def verl_rollout_corr_metrics(log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, mask: torch.Tensor, *,
                              rollout_is: Optional[str] = None,
                              rollout_is_threshold: Union[str, float, None] = 2.0,
                              rollout_is_batch_normalize: bool = False, rollout_rs: Optional[str] = None,
                              rollout_rs_threshold: Union[str, float, None] = None,
                              backend: Optional[str] = None) -> Dict[str, float]:
    """verl's ``rollout_corr/<key>`` metrics (Python floats) of the ratio π(log_prob)/π(rollout_log_prob)
    over the counted tokens of ``mask`` [B, T], for verl's ``RolloutCorrectionConfig`` fields; see the
    module docstring. ``backend``: the row pass's path ("cpp" / "torch"; None picks, see
    rollout_row_stats.row_table). ValueError if nothing is counted or the shapes differ (as verl)."""
    if log_prob.dim() != 2 or log_prob.shape != rollout_log_prob.shape or log_prob.shape != mask.shape:
        raise ValueError(f"log_prob, rollout_log_prob and mask must have one shape [B, T], got "
                         f"{tuple(log_prob.shape)}, {tuple(rollout_log_prob.shape)} and {tuple(mask.shape)}")
    m = mask if mask.dtype == torch.bool else mask != 0
    if not bool(m.any()):
        raise ValueError("response_mask must contain at least one valid token (1).")
    if rollout_rs is not None and rollout_rs_threshold is None:
        raise ValueError("rollout_rs_threshold must be explicitly provided when rollout_rs is enabled.")
    with_is = rollout_is is not None and rollout_is_threshold is not None
    if with_is and rollout_is not in ("token", "sequence"):
        raise ValueError(f"Invalid rollout_is: {rollout_is}. Must be one of {{'token', 'sequence'}}.")
    upper, lower = parse_is_threshold(rollout_is_threshold) if with_is else (2.0, None)
    rules = parse_rejection(rollout_rs, rollout_rs_threshold) if rollout_rs is not None else []
    bounds = ISBounds(upper, 0.0 if lower is None else lower, 1.0 / upper if lower is None else lower,
                      lower is not None)
    rows = _Rows(row_table(log_prob, rollout_log_prob, m, bounds, _rejection_stats(rules), backend=backend))
    out: Dict[str, torch.Tensor] = {}
    if with_is:
        _is_metrics(rows, rollout_is, upper, lower, rollout_is_batch_normalize, out)
    if rules:
        _rs_metrics(rows, rules, out)
    _offpolicy_metrics(rows, out)
    values = torch.stack([v.double().reshape(()) for v in out.values()]).tolist()  # one host transfer
    return {f"rollout_corr/{k}": v for k, v in zip(out, values)}
