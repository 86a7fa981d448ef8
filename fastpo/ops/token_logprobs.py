"""``fastpo.token_logprobs``: per-token log-probs (and entropies) without a ``[N, V]`` softmax.

Layers: public function (validation, reshapes) → ``torch.library`` custom ops (autograd formula,
fake implementation) → row kernels of the selected backend (Triton or C++).

Under ``torch.compile`` the temperature travels as a 0-d tensor (``_validation.scalar_tensor``), so
a new value is a new input, not a recompile; its value and the label range are checked inside the
forward op, which the compiler does not trace.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastpo import _validation as check
from fastpo import reference
from fastpo._backend import select_backend
from fastpo.reference.logprobs import check_logit_transform, check_outputs
from fastpo.ops.row_kernels import (
    as_row_blocks, empty_row_outputs, extras_mask, flat_labels, named_outputs, no_double_backward, num_rows,
    row_kernels,
)

__all__ = ["token_logprobs"]


@torch.library.custom_op("fastpo::token_logprobs_fwd", mutates_args=())
def _token_logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, temperature: torch.Tensor, ignore_index: int,
    with_entropy: bool, extras: int, logit_softcap: float, logit_scale: float, inplace_backward: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, row_max, log_norm, log_sum_sq_probs, is_top1, mean_logits) for ``logits [N, V]``
    or ``[B, T, V]`` (see ``as_row_blocks``); ``extras`` selects the last three (``EXTRA_*`` bits);
    ``logit_softcap`` (0: none) and ``logit_scale`` transform the logits first; ``inplace_backward`` is
    read by the backward only."""
    tau = check.check_temperature_value(float(temperature))
    check.check_label_range(labels, logits.shape[-1], ignore_index)
    return row_kernels(backend).logprob_forward(logits, labels, tau, ignore_index, with_entropy, extras,
                                                logit_softcap, logit_scale)


@_token_logprobs_fwd.register_fake
def _(logits, labels, temperature, ignore_index, with_entropy, extras, logit_softcap, logit_scale, inplace_backward,
      backend):
    return empty_row_outputs(logits, logits.dtype, num_rows(logits))


@torch.library.custom_op("fastpo::token_logprobs_bwd", mutates_args=())
def _token_logprobs_bwd(
    logits: torch.Tensor, labels: torch.Tensor, row_max: torch.Tensor, log_norm: torch.Tensor,
    entropy: torch.Tensor, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
    temperature: torch.Tensor, ignore_index: int, logit_softcap: float, logit_scale: float, backend: str,
) -> torch.Tensor:
    """∂L/∂logits as a new (contiguous) tensor of the logits' dtype."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    row_kernels(backend).logprob_backward(
        logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, float(temperature), ignore_index, grad,
        logit_softcap, logit_scale)
    return grad


@_token_logprobs_bwd.register_fake
def _(logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature, ignore_index, logit_softcap,
      logit_scale, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


torch.library.register_autograd("fastpo::token_logprobs_bwd", no_double_backward("token_logprobs"))


@torch.library.custom_op("fastpo::token_logprobs_bwd_inplace", mutates_args=("logits",))
def _token_logprobs_bwd_inplace(
    logits: torch.Tensor, labels: torch.Tensor, row_max: torch.Tensor, log_norm: torch.Tensor,
    entropy: torch.Tensor, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
    temperature: torch.Tensor, ignore_index: int, logit_softcap: float, logit_scale: float, backend: str,
) -> None:
    """∂L/∂logits written over ``logits`` itself (saves one ``[N, V]`` buffer)."""
    row_kernels(backend).logprob_backward(
        logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, float(temperature), ignore_index, logits,
        logit_softcap, logit_scale)


@_token_logprobs_bwd_inplace.register_fake
def _(logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature, ignore_index, logit_softcap,
      logit_scale, backend):
    return None


def _setup_context(ctx, inputs, output):
    (logits, labels, temperature, ignore_index, with_entropy, _extras, logit_softcap, logit_scale, inplace_backward,
     backend) = inputs
    _, entropy, row_max, log_norm = output[:4]
    ctx.save_for_backward(logits, labels, row_max, log_norm, entropy, temperature)
    ctx.ignore_index, ctx.with_entropy, ctx.inplace_backward, ctx.backend = (
        ignore_index, with_entropy, inplace_backward, backend)
    ctx.transform = (logit_softcap, logit_scale)


def _backward(ctx, grad_logp, grad_entropy, *_grad_statistics):
    logits, labels, row_max, log_norm, entropy, temperature = ctx.saved_tensors
    # Upstream gradients may be strided or expanded (the backward of a .sum()): the kernels read
    # them as contiguous [N] vectors.
    grad_logp = grad_logp.contiguous() if grad_logp is not None else None
    grad_entropy = grad_entropy.contiguous() if (ctx.with_entropy and grad_entropy is not None) else None
    args = (labels, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature, ctx.ignore_index,
            *ctx.transform, ctx.backend)
    # With create_graph=True the gradient must stay a graph node (whose own backward raises a clear
    # NotImplementedError), so it is not written over the saved logits.
    if ctx.inplace_backward and not torch.is_grad_enabled():
        _token_logprobs_bwd_inplace(logits, *args)
        grad_logits = logits
    else:
        grad_logits = _token_logprobs_bwd(logits, *args)
    return grad_logits, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastpo::token_logprobs_fwd", _backward, setup_context=_setup_context)


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    outputs=None,
    logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    inplace_backward: bool = False,
):
    """Log-probabilities of ``labels`` under ``softmax(logits / temperature)``, one per token.

    ``logits [..., V]`` (fp32/bf16/fp16/fp64) and ``labels [...]`` are aligned: label i scores row i
    (shift them yourself). With s = z/τ::

        logp    = s_y − logsumexp(s)
        entropy = logsumexp(s) − Σ_j softmax(s)_j · s_j          (when ``return_entropy``)

    Returns float32 tensors shaped like ``labels`` (float64 for float64 logits); ``ignore_index``
    labels give 0 and no gradient. Both outputs are differentiable (once: a double backward raises
    ``NotImplementedError``). Any strides are accepted: rows at any stride, and the shifted
    ``logits[:, :-1]`` of a ``[B, T, V]`` output, are read in place; logits whose last dimension is
    not contiguous (a transpose) or whose rows overlap (an ``expand``) are copied first, strided or
    expanded labels are copied (N integers). The full softmax is never
    materialised: the forward streams each row once, the backward writes ``g·(onehot − p)`` (plus
    the entropy term) block by block, into the logits buffer itself when ``inplace_backward=True``
    (then ``logits`` holds its gradient after backward: do not reuse it; a copied ``logits`` leaves
    the caller's tensor untouched).

    ``outputs``, a tuple of names from ``("logp", "entropy", "log_sum_sq_probs", "is_top1",
    "mean_logits")``, returns a :class:`fastpo.LogProbOutputs` NamedTuple instead (``None`` for a name
    not asked for), computing only what is asked, in the same pass::

        log_sum_sq_probs = log Σ_j softmax(s)_j²       (float32)
        is_top1          = label is argmax_j z_j       (bool; the first maximum wins a tie, as in
                                                        torch.argmax and TRL)
        mean_logits      = mean_j s_j                   (float32; the tempered logits, as in TRL)

    These three are detached (no gradient); ``logp`` and ``entropy`` stay differentiable. Ignored rows
    give 0 / False. ``return_entropy`` and ``outputs`` are exclusive.

    Logit transforms, applied in TRL's order before the temperature: ``logit_scale`` k (Cohere,
    Granite: x ← k·x), then ``logit_softcap`` c (Gemma: x ← c·tanh(x/c)); the backward includes their
    derivative k·(1 − tanh²). is_top1 compares the transformed logits.

    Under ``torch.compile`` (fullgraph, dynamic shapes) a changing ``temperature`` does not
    recompile; ``ignore_index``, ``return_entropy``, ``outputs``, ``logit_softcap``, ``logit_scale`` and
    ``inplace_backward`` are specialised.
    """
    check.check_logits_labels(logits, labels)
    temperature = check.check_temperature(temperature)
    ignore_index = check.check_int(ignore_index, "ignore_index")
    check.check_bool(return_entropy, "return_entropy")
    check.check_bool(inplace_backward, "inplace_backward")
    wanted = check_outputs(outputs, return_entropy)
    softcap, scale = check_logit_transform(logit_softcap, logit_scale)

    backend = select_backend(logits)
    if backend == "reference":
        check.check_label_range(labels, logits.shape[-1], ignore_index)
        return reference.token_logprobs(logits, labels, temperature, ignore_index, return_entropy, outputs,
                                        logit_softcap, logit_scale)

    with_entropy = return_entropy if wanted is None else "entropy" in wanted
    results = _token_logprobs_fwd(
        as_row_blocks(logits), flat_labels(labels), check.scalar_tensor(temperature), ignore_index,
        with_entropy, extras_mask(wanted), softcap, scale, inplace_backward, backend)
    if wanted is not None:
        return named_outputs(results, labels.shape, wanted)
    logp = results[0].view(labels.shape)
    return (logp, results[1].view(labels.shape)) if return_entropy else logp
