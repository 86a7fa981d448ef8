"""The lm_head steps shared by the fused linear ops (``linear_token_logprobs``, ``linear_policy_loss``,
``linear_distill_loss``): operand checks, one chunk's logits, one chunk's gradient GEMMs, and the sharded
heads (an FSDP2 DTensor weight, a ZeRO-3 partitioned one).

For a chunk of rows ``h_c [C, D]`` with logit gradient ``G_c = ∂L/∂(h_c·Wᵀ + b) [C, V]``:
    ∂L/∂h_c = G_c·W,   ∂L/∂W += G_cᵀ·h_c,   ∂L/∂b += Σ_rows G_c
with ∂L/∂W and ∂L/∂b accumulated in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Optional

import torch

from fastpo import _validation as check
from fastpo.ops.row_kernels import result_dtype

__all__ = ["check_head_operands", "chunk_logits", "gradient_buffers", "add_chunk_gradients", "resolve_head_weight",
           "head_gather", "gather_in_backward"]


def check_head_operands(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """``hidden [..., D]``, ``weight [V, D]`` (V >= 1) and ``bias [V]`` or None, floating, one dtype."""
    check.check_float_tensor(hidden, "hidden")
    check.check_float_tensor(weight, "weight")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or weight.shape[0] < 1:
        raise ValueError(
            f"hidden [..., D] and weight [V, D] must share D (and V >= 1), got hidden {check.shape_of(hidden)} "
            f"and weight {check.shape_of(weight)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None:
        check.check_float_tensor(bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {check.shape_of(bias)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.linear(hidden, weight, bias)


def gradient_buffers(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], needs_hidden: bool,
                     needs_weight: bool, needs_bias: bool):
    """(grad_hidden in hidden's dtype, grad_weight and grad_bias zero-filled accumulators in float32), each
    empty when not needed (a frozen lm_head, no bias)."""
    acc = result_dtype(weight.dtype)
    grad_hidden = hidden.new_empty(hidden.shape) if needs_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_weight else weight.new_empty(0)
    needs_bias = needs_bias and bias is not None
    grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if needs_bias else weight.new_empty(0)
    return grad_hidden, grad_weight, grad_bias


def add_chunk_gradients(grad_logits: torch.Tensor, hidden_rows: torch.Tensor, weight: torch.Tensor, rows: slice,
                        grad_hidden: torch.Tensor, grad_weight: torch.Tensor, grad_bias: torch.Tensor) -> None:
    """Write ∂L/∂h of the chunk ``rows`` into ``grad_hidden[rows]`` and add its ∂L/∂W, ∂L/∂b to the
    accumulators (each skipped when its buffer is empty)."""
    if grad_hidden.numel():
        torch.mm(grad_logits, weight, out=grad_hidden[rows])
    if grad_weight.numel() or grad_bias.numel():
        grad_logits_acc = grad_logits.to(grad_weight.dtype if grad_weight.numel() else grad_bias.dtype)
        if grad_weight.numel():
            grad_weight.addmm_(grad_logits_acc.t(), hidden_rows.to(grad_logits_acc.dtype))
        if grad_bias.numel():
            grad_bias += grad_logits_acc.sum(dim=0)


# ------------------------------------------------------------------------------------ sharded heads
WeightGather = Callable[[torch.Tensor, Optional[torch.Tensor]], ContextManager]

_GRAD_REDUCE = ("avg", "sum", "none")
_VIEW_NODES = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0")


def resolve_head_weight(weight: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None, *,
                        grad_reduce: str = "avg") -> Optional[torch.Tensor]:
    """An FSDP2 (DTensor) lm_head weight or bias as the plain full tensor, gathered once per call (every
    chunk then reads it); anything else (a plain tensor, None) is returned as it is.

    The DTensor is cast to ``dtype`` first when given (FSDP2 keeps float32 shards under a bfloat16
    ``MixedPrecisionPolicy``; the cast is local, so the all-gather moves 16-bit values). The gather is
    differentiable: in the backward each rank's gradient of the full weight is reduce-scattered onto
    the shards, averaged over the mesh (``grad_reduce="avg"``: FSDP2's own gradient averaging, and exact
    on mesh dimensions whose ranks hold the same data), summed (``"sum"``: a loss summed over ranks), or
    left as DTensor's default (``"none"``: each rank keeps its own gradient's chunk, unreduced; what
    ``DTensor.full_tensor()`` alone, and TRL 1.16, do)."""
    if weight is None:
        return None
    if grad_reduce not in _GRAD_REDUCE:
        raise ValueError(f"grad_reduce must be one of {_GRAD_REDUCE}, got {grad_reduce!r}")
    try:
        from torch.distributed.tensor import DTensor, Partial
    except ImportError:  # a torch built without distributed
        return weight
    if not isinstance(weight, DTensor):
        return weight
    if dtype is not None and weight.dtype != dtype:
        weight = weight.to(dtype)
    if grad_reduce == "none":
        return weight.full_tensor()
    return weight.full_tensor(grad_placements=[Partial(grad_reduce)] * weight.device_mesh.ndim)


_GATHERED: set = set()  # ids of the weights inside a head_gather now (nested calls gather once)


def head_gather(weight_gather: Optional[WeightGather], weight: torch.Tensor,
                bias: Optional[torch.Tensor]) -> ContextManager:
    """``weight_gather(weight, bias)`` (a ZeRO-3 gather such as ``deepspeed.zero.GatheredParameters``,
    wrapped like TRL's ``maybe_gather_lm_head_ctx``), or a null context when there is none, or when this
    head is already inside one (a fused op calling another, e.g. linear_policy_loss's composed path)."""
    if weight_gather is None or id(weight) in _GATHERED:
        return nullcontext()
    if not callable(weight_gather):
        raise TypeError(f"weight_gather must be a callable (weight, bias) -> context manager or None, got "
                        f"{type(weight_gather).__name__}")
    return _tracked(weight_gather(weight, bias), id(weight))


@contextmanager
def _tracked(ctx: ContextManager, key: int):
    _GATHERED.add(key)
    try:
        with ctx:
            yield
    finally:
        _GATHERED.discard(key)


def gather_in_backward(output, weight_gather: Optional[WeightGather], weight: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> None:
    """Re-enter ``weight_gather(weight, bias)`` in the backward of ``output`` (a tensor, or a tuple of them
    whose first one with a graph is used), around the fused op's autograd node: the node whose gradient
    edges reach the head's ``AccumulateGrad`` (or, for a frozen head, the first node past the public ops'
    views). A ZeRO-3 parameter is saved as itself, so while the context holds the full data the saved
    weight reads it (the backward's recompute). The context is entered just before that node runs and left
    once the head's gradients are accumulated into ``weight.grad`` / ``bias.grad`` (those nodes run right
    after it; accumulating a full gradient needs the full parameter, and hooks such as ZeRO-3's gradient
    partitioning see it gathered), or right after the node for a frozen head. An op that forms its
    gradients in the forward (linear_policy_loss, a reduced linear_distill_loss) thus still gathers once
    in the backward, for the accumulation. No-op without a gather or a graph; eager only (node hooks)."""
    if weight_gather is None:  # first: the common case touches nothing (torch.compile traces through it)
        return
    if isinstance(output, (tuple, list)):  # (logp, entropy) or a LogProbOutputs: the first one with a graph
        output = next((t for t in output if isinstance(t, torch.Tensor) and t.grad_fn is not None), None)
    if output is None or output.grad_fn is None:
        return
    node, accumulators = _head_node(output.grad_fn, [t for t in (weight, bias) if t is not None])
    active, pending = [], []

    def enter(_grad_outputs):
        ctx = head_gather(weight_gather, weight, bias)
        ctx.__enter__()
        active.append(ctx)
        pending[:] = accumulators

    def leave():
        if active:
            active.pop().__exit__(None, None, None)

    def after_node(_grad_inputs, _grad_outputs):
        if not pending:
            leave()

    def after_accumulate(acc):
        def hook(_grad_inputs, _grad_outputs):
            if acc in pending:
                pending.remove(acc)
                if not pending:
                    leave()
        return hook

    node.register_prehook(enter)
    node.register_hook(after_node)
    for acc in accumulators:
        acc.register_hook(after_accumulate(acc))


def _head_node(root, head, limit: int = 256):
    """(node, its AccumulateGrad edges of ``head``): the first node, breadth-first from ``root``, with such
    edges; else (the first node past views, [])."""
    first = root
    while type(first).__name__ in _VIEW_NODES:  # the public ops return views of the fused op's [N] results
        first = first.next_functions[0][0]
    queue, seen = [root], set()
    while queue and len(seen) < limit:
        node = queue.pop(0)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        accumulators = [fn for fn, _ in node.next_functions
                        if type(fn).__name__ == "AccumulateGrad" and any(fn.variable is t for t in head)]
        if accumulators:
            return node, accumulators
        queue.extend(fn for fn, _ in node.next_functions)
    return first, []
