"""The log-prob row-kernel contract (``fastpo.kernels.logprobs``) in eager torch: the row kernels of
``fastpo.ops.vocab_parallel`` under ``FASTPO_BACKEND=reference``."""

from __future__ import annotations

import torch

from fastpo.ops.row_kernels import EXTRA_MEAN, EXTRA_SUM_SQ, EXTRA_TOP1
from fastpo.reference.logprobs import transform_logits

__all__ = ["TorchRows"]


class TorchRows:
    """The row-kernel contract (``fastpo.kernels.logprobs``) in eager torch, for ``FASTPO_BACKEND=reference``:
    [N, V] rows, the same statistics (m = max z, ℓ = log Σ e^{(z − m)/τ}) and backward formula; raw logits
    below ``threshold_rows`` count as −inf (a dropped label: logp = −inf, no g_l)."""

    @staticmethod
    def _masked(x, softcap, scale, threshold_rows):
        z = transform_logits(x.detach(), softcap or None, scale)
        if threshold_rows is None:
            return z, z
        kept = transform_logits(x.detach()) >= threshold_rows.unsqueeze(-1)
        return torch.where(kept, z, torch.full_like(z, float("-inf"))), z

    @staticmethod
    def logprob_forward(x, labels, tau, ignore_index, with_entropy, extras=0, softcap=0.0, scale=1.0,
                        inv_temperature_rows=None, threshold_rows=None):
        z, _ = TorchRows._masked(x, softcap, scale, threshold_rows)
        inv = 1.0 / tau if inv_temperature_rows is None else inv_temperature_rows.to(z.dtype)
        valid = labels != ignore_index
        safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
        m = z.max(-1).values if z.shape[0] else z.new_zeros(0)
        m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
        u = (z - m.unsqueeze(-1)) * (inv if isinstance(inv, float) else inv.unsqueeze(-1))
        log_norm = torch.logsumexp(u, -1)
        zy = z.gather(-1, safe).squeeze(-1)
        p = torch.exp(u - log_norm.unsqueeze(-1))
        zero = torch.zeros_like(m)
        entropy = (log_norm - (p * torch.where(p > 0, u, torch.zeros_like(u))).sum(-1)).clamp_min(0)
        out = [(zy - m) * inv - log_norm, entropy if with_entropy else zero, m, log_norm,
               torch.logsumexp(2 * u, -1) - 2 * log_norm, (z.argmax(-1) == safe.squeeze(-1)).to(m.dtype),
               z.sum(-1) * inv / max(z.shape[-1], 1)]
        for i, bit in ((4, EXTRA_SUM_SQ), (5, EXTRA_TOP1), (6, EXTRA_MEAN)):
            if not extras & bit:
                out[i] = zero
        return tuple(torch.where(valid, t, zero) for t in out)

    @staticmethod
    def logprob_backward(x, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, tau, ignore_index, out,
                         softcap=0.0, scale=1.0, inv_temperature_rows=None, threshold_rows=None):
        z, z_raw = TorchRows._masked(x, softcap, scale, threshold_rows)
        inv = 1.0 / tau if inv_temperature_rows is None else inv_temperature_rows.to(z.dtype).unsqueeze(-1)
        valid = labels != ignore_index
        log_p = (z - row_max.unsqueeze(-1)) * inv - log_norm.unsqueeze(-1)
        p = torch.exp(log_p)
        grad = torch.zeros_like(z)
        if grad_logp is not None and threshold_rows is not None:  # a dropped label's logp is a constant
            label_x = transform_logits(x.detach()).gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
            grad_logp = torch.where(label_x < threshold_rows, torch.zeros_like(grad_logp), grad_logp)
        if grad_logp is not None:
            onehot = torch.nn.functional.one_hot(torch.where(valid, labels, 0), z.shape[-1]).to(z.dtype)
            grad = grad + grad_logp.unsqueeze(-1).to(z.dtype) * (onehot - p)
        if grad_entropy is not None:
            grad = grad - grad_entropy.unsqueeze(-1).to(z.dtype) * p * torch.where(
                p > 0, log_p + entropy.unsqueeze(-1), torch.zeros_like(p))
        grad = grad * inv * scale
        if softcap:
            grad = grad * (1 - (z_raw / softcap) ** 2)
        out.copy_(torch.where(valid.unsqueeze(-1), grad, torch.zeros_like(grad)))
