"""Eager PyTorch definitions of every fastpo op: the executable specification.

Readable and float64-capable; the Triton and CPU paths are tested against these functions. They
materialise full ``[N, V]`` tensors and are not meant to be fast.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["token_logprobs", "linear_token_logprobs"]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """Per-token log-probabilities (and entropies) of ``labels`` under ``softmax(logits / temperature)``.

    With s = z/τ:  logp = s_y − logsumexp(s);  entropy = logsumexp(s) − Σ_j softmax(s)_j · s_j.
    Rows whose label is ``ignore_index`` give 0 for both, with zero gradient.
    """
    s = logits.to(_accumulation_dtype(logits.dtype)) / temperature
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lse = torch.logsumexp(s, dim=-1)
    logp = s.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1) - lse
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    logp = torch.where(valid, logp, zero)
    if not return_entropy:
        return logp
    entropy = lse - (torch.softmax(s, dim=-1) * s).sum(dim=-1)
    return logp, torch.where(valid, entropy, zero)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """``token_logprobs(hidden @ weight.T + bias, labels)``, building the full logits tensor."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return token_logprobs(logits, labels, temperature, ignore_index, return_entropy)
