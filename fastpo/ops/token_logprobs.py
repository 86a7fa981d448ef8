"""``fastpo.token_logprobs``: per-token log-probs (and entropies) without a ``[N, V]`` softmax.

Layers: public function (validation, reshapes) → ``torch.library`` custom ops (autograd formula,
fake implementation) → row kernels of the selected backend (Triton or C++).

Under ``torch.compile`` the temperature travels as a 0-d tensor (``_validation.scalar_tensor``), so
a new value is a new input, not a recompile; its value and the label range are checked inside the
forward op, which the compiler does not trace. Eager calls on plain tensors skip the dispatcher: a
plain ``autograd.Function`` runs the same bodies (``_forward``, ``_grad_logits``), with the same checks.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastpo import _validation as check
from fastpo import reference
from fastpo._backend import select_backend
from fastpo.reference.logprobs import check_logit_transform, check_outputs
from fastpo.ops.truncation import check_truncation, is_active, truncation_thresholds
from fastpo.ops.row_kernels import (
    as_row_blocks, direct_call_ok, empty_row_outputs, extras_mask, flat_labels, named_outputs, no_double_backward,
    num_rows, row_kernels, temperature_args, temperature_input,
)

__all__ = ["token_logprobs"]


@torch.library.custom_op("fastpo::token_logprobs_fwd", mutates_args=())
def _token_logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, temperature: torch.Tensor, ignore_index: int,
    with_entropy: bool, extras: int, logit_softcap: float, logit_scale: float, inplace_backward: bool, backend: str,
    threshold: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, row_max, log_norm, log_sum_sq_probs, is_top1, mean_logits) for ``logits [N, V]``
    or ``[B, T, V]`` (see ``as_row_blocks``); ``extras`` selects the last three (``EXTRA_*`` bits);
    ``logit_softcap`` (0: none) and ``logit_scale`` transform the logits first; ``inplace_backward`` is
    read by the backward only; ``threshold`` (``[N]``, optional): raw logits below it count as −inf."""
    return _forward(logits, labels, temperature, ignore_index, with_entropy, extras, logit_softcap,
                    logit_scale, backend, threshold)


def _forward(logits, labels, tau, ignore_index, with_entropy, extras, logit_softcap, logit_scale, backend,
             threshold=None):
    """The forward op's body (also the eager path's): the run-time checks, then the row kernels. ``tau``: a
    float, the 0-d temperature tensor, or the ``[N]`` per-token temperatures."""
    if type(tau) is float:
        inv_rows = check.check_temperature_value(tau) and None
    else:
        tau, inv_rows = temperature_args(tau)
    check.check_label_range(labels, logits.shape[-1], ignore_index)
    if inv_rows is None and threshold is None:  # the scalar path, as before
        return row_kernels(backend).logprob_forward(logits, labels, tau, ignore_index, with_entropy, extras,
                                                    logit_softcap, logit_scale)
    return row_kernels(backend).logprob_forward(logits, labels, tau, ignore_index, with_entropy, extras,
                                                logit_softcap, logit_scale, inv_temperature_rows=inv_rows,
                                                threshold_rows=threshold)


@_token_logprobs_fwd.register_fake
def _(logits, labels, temperature, ignore_index, with_entropy, extras, logit_softcap, logit_scale, inplace_backward,
      backend, threshold=None):
    return empty_row_outputs(logits, logits.dtype, num_rows(logits))


@torch.library.custom_op("fastpo::token_logprobs_bwd", mutates_args=())
def _token_logprobs_bwd(
    logits: torch.Tensor, labels: torch.Tensor, row_max: torch.Tensor, log_norm: torch.Tensor,
    entropy: torch.Tensor, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
    temperature: torch.Tensor, ignore_index: int, logit_softcap: float, logit_scale: float, backend: str,
    threshold: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """∂L/∂logits as a new (contiguous) tensor of the logits' dtype."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _kernel_backward(backend, logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature,
                     ignore_index, grad, logit_softcap, logit_scale, threshold)
    return grad


def _kernel_backward(backend, logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, tau, ignore_index,
                     out, logit_softcap, logit_scale, threshold=None):
    """The row kernels' backward for a float / 0-d / per-token ``[N]`` temperature ``tau`` (and the
    forward's truncation ``threshold``, if any)."""
    if threshold is None and type(tau) is float:  # the scalar path, without the per-row arguments
        row_kernels(backend).logprob_backward(logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy,
                                              tau, ignore_index, out, logit_softcap, logit_scale)
        return
    tau, inv_rows = temperature_args(tau, checked=False)
    extra = {} if inv_rows is None else {"inv_temperature_rows": inv_rows}
    if threshold is not None:
        extra["threshold_rows"] = threshold
    row_kernels(backend).logprob_backward(logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, tau,
                                          ignore_index, out, logit_softcap, logit_scale, **extra)


@_token_logprobs_bwd.register_fake
def _(logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature, ignore_index, logit_softcap,
      logit_scale, backend, threshold=None):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


torch.library.register_autograd("fastpo::token_logprobs_bwd", no_double_backward("token_logprobs"))


@torch.library.custom_op("fastpo::token_logprobs_bwd_inplace", mutates_args=("logits",))
def _token_logprobs_bwd_inplace(
    logits: torch.Tensor, labels: torch.Tensor, row_max: torch.Tensor, log_norm: torch.Tensor,
    entropy: torch.Tensor, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
    temperature: torch.Tensor, ignore_index: int, logit_softcap: float, logit_scale: float, backend: str,
    threshold: Optional[torch.Tensor] = None,
) -> None:
    """∂L/∂logits written over ``logits`` itself (saves one ``[N, V]`` buffer)."""
    _kernel_backward(backend, logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature,
                     ignore_index, logits, logit_softcap, logit_scale, threshold)


@_token_logprobs_bwd_inplace.register_fake
def _(logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature, ignore_index, logit_softcap,
      logit_scale, backend, threshold=None):
    return None


def _setup_context(ctx, inputs, output):
    (logits, labels, temperature, ignore_index, with_entropy, _extras, logit_softcap, logit_scale, inplace_backward,
     backend, *threshold) = inputs
    _, entropy, row_max, log_norm = output[:4]
    ctx.save_for_backward(logits, labels, row_max, log_norm, entropy, temperature, *threshold)
    ctx.ignore_index, ctx.with_entropy, ctx.inplace_backward, ctx.backend = (
        ignore_index, with_entropy, inplace_backward, backend)
    ctx.transform = (logit_softcap, logit_scale)


def _backward(ctx, grad_logp, grad_entropy, *_grad_statistics):
    logits, labels, row_max, log_norm, entropy, temperature, *threshold = ctx.saved_tensors
    # (no float(temperature) here: under torch.compile this backward is traced and the value is symbolic)
    return (_grad_logits(ctx, logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature,
                         None, False, threshold[0] if threshold else None),) + (None,) * (9 + len(threshold))


def _grad_logits(ctx, logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature, tau,
                 direct, threshold=None):
    """∂L/∂logits of both paths' autograd formulas: the custom ops' (``temperature`` the 0-d tensor, ``tau``
    None, ``direct`` False) and the eager Function's (``temperature`` None, built from the float ``tau``
    if a backward op is needed; ``direct``: call the row kernels without the backward custom ops where no
    graph is wanted)."""
    # Upstream gradients may be strided or expanded (the backward of a .sum()): the kernels read
    # them as contiguous [N] vectors.
    grad_logp = grad_logp.contiguous() if grad_logp is not None else None
    grad_entropy = grad_entropy.contiguous() if (ctx.with_entropy and grad_entropy is not None) else None
    # With create_graph=True the gradient must stay a graph node (whose own backward raises a clear
    # NotImplementedError), so it is not written over the saved logits.
    graph = torch.is_grad_enabled()
    if direct and not graph:
        out = logits if ctx.inplace_backward else torch.empty_like(logits, memory_format=torch.contiguous_format)
        _kernel_backward(ctx.backend, logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, tau,
                         ctx.ignore_index, out, *ctx.transform, threshold)
        return out
    if temperature is None:
        temperature = tau if isinstance(tau, torch.Tensor) else check.scalar_tensor(tau)
    args = (labels, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature, ctx.ignore_index,
            *ctx.transform, ctx.backend) + (() if threshold is None else (threshold,))
    if ctx.inplace_backward and not graph:
        _token_logprobs_bwd_inplace(logits, *args)
        return logits
    return _token_logprobs_bwd(logits, *args)


torch.library.register_autograd("fastpo::token_logprobs_fwd", _backward, setup_context=_setup_context)


class _EagerTokenLogprobs(torch.autograd.Function):
    """The same forward and autograd formula as ``fastpo::token_logprobs_fwd``, without the
    ``torch.library`` dispatch (see :func:`direct_call_ok`): eager calls on plain tensors only.
    Returns (logp, entropy, log_sum_sq_probs, is_top1, mean_logits), the last three non-differentiable."""

    @staticmethod
    def forward(ctx, logits, labels, tau, ignore_index, with_entropy, extras, logit_softcap, logit_scale,
                inplace_backward, backend, threshold):
        logp, entropy, row_max, log_norm, *extra = _forward(
            logits, labels, tau, ignore_index, with_entropy, extras, logit_softcap, logit_scale, backend, threshold)
        ctx.save_for_backward(logits, labels, row_max, log_norm, entropy)
        ctx.threshold = threshold
        ctx.tau, ctx.ignore_index, ctx.with_entropy, ctx.inplace_backward, ctx.backend = (
            tau, ignore_index, with_entropy, inplace_backward, backend)
        ctx.transform = (logit_softcap, logit_scale)
        ctx.mark_non_differentiable(*extra)
        ctx.set_materialize_grads(False)
        return (logp, entropy, *extra)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_grad_statistics):
        logits, labels, row_max, log_norm, entropy = ctx.saved_tensors
        if grad_logp is None and (grad_entropy is None or not ctx.with_entropy):
            return (None,) * 11
        return (_grad_logits(ctx, logits, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, None,
                             ctx.tau, True, ctx.threshold),) + (None,) * 10


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature=1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    outputs=None,
    logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    inplace_backward: bool = False,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    process_group=None,
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

    ``temperature`` is a float, or a per-token tensor shaped like ``labels`` (or broadcastable to it,
    e.g. ``[B, 1]`` per sequence; floating, every entry finite and > 0, checked): row i is then scored
    under softmax(z_i/τ_i). The temperature is not differentiated (no gradient flows to it); a float
    keeps the scalar kernels.

    ``top_k`` / ``top_p`` (None: off) score under the truncated, renormalised distribution vLLM's sampler
    draws from (its ``processed_logprobs``): temperature, then top-k (the k largest logits, ties at the
    k-th kept), then top-p (the smallest set of largest logits whose mass under the top-k softmax reaches
    p; a tie at that threshold is kept whole). All outputs are the truncated distribution's (entropy,
    log_sum_sq_probs; ``mean_logits`` is refused); a label outside the kept set gets logp = −inf and
    no gradient from it (its row's entropy still has one); gradients flow through the kept set only.
    A threshold pass per row (no sort) finds the kept set {x >= t}; the row kernels then read the
    logits once more, as without truncation. Needs ``logit_scale`` > 0.

    Under ``torch.compile`` (fullgraph, dynamic shapes) a changing ``temperature`` does not
    recompile; ``ignore_index``, ``return_entropy``, ``outputs``, ``logit_softcap``, ``logit_scale`` and
    ``inplace_backward`` are specialised.

    ``process_group``: ``logits [..., V/tp]`` is this rank's shard of a vocabulary-parallel output (Megatron
    layout: vocabulary ids [rank·V/tp, (rank+1)·V/tp)), ``labels`` are global ids; the ranks exchange
    per-row statistics only, every rank gets the same results, and each rank's backward is local to its
    shard (see ``fastpo.ops.vocab_parallel``; eager only, no ``inplace_backward``).
    """
    if process_group is not None:
        from fastpo.ops.vocab_parallel import vocab_parallel_token_logprobs
        if inplace_backward:
            raise ValueError("inplace_backward=True is not supported with process_group (vocab-parallel logits)")
        return vocab_parallel_token_logprobs(
            logits, labels, process_group, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, outputs=outputs, logit_softcap=logit_softcap, logit_scale=logit_scale,
            top_k=top_k, top_p=top_p)
    check.check_logits_labels(logits, labels)
    temperature = temperature_input(temperature, labels, logits.dtype)
    ignore_index = check.check_int(ignore_index, "ignore_index")
    check.check_bool(return_entropy, "return_entropy")
    check.check_bool(inplace_backward, "inplace_backward")
    wanted = check_outputs(outputs, return_entropy)
    softcap, scale = check_logit_transform(logit_softcap, logit_scale)
    top_k, top_p = check_truncation(top_k, top_p, scale)
    truncated = is_active(top_k, top_p)
    if truncated and wanted is not None and "mean_logits" in wanted:
        raise ValueError("outputs: mean_logits is not defined under top_k / top_p truncation")

    backend = select_backend(logits)
    if backend == "reference":
        check.check_label_range(labels, logits.shape[-1], ignore_index)
        if isinstance(temperature, torch.Tensor):
            check.check_temperature_rows_value(temperature)
            temperature = temperature.view(labels.shape)
        return reference.token_logprobs(logits, labels, temperature, ignore_index, return_entropy, outputs,
                                        logit_softcap, scale, top_k, top_p)

    with_entropy = return_entropy if wanted is None else "entropy" in wanted
    extras = extras_mask(wanted)
    rows, flat = as_row_blocks(logits), flat_labels(labels)
    threshold = None
    if truncated:
        temp = temperature if isinstance(temperature, torch.Tensor) else check.scalar_tensor(temperature)
        threshold = truncation_thresholds(rows.detach(), temp, top_k, top_p, softcap, scale)
    if not direct_call_ok(logits, labels):
        temp = temperature if isinstance(temperature, torch.Tensor) else check.scalar_tensor(temperature)
        trunc = () if threshold is None else (threshold,)
        results = _token_logprobs_fwd(rows, flat, temp, ignore_index, with_entropy,
                                      extras, softcap, scale, inplace_backward, backend, *trunc)
    elif torch.is_grad_enabled() and logits.requires_grad:
        logp, entropy, *extra = _EagerTokenLogprobs.apply(rows, flat, temperature, ignore_index, with_entropy,
                                                          extras, softcap, scale, inplace_backward, backend,
                                                          threshold)
        results = (logp, entropy, None, None, *extra)
    else:
        results = _forward(rows, flat, temperature, ignore_index, with_entropy, extras, softcap, scale, backend,
                           threshold)
    if wanted is not None:
        return named_outputs(results, labels.shape, wanted)
    if labels.dim() == 1:  # already [N]: no views to make
        return (results[0], results[1]) if return_entropy else results[0]
    logp = results[0].view(labels.shape)
    return (logp, results[1].view(labels.shape)) if return_entropy else logp
