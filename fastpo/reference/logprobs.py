"""Reference log-probs: full ``[N, V]`` log-softmax, eager and float64-capable."""

from __future__ import annotations

from typing import Optional

import torch

from fastpo._layout import accumulation_dtype as _accumulation_dtype

__all__ = ["token_logprobs", "linear_token_logprobs"]


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
    p = torch.softmax(s, dim=-1)
    # −inf logits (a masked-out vocabulary) have p = 0 and contribute 0, not 0·(−inf)
    entropy = lse - (p * s.masked_fill(p == 0, 0)).sum(dim=-1)
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
