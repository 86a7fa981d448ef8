"""CPU path of the advantage estimators: the C++ GAE scan of ``fastpo._C`` on CPU tensors.

Same contract as the Triton launcher in ``fastpo.kernels.gae``. Tensors reach C++ zero-copy through
NumPy views (``tensor.numpy()`` shares memory); the scan runs sequences in parallel (OpenMP).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastpo import _C
from fastpo.ops.cpu_logprobs import _as_numpy


def gae_scan(rewards: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor], cu_seqlens: torch.Tensor,
             gamma: float, lam: float, *, max_len: Optional[int] = None, block: Optional[int] = None):
    """Advantages and returns of flat contiguous ``rewards``/``values`` (float32 or float64).

    ``max_len`` and ``block`` size the Triton launcher's blocks; accepted here for parity and ignored.
    """
    adv = torch.empty_like(rewards)
    ret = torch.empty_like(rewards)
    _C.gae(_as_numpy(rewards), _as_numpy(values), _as_numpy(mask), _as_numpy(cu_seqlens),
           _as_numpy(adv), _as_numpy(ret), float(gamma), float(lam))
    return adv, ret
