"""The LM-head call the verl and OpenRLHF adapters share: ``linear_token_logprobs`` in the dtype the
trainer's own ``hidden @ W.T`` would have used."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch

import fastpo


def is_dtensor(x: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(x, DTensor)


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                  bias: Optional[torch.Tensor] = None, temperature: float = 1.0, return_entropy: bool = False):
    """``linear_token_logprobs(hidden, weight, labels)``: under autocast hidden, weight and bias are cast to the
    autocast dtype (as the trainer's matmul would) and fastpo runs with autocast off; otherwise as given.
    Returns float32 log-probs (and entropies), shaped like ``labels``."""
    device = hidden.device.type
    autocast = torch.is_autocast_enabled(device)
    if autocast:
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device, enabled=False) if autocast else nullcontext():
        return fastpo.linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=float(temperature),
                                            return_entropy=return_entropy)
