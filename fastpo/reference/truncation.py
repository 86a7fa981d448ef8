"""Reference top-k / top-p truncation (vLLM's sampler order): the kept set of each row, by sorting.

vLLM (``vllm/v1/sample/ops/topk_topp_sampler.py``, ``apply_top_k_top_p_pytorch``) applies, to the
tempered logits s = z/τ: top-k (keep s_j >= the k-th largest value, ties at it kept), then top-p on
q = softmax over the top-k survivors (ascending cumulative sum c; drop c <= 1 − p, always keep the
maximum). Without ties, keeping c_j > 1 − p is keeping  Σ_{l: s_l > s_j} q_l < p  (the mass strictly
above j), which is the rule used here, in value terms: a tie at the top-p threshold is kept whole
(vLLM keeps the sort-order-dependent part of it whose cumulative sum passes 1 − p).
The order of s equals the order of the raw logits x (τ > 0; the allowed transforms are increasing),
so the kept set is {x_j >= threshold} for one threshold per row.
"""

from __future__ import annotations

import torch


def keep_mask(x: torch.Tensor, s: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Bool ``[..., V]``: the entries vLLM's sampler keeps, from the raw logits ``x`` (the order) and the
    tempered logits ``s`` (the mass). ``top_k`` 0 and ``top_p`` 1.0 mean off."""
    with torch.no_grad():
        x, s = x.detach(), s.detach()
        keep = torch.ones_like(x, dtype=torch.bool)
        vocab = x.shape[-1]
        if 0 < top_k < vocab:
            kth = x.topk(top_k, dim=-1).values[..., -1:]
            keep = x >= kth
        if top_p < 1.0:
            q = torch.softmax(s.masked_fill(~keep, float("-inf")).double(), dim=-1)
            xs, order = x.sort(dim=-1, descending=True)
            qs = q.gather(-1, order)
            before = torch.cumsum(qs, dim=-1) - qs  # mass of the entries sorted before each one
            # the mass strictly above a value is that of the first entry of its tie group
            first = torch.searchsorted(-xs.contiguous(), -xs.contiguous(), side="left")
            above = before.gather(-1, first)
            keep_sorted = above < top_p
            keep = keep & torch.zeros_like(keep).scatter(-1, order, keep_sorted)
        return keep
