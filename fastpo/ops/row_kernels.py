"""The log-prob row kernels of one backend: ``logprob_forward`` and ``logprob_backward``.

Both backends share one contract (see ``fastpo.kernels.logprobs``): rows of ``logits [N, V]`` with
a contiguous last dimension, ``labels [N]`` int64, and results in float32 (float64 for float64).
"""

from __future__ import annotations

from types import ModuleType

from fastpo._backend import kernel_module
from fastpo._layout import accumulation_dtype


# Log-probs, entropies and lse are float32, or float64 for float64 inputs (for gradcheck).
result_dtype = accumulation_dtype


def row_kernels(backend: str) -> ModuleType:
    return kernel_module(backend, triton="fastpo.kernels.logprobs", cpu="fastpo.ops.cpu_logprobs", what="row")
