"""``fastpo.linear_token_logprobs``: log-probs from the last hidden state and the lm_head weight,
without ever building the ``[N, V]`` logits.

Tokens are processed in chunks: the chunk's logits ``h_c·Wᵀ + b`` are formed, reduced by the row
kernels to (logp, entropy, row_max, log_norm), and dropped. The backward recomputes each chunk's logits, turns
them into ∂L/∂logits in place (the row kernel's in-place backward), then
    ∂L/∂h_c = G_c·W,   ∂L/∂W += G_cᵀ·h_c,   ∂L/∂b += Σ_rows G_c
with ∂L/∂W and ∂L/∂b accumulated in float32. Peak extra memory is one chunk of logits (plus its
float32 copy for 16-bit inputs) and the float32 weight-gradient accumulator.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastpo import _validation as check
from fastpo import reference
from fastpo._backend import select_backend
from fastpo.ops.lm_head import (
    add_chunk_gradients, check_head_operands, chunk_logits, gather_in_backward, gradient_buffers, head_gather,
    resolve_head_weight,
)
from fastpo.ops.row_kernels import (
    empty_row_outputs, extras_mask, flat_labels, named_outputs, no_double_backward, row_kernels, temperature_args,
    temperature_input,
)
from fastpo.reference.logprobs import check_logit_transform, check_outputs
from fastpo.ops.truncation import check_truncation, is_active, logits_thresholds

__all__ = ["linear_token_logprobs", "default_chunk_size"]

# A chunk holds at most 1/64 of the N x V logits (so extra memory stays near 1.6% of them), but at
# least 128 rows so the matmuls stay efficient (32-row chunks made the CPU path 1.5x slower at
# N=1024, V=32000), and at most 2^27 logits (512 MiB in float32).
_MIN_CHUNK_ROWS = 128
_MAX_CHUNK_ELEMENTS = 1 << 27


def default_chunk_size(n_tokens: int, vocab_size: int) -> int:
    """Rows per chunk used when ``chunk_size=None``."""
    rows = max(_MIN_CHUNK_ROWS, math.ceil(n_tokens / 64))
    rows = min(rows, max(_MIN_CHUNK_ROWS, _MAX_CHUNK_ELEMENTS // max(vocab_size, 1)))
    rows = ((rows + 15) // 16) * 16
    return max(1, min(rows, n_tokens))


def _chunk_rows(chunk_size: int, n_tokens: int, vocab_size: int) -> int:
    """Rows per chunk: ``chunk_size`` (0 = :func:`default_chunk_size`), within [1, max(N, 1)]."""
    rows = chunk_size if chunk_size > 0 else default_chunk_size(n_tokens, vocab_size)
    return max(1, min(rows, max(n_tokens, 1)))


# The chunk size is resolved inside the ops (from the real N), so that under torch.compile with
# dynamic shapes it neither specialises nor guards on the number of tokens.
@torch.library.custom_op("fastpo::linear_token_logprobs_fwd", mutates_args=())
def _linear_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    temperature: torch.Tensor, ignore_index: int, with_entropy: bool, extras: int, logit_softcap: float,
    logit_scale: float, chunk_size: int, backend: str, top_k: int = 0, top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, row_max, log_norm, log_sum_sq_probs, is_top1, mean_logits) for ``hidden [N, D]``,
    ``weight [V, D]``, one chunk of rows at a time (``chunk_size`` 0: the default; ``extras``: the
    ``EXTRA_*`` bits of the last three)."""
    temperature_args(temperature)  # the run-time value checks (scalar or per-token)
    check.check_label_range(labels, weight.shape[0], ignore_index)
    kernels = row_kernels(backend)
    n_tokens = hidden.shape[0]
    chunk = _chunk_rows(chunk_size, n_tokens, weight.shape[0])
    outputs = empty_row_outputs(hidden, hidden.dtype)
    for start in range(0, n_tokens, chunk):
        rows = slice(start, min(start + chunk, n_tokens))
        logits = chunk_logits(hidden[rows], weight, bias)
        extra = _chunk_args(logits, temperature, rows, top_k, top_p, logit_softcap, logit_scale)
        tau = extra.pop("tau")
        for out, part in zip(outputs, kernels.logprob_forward(logits, labels[rows], tau, ignore_index, with_entropy,
                                                              extras, logit_softcap, logit_scale, **extra)):
            out[rows] = part
        del logits
    return outputs


def _chunk_args(logits, temperature, rows, top_k, top_p, logit_softcap, logit_scale):
    """The row kernels' temperature (``tau``) and optional per-row arguments for one chunk of logits: its
    per-token 1/τ, and its truncation thresholds (found again in the backward from the recomputed logits)."""
    tau, inv_rows = temperature_args(temperature, rows, checked=False)
    extra = {"tau": tau} if inv_rows is None else {"tau": tau, "inv_temperature_rows": inv_rows}
    if is_active(top_k, top_p):
        extra["threshold_rows"] = logits_thresholds(logits, 1.0 / tau if inv_rows is None else inv_rows,
                                                    top_k, top_p, logit_softcap, logit_scale)
    return extra


@_linear_fwd.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, extras, logit_softcap, logit_scale,
      chunk_size, backend, top_k=0, top_p=1.0):
    return empty_row_outputs(hidden, hidden.dtype)


@torch.library.custom_op("fastpo::linear_token_logprobs_bwd", mutates_args=())
def _linear_bwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    row_max: torch.Tensor, log_norm: torch.Tensor, entropy: torch.Tensor, grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor], temperature: torch.Tensor, ignore_index: int, logit_softcap: float,
    logit_scale: float, chunk_size: int, backend: str, needs_grad_hidden: bool, needs_grad_weight: bool, needs_grad_bias: bool,
    top_k: int = 0, top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂L/∂hidden, ∂L/∂weight, ∂L/∂bias), contiguous; a gradient nobody needs (a frozen lm_head, no
    bias) is not computed and comes back empty."""
    kernels = row_kernels(backend)
    n_tokens = hidden.shape[0]
    chunk = _chunk_rows(chunk_size, n_tokens, weight.shape[0])
    grads = gradient_buffers(hidden, weight, bias, needs_grad_hidden, needs_grad_weight, needs_grad_bias)
    for start in range(0, n_tokens, chunk):
        rows = slice(start, min(start + chunk, n_tokens))
        # The forward's logits, recomputed, turned into their gradient in place.
        grad_logits = chunk_logits(hidden[rows], weight, bias)
        extra = _chunk_args(grad_logits, temperature, rows, top_k, top_p, logit_softcap, logit_scale)
        tau = extra.pop("tau")
        kernels.logprob_backward(
            grad_logits, labels[rows], row_max[rows], log_norm[rows], entropy[rows],
            None if grad_logp is None else grad_logp[rows],
            None if grad_entropy is None else grad_entropy[rows],
            tau, ignore_index, grad_logits, logit_softcap, logit_scale, **extra)
        add_chunk_gradients(grad_logits, hidden[rows], weight, rows, *grads)
        del grad_logits
    grad_hidden, grad_weight, grad_bias = grads
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


@_linear_bwd.register_fake
def _(hidden, weight, bias, labels, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature, ignore_index,
      logit_softcap, logit_scale, chunk_size, backend, needs_grad_hidden, needs_grad_weight, needs_grad_bias, top_k=0,
      top_p=1.0):
    grad_bias = weight.new_empty(weight.shape[0]) if (needs_grad_bias and bias is not None) else weight.new_empty(0)
    return (hidden.new_empty(hidden.shape) if needs_grad_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if needs_grad_weight else weight.new_empty(0), grad_bias)


torch.library.register_autograd("fastpo::linear_token_logprobs_bwd", no_double_backward("linear_token_logprobs"))


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, temperature, ignore_index, with_entropy, _extras, logit_softcap, logit_scale,
     chunk_size, backend, *truncation) = inputs
    _, entropy, row_max, log_norm = output[:4]
    ctx.transform = (logit_softcap, logit_scale)
    ctx.save_for_backward(hidden, weight, bias, labels, row_max, log_norm, entropy, temperature)
    ctx.ignore_index, ctx.with_entropy = ignore_index, with_entropy
    ctx.chunk_size, ctx.backend = chunk_size, backend
    ctx.truncation = tuple(truncation)


def _backward(ctx, grad_logp, grad_entropy, *_grad_statistics):
    hidden, weight, bias, labels, row_max, log_norm, entropy, temperature = ctx.saved_tensors
    grad_logp = grad_logp.contiguous() if grad_logp is not None else None
    grad_entropy = grad_entropy.contiguous() if (ctx.with_entropy and grad_entropy is not None) else None
    needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grad_hidden, grad_weight, grad_bias = _linear_bwd(
        hidden, weight, bias, labels, row_max, log_norm, entropy, grad_logp, grad_entropy,
        temperature, ctx.ignore_index, *ctx.transform, ctx.chunk_size, ctx.backend, needs_hidden, needs_weight,
        needs_bias, *ctx.truncation)
    return (grad_hidden if needs_hidden else None, grad_weight if needs_weight else None,
            grad_bias if (needs_bias and bias is not None) else None, None, None, None, None, None, None, None,
            None, None) + (None,) * len(ctx.truncation)


torch.library.register_autograd("fastpo::linear_token_logprobs_fwd", _backward, setup_context=_setup_context)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature=1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    outputs=None,
    logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    chunk_size: Optional[int] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    process_group=None,
    weight_gather=None,
):
    """``token_logprobs(hidden @ weight.T + bias, labels)`` without building ``[N, V]`` logits.

    ``hidden [..., D]`` is the last hidden state, ``weight [V, D]`` the lm_head weight (same dtype),
    ``labels [...]`` aligned with ``hidden``. Returns float32 log-probs shaped like ``labels`` (and
    entropies when ``return_entropy``), differentiable w.r.t. ``hidden``, ``weight`` and ``bias``
    (once: a double backward raises ``NotImplementedError``). Any strides are accepted (transposed,
    sliced or expanded views; strided labels are copied, N integers). ``D = 0`` is allowed: the
    logits are then the bias (or 0, so logp = −log V). Works on ``chunk_size`` tokens at a time
    (default: ``default_chunk_size(N, V)``, about N/64 rows, at least 128): peak extra memory is
    O(chunk_size x V); the backward recomputes chunk logits. ``outputs`` returns a
    :class:`fastpo.LogProbOutputs` with the per-token statistics of :func:`fastpo.token_logprobs`
    (``log_sum_sq_probs``, ``is_top1``, ``mean_logits``: detached), from the same pass.
    ``logit_scale`` and ``logit_softcap`` transform the logits as in :func:`fastpo.token_logprobs`;
    ``temperature`` is a float or a per-token tensor (labels' shape or broadcastable; not differentiated),
    as there; so are ``top_k`` / ``top_p`` (vLLM's truncated sampling distribution; the threshold pass
    runs on each chunk's logits, again in the backward's recomputation).

    Under ``torch.compile`` (fullgraph, dynamic shapes) a changing ``temperature`` or number of
    tokens does not recompile; ``ignore_index``, ``return_entropy``, ``outputs`` and an explicit
    ``chunk_size`` are specialised.

    Sharded heads: ``process_group`` (a vocabulary-parallel lm_head, Megatron layout: ``weight [V/tp, D]``
    is this rank's shard of rows [rank·V/tp, (rank+1)·V/tp), ``labels`` global ids; every rank gets the
    same results, ∂hidden is summed over the group; see ``fastpo.ops.vocab_parallel``, eager only). An
    FSDP2 DTensor ``weight`` / ``bias`` is gathered once per call (cast to hidden's dtype first; its
    gradient is reduce-scattered onto the shards, averaged over the mesh). ``weight_gather`` (a callable
    ``(weight, bias) -> context manager``, e.g. ``lambda w, b: deepspeed.zero.GatheredParameters([w, b])``
    for ZeRO-3) is entered around the forward and again around the backward's recompute (eager only).
    """
    weight, bias = resolve_head_weight(weight, hidden.dtype), resolve_head_weight(bias, hidden.dtype)
    if process_group is not None:
        from fastpo.ops.vocab_parallel import vocab_parallel_linear_token_logprobs
        with head_gather(weight_gather, weight, bias):
            out = vocab_parallel_linear_token_logprobs(
                hidden, weight, labels, process_group, bias=bias, temperature=temperature, ignore_index=ignore_index,
                return_entropy=return_entropy, outputs=outputs, logit_softcap=logit_softcap, logit_scale=logit_scale,
                chunk_size=chunk_size, top_k=top_k, top_p=top_p)
    else:
        with head_gather(weight_gather, weight, bias):
            out = _linear_token_logprobs(hidden, weight, labels, bias, temperature, ignore_index, return_entropy,
                                         outputs, logit_softcap, logit_scale, chunk_size, top_k, top_p)
    gather_in_backward(out, weight_gather, weight, bias)
    return out


def _linear_token_logprobs(hidden, weight, labels, bias, temperature, ignore_index, return_entropy, outputs,
                           logit_softcap, logit_scale, chunk_size, top_k, top_p):
    check_head_operands(hidden, weight, bias)
    check.check_aligned_labels(labels, hidden, "hidden")
    check.check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    temperature = temperature_input(temperature, labels, hidden.dtype)
    ignore_index = check.check_int(ignore_index, "ignore_index")
    check.check_bool(return_entropy, "return_entropy")
    wanted = check_outputs(outputs, return_entropy)
    softcap, scale = check_logit_transform(logit_softcap, logit_scale)
    top_k, top_p = check_truncation(top_k, top_p, scale)
    if is_active(top_k, top_p) and wanted is not None and "mean_logits" in wanted:
        raise ValueError("outputs: mean_logits is not defined under top_k / top_p truncation")
    if chunk_size is not None:
        check.check_int(chunk_size, "chunk_size")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")

    backend = select_backend(hidden)
    if backend == "reference":
        check.check_label_range(labels, weight.shape[0], ignore_index)
        if isinstance(temperature, torch.Tensor):
            check.check_temperature_rows_value(temperature)
            temperature = temperature.view(labels.shape)
        return reference.linear_token_logprobs(hidden, weight, labels, bias, temperature, ignore_index,
                                               return_entropy, outputs, logit_softcap, scale, top_k, top_p)

    # labels.numel() rather than -1: with D = 0 the row count cannot be inferred from hidden.
    rows = hidden if hidden.dim() == 2 else hidden.reshape(labels.numel(), hidden.shape[-1])
    with_entropy = return_entropy if wanted is None else "entropy" in wanted
    results = _linear_fwd(
        rows, weight, bias, flat_labels(labels),
        temperature if isinstance(temperature, torch.Tensor) else check.scalar_tensor(temperature), ignore_index,
        with_entropy, extras_mask(wanted), softcap, scale, 0 if chunk_size is None else chunk_size, backend,
        *((top_k, top_p) if is_active(top_k, top_p) else ()))
    if wanted is not None:
        return named_outputs(results, labels.shape, wanted)
    if labels.dim() == 1:  # already [N]: no views to make
        return (results[0], results[1]) if return_entropy else results[0]
    logp = results[0].view(labels.shape)
    return (logp, results[1].view(labels.shape)) if return_entropy else logp
