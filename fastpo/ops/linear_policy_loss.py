"""``fastpo.linear_policy_loss``: last hidden states → policy loss in three lm_head GEMMs, never building
the ``[N, V]`` logits.

``policy_loss(linear_token_logprobs(h, W, labels), ...)`` costs four GEMMs: the logits, the logits
again in the backward, ∂h and ∂W. When a config is token-local (``PolicyLossConfig.token_local``:
∂L/∂logp_t reads only token t, besides constants of the batch such as the masks, the aggregation
weights and the rollout IS weights), the loss's per-token derivative is known as soon as the chunk's
log-probs are, so one pass over the token chunks does everything (the **one-pass path**):

    z_c = h_c·Wᵀ + b → (logp_c, entropy_c)            (the row kernel's forward)
    u_c = ∂(Σ_t w_t·l_t)/∂logp_c, e_c = ∂(…)/∂entropy_c   (the policy-loss kernel on the sequences
                                                            overlapping the chunk; see _chunk_units)
    G_c = u_c·∂logp_c/∂z_c + e_c·∂entropy_c/∂z_c          (the row kernel's backward, in place of z_c)
    ∂h_c = G_c·W,   ∂W += G_cᵀ·h_c,   ∂b += Σ_rows G_c     (fastpo.ops.lm_head)

Then the policy-loss kernel runs once over the whole batch for the loss, the global scale
s = 1/denominator and the metrics. Since L = s·Σ_t w_t·l_t, the true gradients are s·∂h, s·∂W and s·∂b,
and the backward only multiplies them by g·s (g the upstream gradient).

Other configs (GSPO's sequence ratio, geo_mean, vespo) take the **two-phase path**: the log-probs of
every chunk first, then the loss kernel over the whole batch for the per-token derivative, then one
recompute pass that forms G_c and the gradient GEMMs: four GEMMs, with the same memory bound. Both
paths run in the forward; peak extra memory is one chunk of logits plus the gradient buffers (∂h in
hidden's dtype, ∂W and ∂b in float32), which the backward returns scaled.

Configs that need ``policy_loss``'s detached pre-pass over the batch (token selection, rejection
sampling, product / floored / batch-normalised rollout weights: ``fastpo.ops.policy_prepass``) are
computed as ``policy_loss(linear_token_logprobs(...))`` itself: the log-probs in the forward, the
recompute in the backward, four GEMMs with the same memory bound.
"""

from __future__ import annotations

import bisect
from typing import List, Optional

import torch

from fastpo import _validation as check
from fastpo import reference
from fastpo._backend import select_backend
from fastpo._layout import check_cu_seqlens_values, check_like_layout, flat_inputs, token_layout
from fastpo.loss_output import LossOutput
from fastpo.ops.linear_token_logprobs import _chunk_rows, linear_token_logprobs
from fastpo.ops.lm_head import (
    add_chunk_gradients, check_head_operands, chunk_logits, gather_in_backward, gradient_buffers, head_gather,
    resolve_head_weight,
)
from fastpo.ops.loss_spec import POLICY_METRICS, STATS, TokenLossSpec, policy_spec_lists
from fastpo.ops.policy_loss import (
    check_policy_inputs, default_norm_length, loss_kernels, metrics_from, policy_loss, run_forward,
)
from fastpo.ops.policy_prepass import needs_prepass
from fastpo.ops.row_kernels import flat_labels, no_double_backward, result_dtype, row_kernels
from fastpo.policy_config import GRPO, PolicyLossConfig
from fastpo.reference.logprobs import check_logit_transform

__all__ = ["linear_policy_loss"]


def _chunk_units(kernels, spec: TokenLossSpec, start: int, end: int, cu_host: List[int], cu: torch.Tensor,
                 per_token):
    """(u, e) of tokens [start, end): the policy-loss kernel over the whole sequences that overlap them,
    so that each sequence's constants (its token count, its rollout IS weight) are the batch's. Their
    tokens outside the chunk hold placeholder log-probs, which a token-local loss never reads for the
    chunk's tokens; the sub-batch's own scale is not used (the global one comes from the whole batch)."""
    first = bisect.bisect_right(cu_host, start) - 1
    last = bisect.bisect_left(cu_host, end, lo=first)
    lo, hi = cu_host[first], cu_host[last]
    sub = [None if t is None else t[lo:hi] for t in per_token]
    _, _, unit, unit_ent = kernels.token_loss_forward(*sub, cu[first:last + 1] - lo, None, spec)
    rows = slice(start - lo, end - lo)
    return unit[rows], (unit_ent[rows] if spec.has_entropy else None)


@torch.library.custom_op("fastpo::linear_policy_loss_fwd", mutates_args=())
def _linear_policy_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    old_logp: torch.Tensor, advantages: torch.Tensor, ref_logp: Optional[torch.Tensor],
    rollout: Optional[torch.Tensor], mask: Optional[torch.Tensor], cu_seqlens: torch.Tensor,
    num_tokens: Optional[torch.Tensor], num_tokens_int: int, floats: List[float], ints: List[int], packed: bool,
    temperature: torch.Tensor, ignore_index: int, logit_softcap: float, logit_scale: float, chunk_size: int,
    one_pass: bool, needs_grad: List[bool], backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats, logp, entropy, ∂h, ∂W, ∂b) with the gradients of Σ_t w_t·l_t (not yet scaled by
    stats[1]); ``needs_grad`` = (hidden, weight, bias) flags, a gradient not needed comes back empty."""
    tau = check.check_temperature_value(float(temperature))
    check.check_label_range(labels, weight.shape[0], ignore_index)
    if packed:
        check_cu_seqlens_values(cu_seqlens, labels.numel())
    spec = TokenLossSpec.from_lists(floats, ints)
    rows_k, loss_k = row_kernels(backend), loss_kernels(backend)
    n_tokens = hidden.shape[0]
    chunk = _chunk_rows(chunk_size, n_tokens, weight.shape[0])
    dt = result_dtype(hidden.dtype)
    logp = hidden.new_zeros(n_tokens, dtype=dt)  # zeros: the placeholder of the chunks not yet scored
    entropy = hidden.new_zeros(n_tokens if spec.has_entropy else 0, dtype=dt)
    row_max, log_norm = hidden.new_empty(n_tokens, dtype=dt), hidden.new_empty(n_tokens, dtype=dt)
    needs = any(needs_grad)
    grads = gradient_buffers(hidden, weight, bias, *needs_grad)
    per_token = (logp, old_logp, advantages, ref_logp, entropy if spec.has_entropy else None, rollout, mask)
    cu_host = cu_seqlens.tolist() if one_pass and needs else []
    transform = (logit_softcap, logit_scale)

    def backward_chunk(rows, logits, unit, unit_ent):
        rows_k.logprob_backward(logits, labels[rows], row_max[rows], log_norm[rows], entropy[rows] if
                                spec.has_entropy else logp[rows], unit, unit_ent, tau, ignore_index, logits,
                                *transform)
        add_chunk_gradients(logits, hidden[rows], weight, rows, *grads)

    for start in range(0, n_tokens, chunk):
        rows = slice(start, min(start + chunk, n_tokens))
        logits = chunk_logits(hidden[rows], weight, bias)
        out = rows_k.logprob_forward(logits, labels[rows], tau, ignore_index, spec.has_entropy, 0, *transform)
        logp[rows], row_max[rows], log_norm[rows] = out[0], out[2], out[3]
        if spec.has_entropy:
            entropy[rows] = out[1]
        if one_pass and needs:
            backward_chunk(rows, logits, *_chunk_units(loss_k, spec, rows.start, rows.stop, cu_host, cu_seqlens,
                                                       per_token))
        del logits, out
    loss, stats, unit, unit_ent = run_forward(*per_token, cu_seqlens, num_tokens, floats, ints, packed, backend,
                                              num_tokens_int)
    if needs and not one_pass:
        for start in range(0, n_tokens, chunk):
            rows = slice(start, min(start + chunk, n_tokens))
            backward_chunk(rows, chunk_logits(hidden[rows], weight, bias), unit[rows],
                           unit_ent[rows] if spec.has_entropy else None)
    return (loss, stats, logp, entropy) + grads


@_linear_policy_fwd.register_fake
def _(hidden, weight, bias, labels, old_logp, advantages, ref_logp, rollout, mask, cu_seqlens, num_tokens,
      num_tokens_int, floats, ints, packed, temperature, ignore_index, logit_softcap, logit_scale, chunk_size,
      one_pass, needs_grad, backend):
    dt = result_dtype(hidden.dtype)
    n = hidden.shape[0]
    has_entropy = bool(TokenLossSpec.from_lists(floats, ints).has_entropy)
    grads = gradient_buffers(hidden, weight, bias, *needs_grad)
    return (hidden.new_empty((), dtype=dt), hidden.new_empty(len(STATS), dtype=dt), hidden.new_empty(n, dtype=dt),
            hidden.new_empty(n if has_entropy else 0, dtype=dt)) + tuple(torch.empty_like(g) for g in grads)


@torch.library.custom_op("fastpo::linear_policy_loss_bwd", mutates_args=())
def _linear_policy_bwd(grad_loss: torch.Tensor, stats: torch.Tensor, grad_hidden: torch.Tensor,
                       grad_weight: torch.Tensor, grad_bias: torch.Tensor, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward's gradients times g·stats[1] (the upstream gradient and the global scale), in ``dtype``."""
    c = grad_loss.to(stats.dtype) * stats[1]
    return tuple((g * c.to(g.dtype) if g.dtype == dtype else (g * c).to(dtype)) for g in
                 (grad_hidden, grad_weight, grad_bias))


@_linear_policy_bwd.register_fake
def _(grad_loss, stats, grad_hidden, grad_weight, grad_bias, dtype):
    return tuple(torch.empty_like(g, dtype=dtype) for g in (grad_hidden, grad_weight, grad_bias))


torch.library.register_autograd("fastpo::linear_policy_loss_bwd", no_double_backward("linear_policy_loss"))


def _scale_in_place(factor: torch.Tensor, *buffers: torch.Tensor) -> None:
    """The forward's gradient buffers times ``factor`` (0-d), in place: no second ∂weight-sized buffer.
    Through ``.data``: the buffers are this op's own saved outputs, and a later backward through a retained
    graph reads them knowing the factor applied (``ctx.applied``), so their version must not change."""
    for g in buffers:
        if g.numel():
            g.data.mul_(factor.to(g.dtype))


def _setup_context(ctx, inputs, output):
    ctx.dtype = inputs[0].dtype
    ctx.needs_grad = inputs[21]
    ctx.save_for_backward(output[1], *output[4:])
    ctx.set_materialize_grads(False)
    ctx.applied = None


def _backward(ctx, grad_loss, *_):
    stats, grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 23
    if torch.is_grad_enabled():  # create_graph=True: the gradient would be differentiated
        no_double_backward("linear_policy_loss")(ctx)
    buffers = (grad_hidden, grad_weight, grad_bias)
    if torch.compiler.is_compiling():  # a traced backward: out of place (AOTAutograd owns the buffers)
        grads = _linear_policy_bwd(grad_loss.contiguous(), stats, *buffers, ctx.dtype)
    elif ctx.applied is None:
        # The first backward scales the buffers in place and hands them to autograd (which takes them
        # without a copy once the graph frees its saved tensors).
        ctx.applied = grad_loss.detach().to(stats.dtype).reshape(()) * stats[1]
        _scale_in_place(ctx.applied, *buffers)
        grads = [g if g.dtype == ctx.dtype else g.to(ctx.dtype) for g in buffers]
    else:
        # Another backward through a retained graph: the buffers hold applied·G, so rescale out of place.
        if float(ctx.applied) == 0.0:
            raise RuntimeError("fastpo.linear_policy_loss: a second backward through a retained graph needs the "
                               "first one's upstream gradient to be non-zero (its gradients were scaled in place)")
        ratio = grad_loss.detach().to(stats.dtype).reshape(()) * stats[1] / ctx.applied
        grads = [(g * ratio.to(g.dtype)).to(ctx.dtype) for g in buffers]
    grads = [g if needed else None for g, needed in zip(grads, ctx.needs_grad)]
    return tuple(grads) + (None,) * 20


torch.library.register_autograd("fastpo::linear_policy_loss_fwd", _backward, setup_context=_setup_context)


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    rollout_logp: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    num_tokens=None,
    config: PolicyLossConfig = GRPO,
    temperature: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    compute_entropy: Optional[bool] = None,
    chunk_size: Optional[int] = None,
    process_group=None,
    generator: Optional[torch.Generator] = None,
    entropy_threshold=None,
    weight_gather=None,
) -> LossOutput:
    """``policy_loss(linear_token_logprobs(hidden, weight, labels, ...), old_logp, advantages, mask, ...)``
    in one fused op: three lm_head GEMMs for token-local configs, four otherwise, and never ``[N, V]``.

    ``hidden [B, T, D]`` with ``labels [B, T]`` (padded layout, ``mask [B, T]``) or ``hidden [N, D]`` with
    ``labels [N]`` and ``cu_seqlens`` (packed); ``weight [V, D]`` and ``bias [V]`` the lm_head, in
    hidden's dtype. Every per-token input (``old_logp``, ``advantages``, ``ref_logp``, ``rollout_logp``,
    ``is_weights``, ``mask``) is shaped like ``labels`` and means what it means in
    :func:`fastpo.policy_loss`, as do ``num_tokens`` and ``config``; ``temperature``, ``ignore_index``
    (a label there scores logp 0; mask it out), ``logit_softcap`` and ``logit_scale`` as in
    :func:`fastpo.linear_token_logprobs`. The entropy (for ``config.entropy_coef`` and the "entropy"
    metric, and ``top_entropy_quantile``'s mask) is computed when ``compute_entropy`` (default: when the
    config reads it). ``process_group``, ``generator`` and ``entropy_threshold`` go to the token selection
    and rollout correction of :func:`fastpo.policy_loss`.

    Gradients flow to ``hidden``, ``weight`` and ``bias`` (each only when it requires grad: a frozen
    LoRA lm_head skips its GEMM). They are computed in the forward, chunk by chunk (``chunk_size`` rows,
    default ``fastpo.ops.linear_token_logprobs.default_chunk_size``), and held until the backward, which
    scales them in place by the upstream gradient (a double backward raises ``NotImplementedError``).
    Peak extra memory is one chunk of logits plus ∂hidden (hidden's dtype) and float32 ∂weight, which
    becomes the weight's gradient (for a float32 weight) without a copy.

    An FSDP2 DTensor ``weight`` / ``bias`` is gathered once per call, and ``weight_gather`` (ZeRO-3) is
    entered around the forward, as in :func:`fastpo.linear_token_logprobs` (the gradients are formed in the
    forward; the composed pre-pass path re-gathers for its backward's recompute).

    Returns ``LossOutput(loss, metrics)`` with :func:`fastpo.policy_loss`'s metrics.
    """
    weight, bias = resolve_head_weight(weight, hidden.dtype), resolve_head_weight(bias, hidden.dtype)
    with head_gather(weight_gather, weight, bias):
        out = _linear_policy_loss(hidden, weight, labels, old_logp, advantages, mask, cu_seqlens, ref_logp,
                                   rollout_logp, is_weights, num_tokens, config, temperature, bias, ignore_index,
                                   logit_softcap, logit_scale, compute_entropy, chunk_size, process_group, generator,
                                   entropy_threshold, weight_gather)
    gather_in_backward(out.loss, weight_gather, weight, bias)  # for the accumulation (gradients formed in the forward)
    return out


def _linear_policy_loss(hidden, weight, labels, old_logp, advantages, mask, cu_seqlens, ref_logp, rollout_logp,
                        is_weights, num_tokens, config, temperature, bias, ignore_index, logit_softcap, logit_scale,
                        compute_entropy, chunk_size, process_group, generator, entropy_threshold, weight_gather):
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a fastpo.PolicyLossConfig, got {type(config).__name__}")
    check_head_operands(hidden, weight, bias)
    layout = token_layout(old_logp, "old_logp", mask, cu_seqlens)
    check_like_layout(layout, labels, "labels", "old_logp", floating=False)
    check.check_aligned_labels(labels, hidden, "hidden")
    check.check_same_device(hidden=hidden, weight=weight, labels=labels, old_logp=old_logp, bias=bias)
    reads_entropy = config.entropy_coef != 0 or config.top_entropy_quantile < 1.0
    with_entropy = reads_entropy if compute_entropy is None else check.check_bool(compute_entropy, "compute_entropy")
    if reads_entropy and not with_entropy:
        raise ValueError(f"config (entropy_coef={config.entropy_coef}, top_entropy_quantile="
                         f"{config.top_entropy_quantile}) reads the entropy: compute_entropy must not be False")
    num_tokens = check_policy_inputs(layout, config, advantages=advantages, ref_logp=ref_logp,
                                     rollout_logp=rollout_logp, is_weights=is_weights, num_tokens=num_tokens,
                                     has_entropy=with_entropy, generator=generator,
                                     entropy_threshold=entropy_threshold)
    temperature = check.check_temperature(temperature)
    ignore_index = check.check_int(ignore_index, "ignore_index")
    softcap, scale = check_logit_transform(logit_softcap, logit_scale)
    if chunk_size is not None:
        check.check_int(chunk_size, "chunk_size")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")

    if needs_prepass(config):
        return _composed(hidden, weight, labels, old_logp, advantages, mask, bias, temperature, ignore_index,
                         logit_softcap, logit_scale, with_entropy, chunk_size, weight_gather,
                         dict(cu_seqlens=cu_seqlens, ref_logp=ref_logp, rollout_logp=rollout_logp,
                              is_weights=is_weights, num_tokens=num_tokens, config=config,
                              process_group=process_group, generator=generator,
                              entropy_threshold=entropy_threshold))
    if process_group is not None or generator is not None or entropy_threshold is not None:
        raise ValueError("process_group, generator and entropy_threshold apply to configs with token selection or "
                         "batch-level rollout correction only (see fastpo.policy_loss)")

    backend = select_backend(hidden)
    if backend == "reference":
        check.check_label_range(labels, weight.shape[0], ignore_index)
        return reference.linear_policy_loss(
            hidden, weight, labels, old_logp, advantages, mask, cu_seqlens=cu_seqlens, ref_logp=ref_logp,
            rollout_logp=rollout_logp, is_weights=is_weights, num_tokens=num_tokens, config=config,
            temperature=temperature, bias=bias, ignore_index=ignore_index, logit_softcap=logit_softcap,
            logit_scale=logit_scale, compute_entropy=with_entropy)

    floats, ints = policy_spec_lists(config, has_ref=ref_logp is not None, has_entropy=with_entropy,
                                     norm_length=default_norm_length(layout, config.norm_length),
                                     has_is_weights=is_weights is not None)
    roll = rollout_logp if is_weights is None else is_weights  # the kernels' rollout slot (see loss_spec)
    old, adv, ref, roll, m = flat_inputs(layout, old_logp, advantages, ref_logp, roll, layout.mask)
    grad_on = torch.is_grad_enabled()
    needs_grad = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    tensor_count = isinstance(num_tokens, torch.Tensor)
    loss, stats, *_ = _linear_policy_fwd(
        hidden.reshape(labels.numel(), hidden.shape[-1]), weight, bias, flat_labels(labels), old, adv, ref, roll, m,
        layout.cu_seqlens, num_tokens if tensor_count else None, -1 if num_tokens is None or tensor_count
        else num_tokens, floats, ints, not layout.is_padded, check.scalar_tensor(temperature), ignore_index,
        softcap, scale, 0 if chunk_size is None else chunk_size, config.token_local, needs_grad, backend)
    return LossOutput(loss, metrics_from(stats, POLICY_METRICS))


def _composed(hidden, weight, labels, old_logp, advantages, mask, bias, temperature, ignore_index, logit_softcap,
              logit_scale, with_entropy, chunk_size, weight_gather, loss_kwargs) -> LossOutput:
    """The two public ops in turn (the pre-pass configs; see the module docstring)."""
    scored = linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                   ignore_index=ignore_index, return_entropy=with_entropy,
                                   logit_softcap=logit_softcap, logit_scale=logit_scale, chunk_size=chunk_size,
                                   weight_gather=weight_gather)
    logp, entropy = scored if with_entropy else (scored, None)
    return policy_loss(logp, old_logp, advantages, mask, entropy=entropy, **loss_kwargs)
