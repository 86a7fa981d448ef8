"""The per-row sums behind verl's ``rollout_corr/*`` diagnostics, as one [B, F] float64 table: the C++ pass
(``csrc/rollout_stats.h``, one read of the batch) or torch (the reference, and the path for other devices).
``fastpo.ops.rollout_metrics`` finishes every batch metric from it.

Over the counted tokens of row b (padding selected to logp = rollout = 0 first), with d = logp − rollout
in the input dtype and dc = clamp(d, ±20), raw = e^dc and w = min(raw, upper) (TIS) or raw·1[lower <= raw
<= upper] (IcePop), the columns are (``COLUMNS``): n, Σ logp, Σ rollout, Σ d, Σ (e^d − d − 1), Σ raw², Σ w,
Σ w², max w, min w, #(raw > upper), #(raw < lo), Σ raw, #(raw outside [lower, upper]), #(tokens rejected
by any token-level option); then per rejection option (statistic s = −dc, ½dc² or e^dc − 1 − dc, bounds
[lo, hi]; ``OPTION_COLUMNS``): Σ s, Σ c, Σ c² (c = clamp(s, lo, hi)), max s, min s, #(s > hi), #(s < lo),
#(rejected). Max / min of an empty row are −inf / +inf.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from fastpo.ops.rollout_correction import SAFETY_BOUND  # verl's log-ratio clamp (20)

try:
    from fastpo import _C
except ImportError:  # no C++ build: the torch path
    _C = None

__all__ = ["COLUMNS", "OPTION_COLUMNS", "ISBounds", "RejectionStat", "row_table"]

COLUMNS = ("n", "sum_logp", "sum_rollout", "sum_delta", "sum_k3", "sum_ratio2", "sum_w", "sum_w2", "max_w", "min_w",
           "high", "low", "sum_raw", "oob", "any_rejected")
OPTION_COLUMNS = ("sum_s", "sum_c", "sum_c2", "max_s", "min_s", "above", "below", "rejected")


class ISBounds(NamedTuple):
    """The IS weight's bounds: upper, lower (IcePop; 0 for TIS), lo (the "low" fraction's bound), icepop."""
    upper: float
    lower: float
    lo: float
    icepop: bool


class RejectionStat(NamedTuple):
    """One rejection option: kind 1..3 (k1..k3), bounds [lo, hi], whether lo is kept too (k1) and whether
    its rejections are per token."""
    kind: int
    lo: float
    hi: float
    two_sided: bool
    token_level: bool


def _fused(logp, rollout, mask) -> bool:
    if _C is None or torch.compiler.is_compiling():
        return False
    return (logp.device.type == "cpu" and logp.dtype in (torch.float32, torch.float64) and rollout.dtype == logp.dtype
            and rollout.device.type == "cpu" and mask.device.type == "cpu")


def _flat(t: torch.Tensor):
    return t.detach().contiguous().reshape(-1).numpy()


def row_table(logp: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor, bounds: ISBounds,
              options: List[RejectionStat], *, backend: Optional[str] = None) -> torch.Tensor:
    """The [B, len(COLUMNS) + 8·len(options)] float64 table (see the module docstring) of [B, T] inputs and a
    bool mask; ``backend`` "cpp" / "torch" forces a path (None: C++ for CPU float32/float64 tensors)."""
    if backend not in (None, "cpp", "torch"):
        raise ValueError(f"backend must be None, 'cpp' or 'torch', got {backend!r}")
    use_cpp = _fused(logp, rollout, mask) if backend is None else backend == "cpp"
    if use_cpp:
        if not _fused(logp, rollout, mask):
            raise ValueError("backend='cpp' needs the C++ extension and CPU float32/float64 tensors of one dtype")
        B, T = logp.shape
        table = _C.rollout_row_stats(_flat(logp), _flat(rollout), _flat(mask.to(torch.bool)), B, T, *bounds,
                                     SAFETY_BOUND, [tuple(o) for o in options])
        return torch.from_numpy(table)
    return _torch_table(logp, rollout, mask.to(torch.bool), bounds, options)


def _torch_table(logp, rollout, m, bounds: ISBounds, options) -> torch.Tensor:
    dtype = torch.promote_types(logp.dtype, torch.float32)
    x = torch.where(m, logp.detach().to(dtype), 0.0)
    r = torch.where(m, rollout.detach().to(dtype), 0.0)
    c = m.to(dtype)
    d = x - r
    dc = d.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    raw = torch.exp(dc)
    inf = torch.tensor(float("inf"), dtype=dtype)
    if bounds.icepop:
        w = torch.where((raw >= bounds.lower) & (raw <= bounds.upper), raw, 0.0)
    else:
        w = raw.clamp(max=bounds.upper)
    inside = (raw >= bounds.lower) & (raw <= bounds.upper)

    def total(v):
        return v.sum(-1, dtype=torch.float64)

    def count(b):
        return total(c * b.to(dtype))

    cols = [total(c), total(x), total(r), total(d), total(c * ((torch.exp(d) - d) - 1.0)), total(c * (raw * raw)),
            total(c * w), total(c * (w * w)), torch.where(m, w, -inf).amax(-1).double(),
            torch.where(m, w, inf).amin(-1).double(), count(raw > bounds.upper), count(raw < bounds.lo),
            total(c * raw), count(~inside)]
    any_rejected = torch.zeros_like(m)
    per_option = []
    for o in options:
        s = -dc if o.kind == 1 else 0.5 * (dc * dc) if o.kind == 2 else (torch.exp(dc) - 1.0) - dc
        cl = s.clamp(min=o.lo, max=o.hi)
        keep = (s >= o.lo) & (s <= o.hi) if o.two_sided else s <= o.hi
        drop = m & ~keep
        if o.token_level:
            any_rejected |= drop
        per_option += [total(c * s), total(c * cl), total(c * (cl * cl)), torch.where(m, s, -inf).amax(-1).double(),
                       torch.where(m, s, inf).amin(-1).double(), count(s > o.hi), count(s < o.lo), count(drop)]
    cols.append(count(any_rejected))
    return torch.stack(cols + per_option, dim=1)
