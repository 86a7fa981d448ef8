"""Argument checks shared by the public functions.

Every check runs before any kernel and never modifies its inputs. Shape and dtype checks are static
(they trace under ``torch.compile``); the data-dependent label range check runs inside the custom
op, which ``torch.compile`` treats as opaque. So do value checks of float hyperparameters while
tracing (:func:`is_tracing`): reading a symbolic float would specialise the graph on its value, so
it is handed to the op as a tensor (:func:`scalar_tensor`) and checked there.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def shape_of(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_tensor(x, name: str, *, dtypes, kind: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must be a {kind} tensor, got dtype {x.dtype} with shape {shape_of(x)}")
    return x


def check_float_tensor(x, name: str) -> torch.Tensor:
    return check_tensor(x, name, dtypes=FLOAT_DTYPES, kind="floating-point (float16/bfloat16/float32/float64)")


def check_int_tensor(x, name: str) -> torch.Tensor:
    return check_tensor(x, name, dtypes=INT_DTYPES, kind="integer")


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        seen = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {seen}")


def is_tracing() -> bool:
    """True while ``torch.compile`` traces: Python scalars may then be symbolic (SymFloat/SymInt), and
    reading their value (``float(x)``, ``x > 0``) would specialise the graph on it."""
    return torch.compiler.is_compiling()


def plain_eager() -> bool:
    """True in plain eager mode: not tracing, and no dispatch mode (FakeTensorMode, a FLOP counter),
    torch-function mode (a ``torch.device`` context) or functorch transform active."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active())


_SCALARS: dict = {}


def scalar_tensor(value) -> torch.Tensor:
    """A 0-d float64 CPU tensor holding the Python scalar ``value``, to hand a float hyperparameter to
    a custom op: under ``torch.compile`` it stays a graph input (no recompile per value; a float
    passed to a custom op as ``float`` is specialised). Built by arithmetic, which the compiler
    keeps symbolic (``torch.tensor(value)`` / ``torch.full`` specialise it). The op reads it with
    ``float(t)`` on the host: no device sync. In plain eager mode one tensor per value is kept (the ops
    never write it; ~3 us a call saved), outside inference mode so that autograd may save it."""
    if type(value) is not float or not plain_eager() or torch.is_inference_mode_enabled():  # (is_compiling first)
        return torch.zeros((), dtype=torch.float64) + value
    t = _SCALARS.get(value)
    if t is None:
        if len(_SCALARS) >= 256:
            _SCALARS.clear()
        t = _SCALARS[value] = torch.zeros((), dtype=torch.float64) + value
    return t


def check_temperature(temperature):
    """``temperature`` is a finite real > 0: returned as a float. While tracing only its type is
    checked and it is returned as given; the op checks the value at run time
    (:func:`check_temperature_value`)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if is_tracing():
        return temperature
    return check_temperature_value(float(temperature))


def check_temperature_value(temperature: float) -> float:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return temperature


def check_temperature_rows(temperature: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A per-token ``temperature`` tensor: floating, shaped like ``labels`` or broadcastable to it (e.g.
    ``[B, 1]``, one per sequence), on the labels' device; returned detached (not differentiable),
    expanded to ``labels.shape`` in ``dtype``. Its values (finite, > 0) are checked by the op at run
    time (:func:`check_temperature_rows_value`), also under ``torch.compile``."""
    if not temperature.is_floating_point():
        raise TypeError(f"temperature: a per-token temperature tensor must be floating point, got {temperature.dtype}")
    if temperature.device != labels.device:
        raise ValueError(f"temperature: expected a tensor on {labels.device} (the labels' device), got "
                         f"{temperature.device}")
    try:
        shape = torch.broadcast_shapes(temperature.shape, labels.shape)
    except RuntimeError:
        shape = None
    if shape != labels.shape:
        raise ValueError(f"temperature: a per-token temperature must have the labels' shape {tuple(labels.shape)} "
                         f"or broadcast to it, got shape {tuple(temperature.shape)}")
    return temperature.detach().to(dtype).expand(labels.shape)


def check_temperature_rows_value(temperature: torch.Tensor) -> None:
    """Every entry of a per-token temperature is finite and > 0 (one host sync on CUDA)."""
    if temperature.numel() and not bool(((temperature > 0) & torch.isfinite(temperature)).all()):
        bad = temperature[~((temperature > 0) & torch.isfinite(temperature))]
        raise ValueError(f"temperature must be finite and > 0 at every token, got {bad.numel()} entries that are "
                         f"not (first: {float(bad.reshape(-1)[0])})")


def check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def check_choice(value, name: str, choices) -> str:
    """``value`` is a str among ``choices`` (mode strings of every op and config)."""
    choices = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_aligned_labels(labels, rows: torch.Tensor, rows_name: str) -> None:
    """``labels [...]`` is an integer tensor shaped like ``rows [..., X]`` without its last dim."""
    check_int_tensor(labels, "labels")
    if tuple(labels.shape) != tuple(rows.shape[:-1]):
        raise ValueError(
            f"labels must have shape {rows_name}.shape[:-1] = {tuple(rows.shape[:-1])}, "
            f"got labels {shape_of(labels)} and {rows_name} {shape_of(rows)}"
        )


def check_logits_labels(logits, labels) -> None:
    """``logits [..., V]`` floating with V >= 1; ``labels [...]`` integer with the leading shape."""
    check_float_tensor(logits, "logits")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a last (vocabulary) dimension of size >= 1, got shape {shape_of(logits)}")
    check_aligned_labels(labels, logits, "logits")
    check_same_device(logits=logits, labels=labels)


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Every label lies in [0, vocab_size) or equals ignore_index (data-dependent: syncs on CUDA)."""
    if labels.numel() == 0:
        return
    if type(labels) is torch.Tensor and labels.is_cpu and labels.dtype == torch.int64 and labels.is_contiguous():
        # one C++ pass over N integers instead of five torch ops and a bool(any) (~8 us a call)
        from fastpo import _C

        flat = labels if labels.dim() == 1 else labels.view(-1)  # integer tensors never require grad
        count, first = _C.count_bad_labels(flat.numpy(), vocab_size, ignore_index)
    else:
        bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
        if not bool(bad.any()):
            return
        count, first = int(bad.sum()), labels[bad][0].item()
    if count:
        raise ValueError(
            f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {count} out of range (first: {first}) in labels of shape {shape_of(labels)}"
        )
