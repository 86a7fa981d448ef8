"""``fastpo.token_logprobs``: per-token log-probs (and entropies) without a ``[N, V]`` softmax.

Layers: public function (validation, reshapes) → ``torch.library`` custom ops (autograd formula,
fake implementation) → row kernels of the selected backend (Triton or C++).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastpo import _validation as check
from fastpo import reference
from fastpo._backend import select_backend
from fastpo.ops.row_kernels import result_dtype, row_kernels

__all__ = ["token_logprobs"]


@torch.library.custom_op("fastpo::token_logprobs_fwd", mutates_args=())
def _token_logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
    with_entropy: bool, inplace_backward: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse) for ``logits [N, V]``; ``inplace_backward`` is read by the backward only."""
    check.check_label_range(labels, logits.shape[1], ignore_index)
    return row_kernels(backend).logprob_forward(logits, labels, temperature, ignore_index, with_entropy)


@_token_logprobs_fwd.register_fake
def _(logits, labels, temperature, ignore_index, with_entropy, inplace_backward, backend):
    out = logits.new_empty(logits.shape[0], dtype=result_dtype(logits.dtype))
    return out, torch.empty_like(out), torch.empty_like(out)


@torch.library.custom_op("fastpo::token_logprobs_bwd", mutates_args=())
def _token_logprobs_bwd(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
    grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
    temperature: float, ignore_index: int, backend: str,
) -> torch.Tensor:
    """∂L/∂logits as a new tensor of the logits' dtype."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    row_kernels(backend).logprob_backward(
        logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, grad)
    return grad


@_token_logprobs_bwd.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastpo::token_logprobs_bwd_inplace", mutates_args=("logits",))
def _token_logprobs_bwd_inplace(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
    grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
    temperature: float, ignore_index: int, backend: str,
) -> None:
    """∂L/∂logits written over ``logits`` itself (saves one ``[N, V]`` buffer)."""
    row_kernels(backend).logprob_backward(
        logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, logits)


@_token_logprobs_bwd_inplace.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, with_entropy, inplace_backward, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.temperature, ctx.ignore_index = temperature, ignore_index
    ctx.with_entropy, ctx.inplace_backward, ctx.backend = with_entropy, inplace_backward, backend


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    grad_logp = grad_logp.contiguous() if grad_logp is not None else None
    grad_entropy = grad_entropy.contiguous() if (ctx.with_entropy and grad_entropy is not None) else None
    args = (labels, lse, entropy, grad_logp, grad_entropy, ctx.temperature, ctx.ignore_index, ctx.backend)
    if ctx.inplace_backward:
        _token_logprobs_bwd_inplace(logits, *args)
        grad_logits = logits
    else:
        grad_logits = _token_logprobs_bwd(logits, *args)
    return grad_logits, None, None, None, None, None, None


torch.library.register_autograd("fastpo::token_logprobs_fwd", _backward, setup_context=_setup_context)


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
):
    """Log-probabilities of ``labels`` under ``softmax(logits / temperature)``, one per token.

    ``logits [..., V]`` (fp32/bf16/fp16/fp64) and ``labels [...]`` are aligned: label i scores row i
    (shift them yourself). With s = z/τ::

        logp    = s_y − logsumexp(s)
        entropy = logsumexp(s) − Σ_j softmax(s)_j · s_j          (when ``return_entropy``)

    Returns float32 tensors shaped like ``labels`` (float64 for float64 logits); ``ignore_index``
    labels give 0 and no gradient. Both outputs are differentiable. The full softmax is never
    materialised: the forward streams each row once, the backward writes ``g·(onehot − p)`` (plus
    the entropy term) block by block, into the logits buffer itself when ``inplace_backward=True``
    (then ``logits`` holds its gradient after backward: do not reuse it).
    """
    check.check_logits_labels(logits, labels)
    temperature = check.check_temperature(temperature)
    ignore_index = check.check_int(ignore_index, "ignore_index")
    check.check_bool(return_entropy, "return_entropy")
    check.check_bool(inplace_backward, "inplace_backward")

    backend = select_backend(logits)
    if backend == "reference":
        check.check_label_range(labels, logits.shape[-1], ignore_index)
        return reference.token_logprobs(logits, labels, temperature, ignore_index, return_entropy)

    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    logp, entropy, _ = _token_logprobs_fwd(
        rows, labels.reshape(-1).to(torch.int64), temperature, ignore_index,
        return_entropy, inplace_backward, backend)
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp
