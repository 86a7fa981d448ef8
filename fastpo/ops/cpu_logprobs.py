"""CPU path of the log-prob row kernels: the C++ kernels of ``fastpo._C`` on CPU tensors.

Same contract as the Triton launchers in ``fastpo.kernels.logprobs``. Tensors reach C++ zero-copy
through NumPy views (``tensor.numpy()`` shares memory); bfloat16/float16 travel as their 16-bit
patterns. The kernels stream each row once (no ``[N, V]`` temporaries) and run rows in parallel.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastpo import _C
from fastpo.ops.row_kernels import EXTRA_MEAN, EXTRA_SUM_SQ, EXTRA_TOP1, extra_outputs, result_dtype

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


def _as_numpy(t: Optional[torch.Tensor]):
    """A NumPy view sharing ``t``'s memory (16-bit floats as int16 bit patterns)."""
    if t is None:
        return None
    if t.requires_grad:  # detach() costs ~0.6 us; the kernels' own buffers never need it
        t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return t.numpy()


def logprob_forward(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
                    with_entropy: bool, extras: int = 0, logit_softcap: float = 0.0, logit_scale: float = 1.0,
                    inv_temperature_rows: Optional[torch.Tensor] = None, threshold_rows: Optional[torch.Tensor] = None):
    """``inv_temperature_rows`` ([N] float32/64, optional): a per-row 1/τ replacing ``1/temperature``;
    ``threshold_rows`` ([N], optional): raw logits below the row's threshold count as −inf (truncation)."""
    if logits.dim() == 3:  # [B, T, V] blocks: one call per [T, V] block
        return _per_block_forward(logits, labels, temperature, ignore_index, with_entropy, extras, logit_softcap,
                                  logit_scale, inv_temperature_rows, threshold_rows)
    n_rows = logits.shape[0]
    logp = torch.empty(n_rows, dtype=result_dtype(logits.dtype))
    row_max = torch.empty_like(logp)
    log_norm = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else torch.zeros_like(logp)
    extra = extra_outputs(logp, extras)
    if n_rows:
        sum_sq, top1, mean = (_as_numpy(t) if extras & bit else None
                              for t, bit in zip(extra, (EXTRA_SUM_SQ, EXTRA_TOP1, EXTRA_MEAN))) if extras \
            else (None, None, None)
        # positional arguments: pybind11's keyword matching costs ~1 us a call
        _C.logprob_forward(
            _as_numpy(logits), _as_numpy(labels), _as_numpy(logp), _as_numpy(row_max), _as_numpy(log_norm),
            _as_numpy(entropy) if with_entropy else None,
            1.0 / temperature, ignore_index, _DTYPE_NAMES[logits.dtype],
            sum_sq, top1, mean, logit_scale, logit_softcap,  # log_sum_sq_probs, is_top1, mean_logits
            _as_numpy(inv_temperature_rows), _as_numpy(threshold_rows),
        )
    return (logp, entropy, row_max, log_norm) + extra


def logprob_backward(logits: torch.Tensor, labels: torch.Tensor, row_max: torch.Tensor, log_norm: torch.Tensor,
                     entropy: torch.Tensor, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                     temperature: float, ignore_index: int, out: torch.Tensor, logit_softcap: float = 0.0,
                     logit_scale: float = 1.0, inv_temperature_rows: Optional[torch.Tensor] = None,
                     threshold_rows: Optional[torch.Tensor] = None) -> None:
    if logits.dim() == 3:
        n = logits.shape[1]
        for b in range(logits.shape[0]):
            rows = slice(b * n, (b + 1) * n)
            logprob_backward(logits[b], labels[rows], row_max[rows], log_norm[rows], entropy[rows],
                             None if grad_logp is None else grad_logp[rows],
                             None if grad_entropy is None else grad_entropy[rows], temperature, ignore_index, out[b],
                             logit_softcap, logit_scale,
                             None if inv_temperature_rows is None else inv_temperature_rows[rows],
                             None if threshold_rows is None else threshold_rows[rows])
        return
    if logits.shape[0] == 0:
        return
    _C.logprob_backward(
        _as_numpy(logits), _as_numpy(labels), _as_numpy(row_max), _as_numpy(log_norm), _as_numpy(entropy),
        _as_numpy(grad_logp), _as_numpy(grad_entropy), _as_numpy(out),
        1.0 / temperature, ignore_index, _DTYPE_NAMES[logits.dtype], logit_scale, logit_softcap,
        _as_numpy(inv_temperature_rows), _as_numpy(threshold_rows),
    )


def _per_block_forward(logits, labels, temperature, ignore_index, with_entropy, extras, softcap, scale, inv_t_rows,
                       thr_rows):
    n = logits.shape[1]

    def part(t, b):
        return None if t is None else t[b * n:(b + 1) * n]

    parts = [logprob_forward(logits[b], part(labels, b), temperature, ignore_index, with_entropy, extras,
                             softcap, scale, part(inv_t_rows, b), part(thr_rows, b))
             for b in range(logits.shape[0])]
    if not parts:
        return logprob_forward(logits.reshape(0, logits.shape[-1]), labels, temperature, ignore_index, with_entropy,
                               extras, softcap, scale, inv_t_rows, thr_rows)
    return tuple(torch.cat(column) for column in zip(*parts))
