"""``fastpo.whiten``: masked whitening with Bessel's correction (verl's ``masked_whiten``).

A plain differentiable composition of torch ops (no data-dependent branch, so it traces under
``torch.compile(fullgraph=True)``); ``weighted_whiten`` is shared with ``group_advantages``
(REINFORCE++ whitens per-sequence values weighted by their counted tokens).
"""

from __future__ import annotations

from numbers import Real
from typing import Optional

import torch

from fastpo import _validation as check
from fastpo._layout import accumulation_dtype
from fastpo._validation import shape_of

__all__ = ["whiten", "weighted_whiten", "check_eps"]


def check_eps(eps, name: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, Real):
        raise TypeError(f"{name} must be a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not (eps >= 0.0 and eps < float("inf")):
        raise ValueError(f"{name} must be finite and >= 0, got {eps}")
    return eps


def weighted_whiten(x: torch.Tensor, w: torch.Tensor, eps: float, shift_mean: bool = True) -> torch.Tensor:
    """(x − μ)·rsqrt(σ² + eps), μ = Σwx/Σw, σ² = Σw(x − μ)²/(Σw − 1); x − μ when Σw < 2 or σ² + eps = 0.

    Positions with w = 0 are selected out of the statistics (``torch.where``, not a product with 0), so
    a NaN or ±inf there never reaches μ or σ²; such a non-finite value is passed through unchanged
    (it is what (x − μ)·s gives) without entering the arithmetic, so it cannot poison the gradient.
    """
    counted = w != 0
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    n = w.sum()
    xs = torch.where(counted, x, zero)
    mean = (w * xs).sum() / n.clamp(min=1.0)
    var = (w * torch.where(counted, xs - mean, zero).square()).sum() / (n - 1.0).clamp(min=1.0)
    scale = var + eps
    ok = (n >= 2.0) & (scale > 0)  # scale 0: a flat input with eps = 0
    rs = torch.where(ok, torch.rsqrt(torch.where(ok, scale, torch.ones_like(scale))), torch.ones_like(scale))
    passthrough = ~counted & ~torch.isfinite(x)
    out = (torch.where(passthrough, zero, x) - mean) * rs
    if not shift_mean:
        out = out + mean
    return torch.where(passthrough, x, out)


def whiten(x: torch.Tensor, mask: Optional[torch.Tensor] = None, *, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``x`` with the mean and Bessel-corrected variance of its counted elements.

    ``(x − mean)·rsqrt(var + eps)``, as verl's ``masked_whiten``: every position is transformed, masked
    ones included, with the statistics of the counted ones (multiply by the mask if you want zeros
    there). ``shift_mean=False`` adds the mean back. With fewer than two counted elements the result
    is ``x − mean`` (``x`` itself when none is counted), and so is a flat input with ``eps=0``: no NaN,
    no exception. ``mask`` (bool, integer or floating, non-zero = counted) has the shape of ``x``.
    Masked positions never enter the statistics, whatever they hold: a NaN or ±inf there stays at its
    own (masked) position and reaches no counted output, nor the gradient. A non-finite *counted*
    element is data, and propagates. Returns float32 (float64 for float64 input); differentiable.
    """
    check.check_float_tensor(x, "x")
    check.check_bool(shift_mean, "shift_mean")
    eps = check_eps(eps)
    dtype = accumulation_dtype(x.dtype)
    if mask is None:
        w = torch.ones_like(x, dtype=dtype)
    else:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(x.shape):
            raise ValueError(f"mask must have the shape of x, got mask {shape_of(mask)} and x {shape_of(x)}")
        check.check_same_device(x=x, mask=mask)
        w = (mask != 0).to(dtype)
    return weighted_whiten(x.to(dtype), w, eps, shift_mean)
