"""Argument checks of the preference losses (``fastpo.preference``, ``fastpo.dpo``).

They trace under ``torch.compile(fullgraph=True, dynamic=True)``: shapes are compared pairwise (no
hashing of symbolic sizes), and a scalar hyperparameter is only type-checked while Dynamo traces:
inside a trace a dynamic float (a ``SymFloat``) looks like a Python float, and testing its range
would specialise the graph on it. The range checks run on every eager call. A traced value is never
branched on, so no value of β, ε, γ, ... forces a recompile.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch

from fastpo import _validation as check

SYMBOLIC = (torch.SymFloat, torch.SymInt)


def traced(value) -> bool:
    """True for a scalar whose value must not be inspected: a SymFloat, or any number while Dynamo traces
    (inside a trace a dynamic float looks like a plain float, and comparing it would specialise it)."""
    return isinstance(value, SYMBOLIC) or torch.compiler.is_compiling()


def real(value, name: str, *, low: Optional[float] = None, low_open: bool = False,
         high: Optional[float] = None, high_open: bool = False, interval: Optional[str] = None):
    """A finite real number within the given bounds; while traced, only its type is checked."""
    if isinstance(value, SYMBOLIC):
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if torch.compiler.is_compiling():
        return value
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        if interval is None:
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            interval = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def positive(value, name: str):
    """A finite real number > 0."""
    return real(value, name, low=0.0, low_open=True, interval="(0, inf)")


def same_shape(**tensors: Optional[torch.Tensor]) -> None:
    """Floating tensors (None skipped) of one shape on one device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    for name, t in present.items():
        check.check_float_tensor(t, name)
    first = next(iter(present.values()))
    if any(tuple(t.shape) != tuple(first.shape) for t in present.values()):
        seen = ", ".join(f"{name} {check.shape_of(t)}" for name, t in present.items())
        raise ValueError(f"log-prob arguments must have one shape, got {seen}")
    check.check_same_device(**present)


def like(t, name: str, ref: torch.Tensor, ref_name: str, *, integer_ok: bool = False) -> None:
    """``t`` is a tensor shaped like ``ref`` on its device (floating, or also integer when allowed)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    allowed = check.FLOAT_DTYPES + (check.INT_DTYPES if integer_ok else ())
    if t.dtype not in allowed:
        kind = "floating-point or integer" if integer_ok else "floating-point"
        raise TypeError(f"{name} must be a {kind} tensor, got dtype {t.dtype}")
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"{name} must have the shape of {ref_name}, got {name} {check.shape_of(t)} "
                         f"and {ref_name} {check.shape_of(ref)}")
    check.check_same_device(**{ref_name: ref, name: t})


def scalar_tensor(t, name: str, ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    """A floating tensor holding one value, on ``ref``'s device; returned 0-d."""
    check.check_float_tensor(t, name)
    if t.numel() != 1:
        raise ValueError(f"{name} must hold one value, got shape {check.shape_of(t)}")
    check.check_same_device(**{ref_name: ref, name: t})
    return t.reshape(())


choice = check.check_choice
