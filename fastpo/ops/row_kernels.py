"""The log-prob row kernels of one backend: ``logprob_forward`` and ``logprob_backward``, and what
the two log-prob ops share around them.

Both backends share one contract (see ``fastpo.kernels.logprobs``): rows of ``logits [N, V]`` with
a contiguous last dimension and any row stride (or ``[B, T, V]`` blocks of such rows, see
:func:`as_row_blocks`), contiguous ``labels [N]`` int64, and results in
float32 (float64 for float64): logp, entropy, the backward's row statistics ``row_max`` (the raw
maximum of each row) and ``log_norm`` (log Σ e^{(z − row_max)/τ}), and the optional statistics
selected by ``extras`` (:data:`EXTRA_BITS`).
"""

from __future__ import annotations

from types import ModuleType

import torch

from fastpo._backend import kernel_module
from fastpo._layout import accumulation_dtype
from fastpo._validation import (
    check_temperature, check_temperature_rows, check_temperature_rows_value, check_temperature_value, plain_eager,
)
from fastpo.reference.logprobs import OUTPUT_NAMES, LogProbOutputs


# Log-probs, entropies and the row statistics are float32, or float64 for float64 inputs (for gradcheck).
result_dtype = accumulation_dtype


_ROW_KERNELS: dict = {}


def row_kernels(backend: str) -> ModuleType:
    module = _ROW_KERNELS.get(backend)
    if module is None:
        module = _ROW_KERNELS[backend] = kernel_module(
            backend, triton="fastpo.kernels.logprobs", cpu="fastpo.ops.cpu_logprobs", what="row")
    return module


def flat_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels [...]`` as the kernels take them: ``[N]`` int64 and contiguous (a strided view such as
    ``ids[:, 3]`` or an ``expand``ed one is copied: N integers)."""
    if labels.dim() == 1 and labels.dtype == torch.int64 and labels.is_contiguous():
        return labels  # the common case, without the ~1.5 us of three no-op calls
    return labels.reshape(-1).to(torch.int64).contiguous()


# The optional, non-differentiable per-row statistics of the forward, as a bitmask ``extras``:
# log Σ_j p_j², whether the label is the (first) argmax, and the mean of z/τ over the vocabulary.
EXTRA_SUM_SQ, EXTRA_TOP1, EXTRA_MEAN = 1, 2, 4
# Public output names -> bit (``logp`` and ``entropy`` are the differentiable ones).
EXTRA_BITS = {"log_sum_sq_probs": EXTRA_SUM_SQ, "is_top1": EXTRA_TOP1, "mean_logits": EXTRA_MEAN}
N_FORWARD_OUTPUTS = 7


def extra_outputs(like: torch.Tensor, extras: int):
    """(log_sum_sq_probs, is_top1, mean_logits) buffers like ``like``: uninitialised where ``extras``
    asks for them (the kernel writes every row), zeros otherwise."""
    return tuple(torch.empty_like(like) if extras & bit else torch.zeros_like(like)
                 for bit in (EXTRA_SUM_SQ, EXTRA_TOP1, EXTRA_MEAN))


def extras_mask(wanted) -> int:
    """The ``extras`` bitmask of a set of output names (None: none)."""
    return sum(bit for name, bit in EXTRA_BITS.items() if wanted and name in wanted)


def named_outputs(results, shape, wanted):
    """The public :class:`LogProbOutputs` of a forward op's seven results, each viewed as ``shape``;
    the optional statistics are detached, is_top1 as bool."""
    logp, entropy, _, _, sum_sq, top1, mean = results
    named = {"logp": logp, "entropy": entropy, "log_sum_sq_probs": sum_sq.detach(),
             "is_top1": top1.detach() != 0, "mean_logits": mean.detach()}
    return LogProbOutputs(**{name: named[name].view(shape) for name in OUTPUT_NAMES if name in wanted})


def empty_row_outputs(rows: torch.Tensor, dtype: torch.dtype, n_rows=None):
    """Uninitialised forward results (also the fake ones): logp, entropy, row_max, log_norm,
    log_sum_sq_probs, is_top1 (0/1) and mean_logits, each ``[n_rows]`` (default ``rows.shape[0]``)."""
    out = rows.new_empty(rows.shape[0] if n_rows is None else n_rows, dtype=result_dtype(dtype))
    return (out,) + tuple(torch.empty_like(out) for _ in range(N_FORWARD_OUTPUTS - 1))


def as_row_blocks(logits: torch.Tensor) -> torch.Tensor:
    """``logits [..., V]`` as the ops take it, copying only when the kernels cannot read it in place:
    ``[N, V]`` rows at any row stride, or ``[B, T, V]`` blocks of such rows for a batch that is not
    one stride apart, such as the shifted ``logits[:, :-1]`` of a ``[B, T + 1, V]`` model output
    (``reshape`` would copy all of it). A last dimension that is not contiguous (a transpose) or
    rows that overlap (an ``expand``) are made contiguous."""
    vocab = logits.shape[-1]
    if logits.dim() == 2 and logits.stride(-1) == 1 and logits.stride(0) >= vocab:
        return logits  # [N, V] rows the kernels read in place (the common case, checked first)
    if logits.dim() == 3 and logits.stride(-1) == 1 and logits.stride(1) >= vocab \
            and logits.stride(0) > logits.shape[1] * logits.stride(1):
        return logits
    rows = logits.reshape(-1, vocab)
    if rows.stride(-1) != 1 or rows.stride(0) < vocab:
        rows = rows.contiguous()
    return rows


def num_rows(blocks: torch.Tensor):
    """Rows of an :func:`as_row_blocks` tensor."""
    return blocks.shape[0] * blocks.shape[1] if blocks.dim() == 3 else blocks.shape[0]


def temperature_args(temperature, rows=None, checked=True):
    """(temperature, inv_temperature_rows) as the row kernels take them, from a float, a 0-d tensor (the
    scalar temperature: ``inv_temperature_rows`` None, today's path) or a per-token ``[N]`` temperature
    tensor (then ``1.0`` and its reciprocal, sliced to ``rows``). ``checked``: check the values
    (finite, > 0) first."""
    if not isinstance(temperature, torch.Tensor):
        return (check_temperature_value(temperature) if checked else temperature), None
    if temperature.dim() == 0:
        value = float(temperature)
        return (check_temperature_value(value) if checked else value), None
    if checked:
        check_temperature_rows_value(temperature)
    part = temperature if rows is None else temperature[rows]
    return 1.0, part.reciprocal().contiguous()


def temperature_input(temperature, labels: torch.Tensor, dtype: torch.dtype):
    """The public ``temperature`` argument checked: a float (returned as is, for the scalar path) or a
    per-token tensor (returned ``[N]`` in the ops' result dtype for ``dtype`` logits, detached)."""
    if isinstance(temperature, torch.Tensor):
        return check_temperature_rows(temperature, labels, result_dtype(dtype)).reshape(-1)
    return check_temperature(temperature)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def direct_call_ok(*tensors) -> bool:
    """Whether an op may skip the ``torch.library`` dispatcher and call its kernels (through a plain
    ``autograd.Function``) directly: in eager mode only, on plain CPU/CUDA tensors, with no dispatch or
    torch-function mode (FakeTensorMode, a device context, a FLOP counter) and no functorch transform
    active. The custom ops' Python dispatch costs ~60 us a forward + backward; everything else
    (``torch.compile``, ``opcheck``, fake and meta tensors, tensor subclasses) goes through them."""
    if not plain_eager():
        return False
    return all(t is None or (type(t) in _PLAIN_TENSOR_TYPES and (t.is_cpu or t.is_cuda)) for t in tensors)


def no_double_backward(public_name: str):
    """An autograd formula for a backward op that refuses to be differentiated: the fused backward
    kernels have no derivative of their own."""

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"fastpo.{public_name} does not support double backward (a gradient of its gradient, e.g. "
            f"autograd.grad(..., create_graph=True) followed by a second backward): its backward is a fused "
            f"kernel with no derivative. Use fastpo.reference.{public_name} for higher-order gradients.")

    return backward
