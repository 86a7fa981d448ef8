"""Which implementation runs an op: Triton for CUDA tensors, the CPU path for CPU tensors.

``FASTPO_BACKEND=triton|cpu|reference`` overrides the choice (the tests set ``triton`` together with
``TRITON_INTERPRET=1`` to run the Triton kernels on CPU tensors).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("triton", "cpu", "reference")


def select_backend(tensor: torch.Tensor) -> str:
    """The backend for an op whose inputs live on ``tensor.device``."""
    forced = os.environ.get("FASTPO_BACKEND", "").strip().lower()
    if not forced:
        return "triton" if tensor.is_cuda else "cpu"
    if forced not in BACKENDS:
        raise ValueError(f"FASTPO_BACKEND must be one of {BACKENDS}, got {forced!r}")
    if forced == "cpu" and tensor.device.type != "cpu":
        raise ValueError(f"FASTPO_BACKEND=cpu needs CPU tensors, got a tensor on {tensor.device}")
    if forced == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "FASTPO_BACKEND=triton needs CUDA tensors, or TRITON_INTERPRET=1 (set before triton is "
            f"imported) to run the kernels on CPU tensors; got a tensor on {tensor.device}"
        )
    return forced


def kernel_module(backend: str, *, triton: str, cpu: str, what: str) -> ModuleType:
    """The module holding an op's kernels for ``backend``: ``triton`` or ``cpu`` (dotted module names).

    Imported on first use, so that CPU-only use of fastpo never imports triton.
    """
    if backend not in ("triton", "cpu"):
        raise ValueError(f"no {what} kernels for backend {backend!r} (expected 'triton' or 'cpu')")
    return importlib.import_module(triton if backend == "triton" else cpu)
