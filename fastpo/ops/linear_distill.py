"""``fastpo.linear_distill_loss``: the student/teacher distillation divergence from both models' last hidden
states and lm_heads, never building either model's ``[N, V]`` logits (TRL 1.16's
``ChunkedDivergenceFunction`` semantics; the math is in ``fastpo.reference.distill``).

Tokens go in chunks of ``chunk_size`` rows. For each chunk, both models' logits are formed, the row step
(``fastpo.kernels.distill`` on CUDA, ``fastpo.ops.cpu_distill`` on CPU) reduces them to the per-row
divergence D and student entropy H, and writes w_i·∂D_i/∂x_s in place of the student logits; then
    ∂h_c = G_c·W_s,   ∂W_s += G_cᵀ·h_c,   ∂b_s += Σ_rows G_c        (fastpo.ops.lm_head)
with ∂W_s, ∂b_s accumulated in float32. The teacher is a constant: no gradient, no saved logits.

A reduced loss (``"batchmean"``, ``"sum"``, ``"mean"``, ``num_items_in_batch``) is s·Σ_i c_i·D_i with c the
counted tokens and a scale s known once the forward has run, so the forward takes w = c, and the backward
only multiplies the three gradients by g·s: four GEMMs in all (TRL's function costs six, eight for the
JSD). ``reduction="none"`` returns the per-token D; its backward recomputes both chunks' logits with
w = ∂L/∂D (six GEMMs). Peak extra memory: two chunks of logits plus the gradient buffers.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastpo import _validation as check
from fastpo._backend import kernel_module, select_backend
from fastpo.ops.linear_token_logprobs import _chunk_rows
from fastpo.ops.lm_head import (
    add_chunk_gradients, check_head_operands, chunk_logits, gather_in_backward, gradient_buffers, head_gather,
    resolve_head_weight,
)
from fastpo.ops.row_kernels import no_double_backward, result_dtype
from fastpo.reference import distill as ref
from fastpo.reference.logprobs import check_logit_transform

__all__ = ["linear_distill_loss"]


def _rows(backend: str):
    module = kernel_module(backend, triton="fastpo.kernels.distill", cpu="fastpo.ops.cpu_distill",
                           what="distillation")
    return module.distill_rows


def _passes(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, row_weight, beta, tau, transform, chunk_size,
            backend, grads):
    """Run the chunks: (D [N], H [N]) and, when ``row_weight`` is given, its gradients added to ``grads``."""
    distill_rows = _rows(backend)
    n_tokens = s_hidden.shape[0]
    chunk = _chunk_rows(chunk_size, n_tokens, s_weight.shape[0])
    acc = torch.promote_types(result_dtype(s_hidden.dtype), result_dtype(t_hidden.dtype))
    div = torch.empty(n_tokens, dtype=acc, device=s_hidden.device)
    ent = torch.empty_like(div)
    for start in range(0, n_tokens, chunk):
        rows = slice(start, min(start + chunk, n_tokens))
        s_logits = chunk_logits(s_hidden[rows], s_weight, s_bias)
        t_logits = chunk_logits(t_hidden[rows], t_weight, t_bias)
        weight = None if row_weight is None else row_weight[rows]
        d, h = distill_rows(s_logits, t_logits, weight, beta, tau, *transform)
        div[rows], ent[rows] = d, h
        del t_logits
        if weight is not None:
            add_chunk_gradients(s_logits, s_hidden[rows], s_weight, rows, *grads)
        del s_logits
    return div, ent


@torch.library.custom_op("fastpo::linear_distill_fwd", mutates_args=())
def _distill_fwd(
    s_hidden: torch.Tensor, s_weight: torch.Tensor, s_bias: Optional[torch.Tensor], t_hidden: torch.Tensor,
    t_weight: torch.Tensor, t_bias: Optional[torch.Tensor], counted: torch.Tensor, beta: torch.Tensor,
    temperature: torch.Tensor, s_softcap: float, s_scale: float, t_softcap: float, t_scale: float, chunk_size: int,
    backend: str, fused_grad: bool, needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(D·c [N], H·c [N], Σ D·c, ∂h, ∂W, ∂b of Σ D·c) with c = ``counted`` (0/1 per token); the
    gradients only when ``fused_grad`` (and each when its ``needs_grad`` flag is set), else empty."""
    beta_v = _check_beta_value(float(beta))
    tau = check.check_temperature_value(float(temperature))
    transform = (s_softcap, s_scale, t_softcap, t_scale)
    grads = gradient_buffers(s_hidden, s_weight, s_bias, *(needs_grad if fused_grad else (False,) * 3))
    div, ent = _passes(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, counted if fused_grad else None,
                       beta_v, tau, transform, chunk_size, backend, grads)
    zero = torch.zeros((), dtype=div.dtype, device=div.device)
    valid = counted != 0
    div, ent = torch.where(valid, div, zero), torch.where(valid, ent, zero)
    return (div, ent, div.sum(), *grads)


@_distill_fwd.register_fake
def _(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, counted, beta, temperature, s_softcap, s_scale,
      t_softcap, t_scale, chunk_size, backend, fused_grad, needs_grad):
    acc = torch.promote_types(result_dtype(s_hidden.dtype), result_dtype(t_hidden.dtype))
    div = s_hidden.new_empty(s_hidden.shape[0], dtype=acc)
    flags = needs_grad if fused_grad else (False,) * 3
    grad_h = s_hidden.new_empty(s_hidden.shape) if flags[0] else s_hidden.new_empty(0)
    grad_w = s_weight.new_empty(s_weight.shape, dtype=result_dtype(s_weight.dtype)) if flags[1] \
        else s_weight.new_empty(0)
    grad_b = s_weight.new_empty(s_weight.shape[0], dtype=result_dtype(s_weight.dtype)) \
        if (flags[2] and s_bias is not None) else s_weight.new_empty(0)
    return div, torch.empty_like(div), div.new_empty(()), grad_h, grad_w, grad_b


@torch.library.custom_op("fastpo::linear_distill_scale", mutates_args=())
def _distill_scale(grad_total: torch.Tensor, grad_h: torch.Tensor, grad_w: torch.Tensor, grad_b: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward's gradients of Σ D·c times the upstream gradient, in ``dtype``."""
    return tuple((g * grad_total.to(g.dtype)).to(dtype) for g in (grad_h, grad_w, grad_b))


@_distill_scale.register_fake
def _(grad_total, grad_h, grad_w, grad_b, dtype):
    return tuple(torch.empty_like(g, dtype=dtype) for g in (grad_h, grad_w, grad_b))


torch.library.register_autograd("fastpo::linear_distill_scale", no_double_backward("linear_distill_loss"))


@torch.library.custom_op("fastpo::linear_distill_bwd", mutates_args=())
def _distill_bwd(
    s_hidden: torch.Tensor, s_weight: torch.Tensor, s_bias: Optional[torch.Tensor], t_hidden: torch.Tensor,
    t_weight: torch.Tensor, t_bias: Optional[torch.Tensor], row_weight: torch.Tensor, beta: torch.Tensor,
    temperature: torch.Tensor, s_softcap: float, s_scale: float, t_softcap: float, t_scale: float, chunk_size: int,
    backend: str, needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂h, ∂W, ∂b) of Σ_i w_i·D_i, recomputing both models' chunk logits; unneeded ones empty."""
    grads = gradient_buffers(s_hidden, s_weight, s_bias, *needs_grad)
    _passes(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, row_weight, float(beta), float(temperature),
            (s_softcap, s_scale, t_softcap, t_scale), chunk_size, backend, grads)
    grad_h, grad_w, grad_b = grads
    return grad_h, grad_w.to(s_weight.dtype), grad_b.to(s_weight.dtype)


@_distill_bwd.register_fake
def _(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, row_weight, beta, temperature, s_softcap, s_scale,
      t_softcap, t_scale, chunk_size, backend, needs_grad):
    grad_b = s_weight.new_empty(s_weight.shape[0]) if (needs_grad[2] and s_bias is not None) else s_weight.new_empty(0)
    return (s_hidden.new_empty(s_hidden.shape) if needs_grad[0] else s_hidden.new_empty(0),
            s_weight.new_empty(s_weight.shape) if needs_grad[1] else s_weight.new_empty(0), grad_b)


torch.library.register_autograd("fastpo::linear_distill_bwd", no_double_backward("linear_distill_loss"))


def _setup_context(ctx, inputs, output):
    (s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, counted, beta, temperature, *transform, chunk_size,
     backend, fused_grad, needs_grad) = inputs
    ctx.fused_grad, ctx.dtype = fused_grad, s_hidden.dtype
    ctx.transform, ctx.chunk_size, ctx.backend = tuple(transform), chunk_size, backend
    ctx.set_materialize_grads(False)
    if fused_grad:
        ctx.save_for_backward(*output[3:])
    else:
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, counted, beta, temperature)


def _backward(ctx, grad_div, _grad_ent, grad_total, *_):
    needs = ctx.needs_input_grad[:3]
    if ctx.fused_grad:
        if grad_total is None:
            return (None,) * 17
        grads = _distill_scale(grad_total, *ctx.saved_tensors, ctx.dtype)
    else:
        if grad_div is None and grad_total is None:
            return (None,) * 17
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, counted, beta, temperature = ctx.saved_tensors
        weight = torch.zeros_like(counted) if grad_div is None else grad_div.to(counted.dtype)
        if grad_total is not None:
            weight = weight + grad_total.to(counted.dtype)
        weight = torch.where(counted != 0, weight, torch.zeros((), dtype=counted.dtype, device=counted.device))
        grads = _distill_bwd(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, weight.contiguous(), beta,
                             temperature, *ctx.transform, ctx.chunk_size, ctx.backend, list(needs))
    grads = [g if need else None for g, need in zip(grads, needs)]
    return tuple(grads) + (None,) * 14


torch.library.register_autograd("fastpo::linear_distill_fwd", _backward, setup_context=_setup_context)


def _check_beta_value(beta: float) -> float:
    if not (0.0 <= beta <= 1.0):
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    return beta


def _check_beta(beta):
    if isinstance(beta, bool) or not isinstance(beta, (int, float, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"beta must be a real number in [0, 1], got {type(beta).__name__}")
    if check.is_tracing():
        return beta
    return _check_beta_value(float(beta))


def _transform_args(softcap, scale, who: str):
    try:
        return check_logit_transform(softcap, scale)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("logit_", f"{who}_logit_")) from None


def _check_counted(labels, mask, lead, ignore_index):
    if labels is not None and mask is not None:
        raise ValueError("pass labels (with ignore_index) or mask, not both")
    if labels is not None:
        check.check_int_tensor(labels, "labels")
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels must have the tokens' shape {lead}, got {check.shape_of(labels)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask must have the tokens' shape {lead}, got {check.shape_of(mask)}")
    return ref.counted_tokens(lead, labels, mask, ignore_index)


def linear_distill_loss(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor, labels: Optional[torch.Tensor] = None, *, mask: Optional[torch.Tensor] = None,
    beta: float = 0.5, temperature: float = 1.0, student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None, student_logit_softcap: Optional[float] = None,
    student_logit_scale: Optional[float] = None, teacher_logit_softcap: Optional[float] = None,
    teacher_logit_scale: Optional[float] = None, ignore_index: int = -100, reduction: str = "batchmean",
    num_items_in_batch=None, return_entropy: bool = False, chunk_size: Optional[int] = None, weight_gather=None,
):
    """Distillation loss of a student against a teacher from hidden states ``[..., D_s]`` / ``[..., D_t]`` and
    lm_heads ``[V, D_s]`` / ``[V, D_t]`` (one vocabulary; each model in its own dtype), never building ``[N, V]``.

    ``beta`` 0: forward KL(teacher‖student); 1: reverse KL(student‖teacher); between: the generalised JSD with
    mixture (1 − β)·p_student + β·p_teacher (TRL's definition). ``temperature`` divides both models' logits
    after each model's ``logit_scale`` and ``logit_softcap``. Tokens counted: ``labels != ignore_index`` or
    ``mask != 0`` (one of them, or all). ``reduction``: ``"batchmean"`` (Σ/counted tokens), ``"sum"``,
    ``"mean"`` (Σ/(counted·V), TRL's element mean), ``"none"`` (per-token, 0 where not counted);
    ``num_items_in_batch`` gives Σ/num_items_in_batch. Gradients reach the student only (hidden, weight,
    bias); a double backward raises ``NotImplementedError``. With ``return_entropy``, also the per-token
    student entropy (detached). Returns float32 (float64 for float64 inputs).
    """
    student_weight = resolve_head_weight(student_weight, student_hidden.dtype)
    student_bias = resolve_head_weight(student_bias, student_hidden.dtype)
    teacher_weight = resolve_head_weight(teacher_weight, teacher_hidden.dtype)
    teacher_bias = resolve_head_weight(teacher_bias, teacher_hidden.dtype)
    with head_gather(weight_gather, student_weight, student_bias), \
            head_gather(weight_gather, teacher_weight, teacher_bias):
        out = _linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, mask, beta, temperature,
            student_bias, teacher_bias, student_logit_softcap, student_logit_scale, teacher_logit_softcap,
            teacher_logit_scale, ignore_index, reduction, num_items_in_batch, return_entropy, chunk_size)
    gather_in_backward(out, weight_gather, student_weight, student_bias)  # the recompute / the accumulation
    if reduction == "none" and num_items_in_batch is None:  # the per-token backward recomputes the teacher too
        gather_in_backward(out, weight_gather, teacher_weight, teacher_bias)
    return out


def _linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, mask, beta,
                         temperature, student_bias, teacher_bias, student_logit_softcap, student_logit_scale,
                         teacher_logit_softcap, teacher_logit_scale, ignore_index, reduction, num_items_in_batch,
                         return_entropy, chunk_size):
    check_head_operands(student_hidden, student_weight, student_bias)
    check_head_operands(teacher_hidden, teacher_weight, teacher_bias)
    lead = tuple(student_hidden.shape[:-1])
    if tuple(teacher_hidden.shape[:-1]) != lead or teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"the teacher must score the student's tokens over the same vocabulary: student_hidden "
            f"{check.shape_of(student_hidden)}, student_weight {check.shape_of(student_weight)}, teacher_hidden "
            f"{check.shape_of(teacher_hidden)}, teacher_weight {check.shape_of(teacher_weight)}")
    check.check_same_device(student_hidden=student_hidden, student_weight=student_weight,
                            teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, labels=labels, mask=mask,
                            student_bias=student_bias, teacher_bias=teacher_bias)
    ignore_index = check.check_int(ignore_index, "ignore_index")
    counted = _check_counted(labels, mask, lead, ignore_index)
    beta = _check_beta(beta)
    temperature = check.check_temperature(temperature)
    s_cap, s_scale = _transform_args(student_logit_softcap, student_logit_scale, "student")
    t_cap, t_scale = _transform_args(teacher_logit_softcap, teacher_logit_scale, "teacher")
    check.check_choice(reduction, "reduction", ref.REDUCTIONS)
    check.check_bool(return_entropy, "return_entropy")
    if chunk_size is not None and (check.check_int(chunk_size, "chunk_size") < 1):
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    if num_items_in_batch is not None and not isinstance(num_items_in_batch, (int, float, torch.Tensor)):
        raise TypeError(f"num_items_in_batch must be an int, a float or a tensor, got {type(num_items_in_batch).__name__}")

    backend = select_backend(student_hidden)
    if backend == "reference":
        return ref.linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, mask=mask, beta=beta,
            temperature=temperature, student_bias=student_bias, teacher_bias=teacher_bias,
            student_logit_softcap=student_logit_softcap, student_logit_scale=s_scale,
            teacher_logit_softcap=teacher_logit_softcap, teacher_logit_scale=t_scale, ignore_index=ignore_index,
            reduction=reduction, num_items_in_batch=num_items_in_batch, return_entropy=return_entropy)

    n_tokens = math.prod(lead)
    s_rows = student_hidden.reshape(n_tokens, student_hidden.shape[-1])
    t_rows = teacher_hidden.reshape(n_tokens, teacher_hidden.shape[-1])
    acc = torch.promote_types(result_dtype(student_hidden.dtype), result_dtype(teacher_hidden.dtype))
    weights = (torch.ones(n_tokens, dtype=acc, device=student_hidden.device) if counted is None
               else counted.reshape(n_tokens).to(acc))
    needs_grad = [student_hidden.requires_grad, student_weight.requires_grad,
                  student_bias is not None and student_bias.requires_grad]
    fused = reduction != "none" or num_items_in_batch is not None
    fused = fused and torch.is_grad_enabled() and any(needs_grad)
    div, ent, total, *_ = _distill_fwd(
        s_rows, student_weight, student_bias, t_rows, teacher_weight, teacher_bias, weights,
        check.scalar_tensor(beta), check.scalar_tensor(temperature), s_cap, s_scale, t_cap, t_scale,
        0 if chunk_size is None else chunk_size, backend, fused, needs_grad)
    lead_size = lead[0] if lead else 1
    if reduction == "none" and num_items_in_batch is None:
        loss = div.view(lead)
    else:
        # Σ D·c comes as ``total`` (whose backward scales the forward's gradients); the scale is the reduction's.
        loss = ref.reduce_total(total, counted, n_tokens, reduction, num_items_in_batch, lead_size,
                                student_weight.shape[0])
    if return_entropy:
        return loss, ent.detach().view(lead)
    return loss
