"""``fastpo.sequence_logprobs``: per-sequence sums (or means) of token log-probs, padded or packed.

Layers: public function (validation) → ``torch.library`` custom ops ``fastpo::sequence_logprobs_fwd``
/ ``_bwd`` (autograd formula, fake implementation; eager calls on plain tensors run the same bodies
through a plain ``autograd.Function``, without the dispatcher) → the segment reduction of the selected backend:
the Triton kernels of ``fastpo.kernels.segments`` or the vectorised torch CPU path below (same
contract: ``segment_forward`` / ``segment_backward``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastpo import _validation as check
from fastpo import reference
from fastpo._backend import select_backend
from fastpo._layout import accumulation_dtype, check_cu_seqlens_values, token_layout
from fastpo.ops.row_kernels import direct_call_ok

__all__ = ["sequence_logprobs"]


# ---------------------------------------------------------------------------------------------
# CPU path: vectorised torch (a row sum for padded batches, segment_reduce / repeat_interleave over
# the cu_seqlens offsets for packed ones: linear in N, no per-token segment ids to search)
# ---------------------------------------------------------------------------------------------


def _cpu_segment_forward(x: torch.Tensor, mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                         average: bool):
    acc = accumulation_dtype(x.dtype)
    values = x if mask is None else torch.where(mask, x, 0.0)  # the one [N] temporary, and only with a mask
    if cu_seqlens is None:
        out = values.sum(-1, dtype=acc)
        count = torch.full_like(out, x.shape[-1]) if mask is None else mask.sum(-1, dtype=acc)
    else:  # cu_seqlens was validated by the op: skip segment_reduce's own checks
        out = torch.segment_reduce(values.to(acc), "sum", offsets=cu_seqlens, unsafe=True)
        count = cu_seqlens.diff().to(acc) if mask is None else \
            torch.segment_reduce(mask.to(acc), "sum", offsets=cu_seqlens, unsafe=True)
    if average:
        out = out / count.clamp(min=1)
    return out, count


def _cpu_segment_backward(grad_out: torch.Tensor, count: torch.Tensor, mask: Optional[torch.Tensor],
                          cu_seqlens: Optional[torch.Tensor], shape: Sequence[int], dtype: torch.dtype,
                          average: bool) -> torch.Tensor:
    g = grad_out / count.clamp(min=1) if average else grad_out
    if cu_seqlens is None:
        g = g.unsqueeze(-1).expand(tuple(shape))
    else:
        g = torch.repeat_interleave(g, cu_seqlens.diff(), output_size=shape[0])
    if mask is None:
        return torch.empty(tuple(shape), dtype=dtype).copy_(g)
    return torch.where(mask, g, 0.0).to(dtype)  # a new tensor either way (never a view of grad_out)


def _segment_ops(backend: str):
    if backend == "triton":
        from fastpo.kernels import segments

        return segments.segment_forward, segments.segment_backward
    if backend == "cpu":
        return _cpu_segment_forward, _cpu_segment_backward
    raise ValueError(f"no segment kernels for backend {backend!r} (expected 'triton' or 'cpu')")


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastpo::sequence_logprobs_fwd", mutates_args=())
def _sequence_logprobs_fwd(
    token_logp: torch.Tensor, mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    average: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sequence sum or mean, counted tokens) for ``token_logp [B, T]`` or ``[N]`` + ``cu_seqlens``."""
    return _forward(token_logp, mask, cu_seqlens, average, backend)


def _forward(token_logp, mask, cu_seqlens, average, backend):
    """The forward op's body (also the eager path's): the cu_seqlens values check, then the reduction."""
    if cu_seqlens is not None:
        check_cu_seqlens_values(cu_seqlens, token_logp.shape[0])
    forward, _ = _segment_ops(backend)
    return forward(token_logp, mask, cu_seqlens, average)


@_sequence_logprobs_fwd.register_fake
def _(token_logp, mask, cu_seqlens, average, backend):
    num_seqs = token_logp.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    out = token_logp.new_empty(num_seqs, dtype=accumulation_dtype(token_logp.dtype))
    return out, torch.empty_like(out)


@torch.library.custom_op("fastpo::sequence_logprobs_bwd", mutates_args=())
def _sequence_logprobs_bwd(
    grad_out: torch.Tensor, count: torch.Tensor, mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    shape: list[int], dtype: torch.dtype, average: bool, backend: str,
) -> torch.Tensor:
    """∂L/∂token_logp: the per-sequence gradient (÷ count when averaging) on counted tokens, 0 elsewhere."""
    _, backward = _segment_ops(backend)
    return backward(grad_out.contiguous(), count, mask, cu_seqlens, shape, dtype, average)


@_sequence_logprobs_bwd.register_fake
def _(grad_out, count, mask, cu_seqlens, shape, dtype, average, backend):
    return grad_out.new_empty(shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    token_logp, mask, cu_seqlens, average, backend = inputs
    ctx.save_for_backward(output[1], mask, cu_seqlens)
    ctx.shape, ctx.dtype, ctx.average, ctx.backend = list(token_logp.shape), token_logp.dtype, average, backend


def _backward(ctx, grad_out, _grad_count):
    count, mask, cu_seqlens = ctx.saved_tensors
    grad = _sequence_logprobs_bwd(grad_out, count, mask, cu_seqlens, ctx.shape, ctx.dtype, ctx.average, ctx.backend)
    return grad, None, None, None, None


torch.library.register_autograd("fastpo::sequence_logprobs_fwd", _backward, setup_context=_setup_context)


# Double backward. The backward is linear in grad_out: grad_t = m_t·g_i (÷ n_i when averaging) for t in
# sequence i, so its adjoint maps an upstream gg [token shape] to Σ_{t ∈ i} m_t·gg_t (÷ n_i): the
# forward itself, applied to gg (the mask, cu_seqlens and counts are constants).
def _bwd_setup_context(ctx, inputs, output):
    _, _, mask, cu_seqlens, _, _, average, backend = inputs
    ctx.save_for_backward(mask, cu_seqlens)
    ctx.average, ctx.backend = average, backend


def _bwd_backward(ctx, grad_grad):
    mask, cu_seqlens = ctx.saved_tensors
    grad_grad_out, _ = _sequence_logprobs_fwd(grad_grad.contiguous(), mask, cu_seqlens, ctx.average, ctx.backend)
    return grad_grad_out, None, None, None, None, None, None, None


torch.library.register_autograd("fastpo::sequence_logprobs_bwd", _bwd_backward, setup_context=_bwd_setup_context)


class _EagerSequenceLogprobs(torch.autograd.Function):
    """``fastpo::sequence_logprobs_fwd`` and its autograd formula without the ``torch.library`` dispatch,
    for eager calls on plain tensors (see :func:`fastpo.ops.row_kernels.direct_call_ok`). The backward
    is the backward op itself (not its body), so double backward keeps working."""

    @staticmethod
    def forward(ctx, token_logp, mask, cu_seqlens, average, backend):
        out, count = _forward(token_logp, mask, cu_seqlens, average, backend)
        ctx.save_for_backward(count, mask, cu_seqlens)
        ctx.shape, ctx.dtype, ctx.average, ctx.backend = list(token_logp.shape), token_logp.dtype, average, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        count, mask, cu_seqlens = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the custom op carries the double-backward formula
            grad = _sequence_logprobs_bwd(grad_out, count, mask, cu_seqlens, ctx.shape, ctx.dtype, ctx.average,
                                          ctx.backend)
        else:
            _, backward = _segment_ops(ctx.backend)
            grad = backward(grad_out.contiguous(), count, mask, cu_seqlens, ctx.shape, ctx.dtype, ctx.average)
        return grad, None, None, None, None


def sequence_logprobs(
    token_logp: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    average: bool = False,
) -> torch.Tensor:
    """Log-prob of each sequence: the masked sum of its token log-probs, or their mean.

    Padded: ``token_logp [B, T]`` with ``mask [B, T]`` (or None: every token counts). Packed:
    ``token_logp [N]`` with ``cu_seqlens [B+1]`` (and an optional ``mask [N]``). ``mask`` may be
    bool, integer or floating; non-zero = counted, and masked values are ignored whatever they hold::

        seq_i = Σ_{t ∈ i} m_t·logp_t          average=True:  seq_i / n_i,  n_i = Σ_{t ∈ i} m_t

    An empty (or fully masked) sequence gives 0, also when averaging. The op is linear, so double
    backward (``create_graph=True``) is supported. Returns ``[B]`` float32
    (float64 for float64 input), differentiable w.r.t. ``token_logp`` (gradient in its dtype).

    ``linear_token_logprobs`` already gives 0 at ``ignore_index`` labels, so a plain sum needs no
    mask; a mean does (pass ``mask = labels != -100``), since the count is taken from the mask.
    """
    layout = token_layout(token_logp, "token_logp", mask, cu_seqlens)
    check.check_bool(average, "average")
    counted = mask if mask is None or mask.dtype == torch.bool else mask != 0
    packed_cu = None if cu_seqlens is None else layout.cu_seqlens.contiguous()

    backend = select_backend(token_logp)
    if backend == "reference":
        if packed_cu is not None:
            check_cu_seqlens_values(packed_cu, token_logp.shape[0])
        return reference.sequence_logprobs(token_logp, counted, packed_cu, average)
    if not direct_call_ok(token_logp, counted, packed_cu):
        out, _ = _sequence_logprobs_fwd(token_logp, counted, packed_cu, average, backend)
        return out
    if torch.is_grad_enabled() and token_logp.requires_grad:
        return _EagerSequenceLogprobs.apply(token_logp, counted, packed_cu, average, backend)
    return _forward(token_logp, counted, packed_cu, average, backend)[0]
