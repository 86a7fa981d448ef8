"""The log-prob row kernels of one backend: ``logprob_forward`` and ``logprob_backward``.

Both backends share one contract (see ``fastpo.kernels.logprobs``): rows of ``logits [N, V]`` with
a contiguous last dimension, ``labels [N]`` int64, and results in float32 (float64 for float64).
"""

from __future__ import annotations

from types import ModuleType

from fastpo._layout import accumulation_dtype


# Log-probs, entropies and lse are float32, or float64 for float64 inputs (for gradcheck).
result_dtype = accumulation_dtype


def row_kernels(backend: str) -> ModuleType:
    if backend == "triton":
        from fastpo.kernels import logprobs

        return logprobs
    if backend == "cpu":
        from fastpo.ops import cpu_logprobs

        return cpu_logprobs
    raise ValueError(f"no row kernels for backend {backend!r} (expected 'triton' or 'cpu')")
