"""``fastpo.policy_loss``: PPO / GRPO / DAPO / Dr.GRPO / GSPO policy losses in one fused pass.

Layers: public function (validation, layout) → ``torch.library`` custom ops ``fastpo::policy_loss_fwd``
(also ``fastpo::value_loss_fwd``, see ``fastpo.ops.value_loss``) and ``fastpo::policy_loss_bwd``
(shared by both losses) → the per-token loss kernels of the backend (Triton, or the fused C++ pass
on CPU). The forward returns the loss, a ``stats`` vector (loss, global scale, metrics) and the
per-token derivative up to the global scale, so the backward is one multiply.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import List, Optional

import torch

from fastpo import reference
from fastpo._backend import kernel_module, select_backend
from fastpo._layout import (
    TokenLayout, accumulation_dtype, check_cu_seqlens_values, check_like_layout, flat_inputs, token_layout,
)
from fastpo.loss_output import LossOutput
from fastpo.ops.loss_spec import POLICY_METRICS, STATS, TokenLossSpec, check_metric_names, policy_spec_lists
from fastpo.ops.policy_checks import check_num_tokens_value, check_policy_inputs
from fastpo.ops.policy_prepass import needs_prepass, run_prepass
from fastpo.ops.row_kernels import direct_call_ok
from fastpo.policy_config import GRPO, PolicyLossConfig

__all__ = ["policy_loss"]


def loss_kernels(backend: str) -> ModuleType:
    return kernel_module(backend, triton="fastpo.kernels.policy_loss", cpu="fastpo.ops.cpu_policy", what="loss")


def _fake_outputs(x: torch.Tensor, with_entropy: bool):
    dt = accumulation_dtype(x.dtype)
    n = x.numel()
    return (x.new_empty((), dtype=dt), x.new_empty(len(STATS), dtype=dt), x.new_empty(n, dtype=dt),
            x.new_empty(n if with_entropy else 0, dtype=dt))


def run_forward(x, old, adv, ref, ent, roll, mask, cu_seqlens, num_tokens, floats, ints, packed, backend,
                num_tokens_int: int = -1, kl_cov_index=None, kl_cov_scale=None):
    if packed:
        check_cu_seqlens_values(cu_seqlens, x.numel())
    spec = TokenLossSpec.from_lists(floats, ints)
    if num_tokens is not None:
        check_num_tokens_value(num_tokens)
    if num_tokens_int > 0:  # an int num_tokens travels as a SymInt: no recompile per value under torch.compile
        spec = spec._replace(num_tokens=float(num_tokens_int))
    out = loss_kernels(backend).token_loss_forward(x, old, adv, ref, ent, roll, mask, cu_seqlens, num_tokens, spec)
    return out if kl_cov_index is None else add_kl_cov_terms(out, x, old, kl_cov_index, kl_cov_scale)


def add_kl_cov_terms(out, x, old, index, scale):
    """KL-Cov's term on its few selected tokens, inside the fused op: with d_k = x_k − old_k at the flat
    ``index`` and c_k = ``scale``, loss += stats[1]·Σ_k c_k·|d_k| (aggregated like the rest: stats[1] is the
    global scale) and unit[index] += c_k·sgn(d_k) (sgn 0 = 0, as autograd's abs), so the one backward
    multiply covers it: no dense [N] gradient of its own to add."""
    loss, stats, unit, unit_ent = out
    d = x.detach().index_select(0, index).to(scale.dtype) - old.index_select(0, index).to(scale.dtype)
    unit.index_add_(0, index, (scale * torch.sign(d)).to(unit.dtype))
    return loss + (stats[1] * (scale * d.abs()).sum()).to(loss.dtype), stats, unit, unit_ent


@torch.library.custom_op("fastpo::policy_loss_fwd", mutates_args=())
def _policy_loss_fwd(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, ref_logp: Optional[torch.Tensor],
    entropy: Optional[torch.Tensor], rollout_logp: Optional[torch.Tensor], mask: Optional[torch.Tensor],
    cu_seqlens: torch.Tensor, num_tokens: Optional[torch.Tensor], num_tokens_int: int,
    kl_cov_index: Optional[torch.Tensor], kl_cov_scale: Optional[torch.Tensor], floats: List[float],
    ints: List[int], packed: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats, unit, unit_entropy) for flat ``[N]`` inputs (see ``fastpo.ops.loss_spec``);
    ``num_tokens`` (a tensor) or ``num_tokens_int`` (> 0; -1: none) is token_mean's denominator;
    ``kl_cov_index`` / ``kl_cov_scale``: KL-Cov's selected tokens and their constants (see add_kl_cov_terms)."""
    return _run_op_args(logp, old_logp, advantages, ref_logp, entropy, rollout_logp, mask, cu_seqlens, num_tokens,
                        num_tokens_int, kl_cov_index, kl_cov_scale, floats, ints, packed, backend)


@_policy_loss_fwd.register_fake
def _(logp, old_logp, advantages, ref_logp, entropy, rollout_logp, mask, cu_seqlens, num_tokens, num_tokens_int,
      kl_cov_index, kl_cov_scale, floats, ints, packed, backend):
    return _fake_outputs(logp, entropy is not None)


@torch.library.custom_op("fastpo::policy_loss_bwd", mutates_args=())
def _policy_loss_bwd(
    grad_loss: torch.Tensor, stats: torch.Tensor, unit: torch.Tensor, unit_entropy: torch.Tensor,
    x_dtype: torch.dtype, entropy_dtype: torch.dtype, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂x, ∂L/∂entropy) = g·stats[1]·(unit, unit_entropy); shared by policy_loss and value_loss."""
    return loss_kernels(backend).token_loss_backward(grad_loss, stats, unit, unit_entropy, x_dtype, entropy_dtype)


@_policy_loss_bwd.register_fake
def _(grad_loss, stats, unit, unit_entropy, x_dtype, entropy_dtype, backend):
    return torch.empty_like(unit, dtype=x_dtype), torch.empty_like(unit_entropy, dtype=entropy_dtype)


def _no_double_backward(ctx, grad_x, grad_ent):
    raise NotImplementedError(
        "fastpo.policy_loss / fastpo.value_loss: double backward (differentiating the gradient, e.g. after "
        "torch.autograd.grad(..., create_graph=True)) is not implemented; the fused kernels give first-order "
        "gradients only (fastpo.reference has eager, twice-differentiable versions)")


torch.library.register_autograd("fastpo::policy_loss_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def save_for_backward(ctx, x, entropy, output, backend):
    _, stats, unit, unit_ent = output
    ctx.save_for_backward(stats, unit, unit_ent)
    # The backward reads the loss's gradient only: without this, autograd passes it a zero-filled gradient
    # for each of stats / unit / unit_entropy (two [N] allocations and fills per step). They stay
    # differentiable outputs, so that a double backward still reaches _no_double_backward's error.
    ctx.set_materialize_grads(False)
    ctx.x_dtype, ctx.backend = x.dtype, backend
    ctx.entropy_dtype = entropy.dtype if entropy is not None else x.dtype
    ctx.has_entropy = entropy is not None


def backward_grads(ctx, grad_loss):
    """(∂L/∂x, ∂L/∂entropy or None) from what :func:`save_for_backward` kept. A first-order backward in
    plain eager mode calls the kernels directly; a backward that builds a graph (``create_graph=True``) or
    is traced goes through ``fastpo::policy_loss_bwd``, whose autograd formula refuses a double backward."""
    stats, unit, unit_ent = ctx.saved_tensors
    if grad_loss is None:
        return None, None
    if not torch.is_grad_enabled() and direct_call_ok(grad_loss, stats, unit, unit_ent):
        grad_x, grad_ent = loss_kernels(ctx.backend).token_loss_backward(grad_loss, stats, unit, unit_ent,
                                                                         ctx.x_dtype, ctx.entropy_dtype)
    else:
        grad_x, grad_ent = _policy_loss_bwd(grad_loss.contiguous(), stats, unit, unit_ent, ctx.x_dtype,
                                            ctx.entropy_dtype, ctx.backend)
    return grad_x, (grad_ent if ctx.has_entropy else None)


def _setup_context(ctx, inputs, output):
    logp, _, _, _, entropy, *_, backend = inputs
    save_for_backward(ctx, logp, entropy, output, backend)


def _backward(ctx, grad_loss, _stats, _unit, _unit_ent):
    grad_x, grad_ent = backward_grads(ctx, grad_loss)
    return grad_x, None, None, None, grad_ent, None, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastpo::policy_loss_fwd", _backward, setup_context=_setup_context)


def _run_op_args(logp, old_logp, advantages, ref_logp, entropy, rollout_logp, mask, cu_seqlens, num_tokens,
                 num_tokens_int, kl_cov_index, kl_cov_scale, floats, ints, packed, backend):
    """:func:`run_forward` of ``fastpo::policy_loss_fwd``'s arguments (in the op's order)."""
    return run_forward(logp, old_logp, advantages, ref_logp, entropy, rollout_logp, mask, cu_seqlens, num_tokens,
                       floats, ints, packed, backend, num_tokens_int, kl_cov_index, kl_cov_scale)


class _EagerPolicyLoss(torch.autograd.Function):
    """``fastpo::policy_loss_fwd`` and its autograd formula without the ``torch.library`` dispatch (see
    ``fastpo.ops.row_kernels.direct_call_ok``): eager calls on plain tensors only. Returns (loss, stats)."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, ref_logp, entropy, rollout_logp, mask, cu_seqlens, num_tokens,
                num_tokens_int, kl_cov_index, kl_cov_scale, floats, ints, packed, backend):
        output = _run_op_args(logp, old_logp, advantages, ref_logp, entropy, rollout_logp, mask, cu_seqlens,
                              num_tokens, num_tokens_int, kl_cov_index, kl_cov_scale, floats, ints, packed, backend)
        save_for_backward(ctx, logp, entropy, output, backend)
        # stats stays a differentiable output (metrics detach it): under create_graph=True the saved stats then
        # carry a graph into fastpo::policy_loss_bwd, whose formula raises on the double backward
        return output[0], output[1]

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        return _backward(ctx, grad_loss, None, None, None)


def default_norm_length(layout: TokenLayout, norm_length: Optional[int]) -> int:
    """token_sum_norm's L: the config's, else 0: the longest sequence, found in the op (T of a padded
    batch, whose sequences all span T; not passed as T, which would specialise T under torch.compile)."""
    return 0 if norm_length is None else norm_length


_STAT_INDEX = {name: i for i, name in enumerate(STATS)}


def metrics_from(stats: torch.Tensor, names) -> dict:
    parts = stats.detach().unbind()  # one call for every view (indexing costs ~1.5 us a metric)
    return {name: parts[_STAT_INDEX[name]] for name in names}


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    rollout_logp: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    num_tokens=None,
    config: PolicyLossConfig = GRPO,
    process_group=None,
    generator: Optional[torch.Generator] = None,
    entropy_threshold=None,
    metrics=None,
) -> LossOutput:
    """Clipped policy-gradient loss (+ KL, entropy bonus, rollout IS correction), fused, with metrics.

    Layouts: padded ``[B, T]`` with ``mask [B, T]`` (non-zero = counted; None = all counted), or
    packed ``[N]`` with ``cu_seqlens [B+1]`` (and an optional ``mask [N]``). Every per-token tensor
    has ``logp``'s shape. Only ``logp`` and ``entropy`` receive gradients; ``old_logp``,
    ``advantages`` (per token), ``ref_logp`` and ``rollout_logp`` are treated as constants.

    Per counted token, Δ = clamp(logp − old_logp, ±20)::

        r  = exp(Δ)                          ratio_level="token"
        r  = s_i = exp(mean_t Δ) of its sequence, with ∂r_t/∂logp_t = s_i   ratio_level="sequence" (GSPO-token)
        pg = max(−A·r, −A·clip(r, 1 − clip_low, 1 + clip_high)); A < 0 with dual_clip c: min(pg, −c·A)
        w  = rollout IS weight exp(clamp(old_logp − rollout_logp, ±20)) (per token, or the exp of its masked
             mean per sequence), min(w, cap) (``*_truncate``) or w·1[w <= cap] (``*_mask``); a constant
             multiplying pg only (as verl and TRL: not the KL or entropy terms); masked tokens still count
             in the denominators
        l  = w·pg + kl_coef·clamp(k, ±kl_clamp) − entropy_coef·entropy,   δ = clamp(ref_logp − logp, ±20),
             k1 = −δ, k2 = δ²/2, k3 = e^δ − δ − 1, abs = |δ|; "kX+": kX's value with k2's gradient;
             ``kl_bias_correction``: k·r (TRL's use_bias_correction_kl)

    ``config.surrogate`` replaces pg (each in ``fastpo.reference.surrogates``; lo = 1 − clip_low,
    hi = 1 + clip_high): "clip" (above; ``delta`` caps the unclipped r at delta, TRL's two-sided clip),
    "cispo" −sg(clip(r, lo, hi))·A·logp, "cispo_upper" −sg(min(r, hi))·A·logp (TRL), "sapo"
    −σ(τ(r − 1))·(4/τ)·A, "reinforce" −A·logp (verl gpg / bypass REINFORCE), "dppo_tv" / "dppo_kl"
    −A·sg(min(r, dppo_ratio_cap))·logp inside the TV / binary-KL trust region of the token probability,
    "dro" −(A·logp − ½·dro_beta·(logp − old_logp)²), "geo_mean" (GMPO) every token carries its sequence's
    −mean(A)·exp(mean of the sign-aware clipped Δ), "vespo" −sg(φ(exp ΣΔ))·A·logp.
    ``is_weights``: precomputed per-token rollout weights (verl's ``rollout_is_weights``), used as w
    instead of a ``config.rollout_is`` mode (which must then be "none"); geo_mean takes their
    geometric mean per sequence, as verl.

    Aggregation (``config.aggregation``), over counted tokens:

    * ``token_mean``: Σl / (``num_tokens`` or Σmask). Pass ``num_tokens`` = the token count of the whole
      optimizer step (all micro-batches, all data-parallel ranks; an int or a tensor, e.g. after
      ``all_reduce``) and sum the micro-batch losses (no extra division by the number of micro-batches):
      then the gradients add up to those of one token mean over the global batch. Under DDP, which
      averages gradients over ranks, multiply the loss by the world size (as verl's ``dp_size``).
    * ``seq_mean_token_mean``: mean over non-empty sequences of Σ_t l / n_i.
    * ``seq_mean_token_sum``: mean over non-empty sequences of Σ_t l.
    * ``token_sum_norm`` (Dr.GRPO): Σl / (B·L), L = ``config.norm_length``, else T of a padded batch, else
      the longest sequence (``cu_seqlens`` span) of a packed batch.
    * ``token_sum``: Σl (verl's token-sum).
    * ``config.count_empty_sequences``: the sequence means divide by B, empty sequences included (TRL).

    ``num_tokens`` is only accepted with ``token_mean`` (ValueError otherwise): the sequence-mean modes
    divide by a number of sequences, and token_sum_norm by the constant B·L, so under gradient
    accumulation scale those losses by the micro-batch's share yourself. Empty sequences are left out
    of the sequence means; nothing counted gives loss 0 and zero gradients.

    ``num_tokens`` must be a finite count > 0 (ValueError otherwise; 0 too: a micro-batch with nothing
    counted passes the step's count and gets loss 0). A tensor is checked inside the op: a CPU tensor on
    the host, a CUDA one on the device with no host sync (a bad count then fails at the next
    synchronisation with a device-side assertion). Under ``torch.compile`` pass it as a 0-d tensor (an
    int is traced as a SymInt and does not recompile per value either, once the compiler has seen two
    values). The config is a frozen constant: a new ``PolicyLossConfig`` object recompiles.

    Rollout correction and token selection (``fastpo.ops.policy_prepass``: one detached pass over the batch
    before the fused pass, when the config asks for any): the ``config.rollout_is`` weights (geometric mean or
    product, ``rollout_is_floor``, batch-normalised), verl's rejection sampling (``rollout_rejection``: the
    rejected tokens leave the mask), Clip-Cov, KL-Cov, the high-entropy mask and OPSM (see
    :class:`PolicyLossConfig`). NaN rollout log-probs on counted tokens count as Δ = 0 (TRL). ``process_group``
    makes the batch statistics global over data-parallel ranks (the covariance means, counts and picks, the
    entropy quantile, the batch-normalising mean); ``generator`` draws Clip-Cov's random pick (give every rank
    one in the same state); ``entropy_threshold`` (a number or 0-d tensor) replaces the entropy quantile.
    Such configs are not ``token_local``. Their metrics join the others: ``is_mean`` / ``is_min`` /
    ``is_max`` / ``is_std`` / ``is_eff_sample_size`` (the rollout weights over the counted tokens, verl's
    rollout_is_*), ``rejection_frac``, ``clip_cov_frac`` (tokens cut), ``kl_cov_frac`` (tokens selected),
    ``entropy_mask_frac`` (tokens kept), ``off_policy_mask_frac`` (tokens of masked sequences).

    Masked positions are ignored whatever they hold (NaN, ±inf): they reach no sum, metric or gradient.
    Inputs may be any strided view (slices, ``expand``, transposes): non-contiguous ones are copied once.

    Returns ``LossOutput(loss, metrics)``: loss is a float32 scalar (float64 for float64 ``logp``);
    metrics are detached scalars over counted tokens (0 when nothing is counted): ``clip_frac``
    (share of tokens whose clipped branch is active, i.e. zero gradient from the clip; = low + high),
    ``clip_frac_low`` (A < 0 and r < 1 − clip_low), ``clip_frac_high`` (A > 0 and r > 1 + clip_high),
    ``dual_clip_frac`` (A < 0 capped at −c·A), ``ppo_kl`` (mean of −Δ, as verl), ``ref_kl`` (mean of the
    clamped KL estimate; 0 without ``ref_logp``), ``ratio_mean`` / ``ratio_min`` / ``ratio_max`` (of r),
    ``entropy`` (mean entropy; 0 without ``entropy``).

    ``metrics`` (None: all of the above) names the ones to return, e.g. ``("ppo_kl",)`` or ``()``; the
    pre-pass metrics are returned whenever the config runs one. Without ``ref_logp`` and ``entropy`` the CPU
    kernel then skips the sums nobody asked for (``fastpo.ops.loss_spec.METRIC_LEVELS``): the clip flags,
    ppo_kl and the ratio statistics, and with them the exp of the ratio for surrogates that need none.
    """
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a fastpo.PolicyLossConfig, got {type(config).__name__}")
    metric_names = check_metric_names(metrics)
    layout = token_layout(logp, "logp", mask, cu_seqlens)
    check_like_layout(layout, old_logp, "old_logp", "logp")
    if entropy is not None:
        check_like_layout(layout, entropy, "entropy", "logp")
    num_tokens = check_policy_inputs(layout, config, advantages=advantages, ref_logp=ref_logp,
                                     rollout_logp=rollout_logp, is_weights=is_weights, num_tokens=num_tokens,
                                     has_entropy=entropy is not None, generator=generator,
                                     entropy_threshold=entropy_threshold, layout_name="logp")

    backend = select_backend(logp)
    if backend == "reference":
        if not layout.is_padded:
            check_cu_seqlens_values(layout.cu_seqlens, layout.num_tokens)
        if isinstance(num_tokens, torch.Tensor):
            check_num_tokens_value(num_tokens)
        out = reference.policy_loss(logp, old_logp, advantages, mask, cu_seqlens=cu_seqlens, ref_logp=ref_logp,
                                    entropy=entropy, rollout_logp=rollout_logp, is_weights=is_weights,
                                    num_tokens=num_tokens, config=config, process_group=process_group,
                                    generator=generator, entropy_threshold=entropy_threshold)
        if metric_names is not None:
            dropped = set(POLICY_METRICS).difference(metric_names)
            out = LossOutput(out.loss, {k: v for k, v in out.metrics.items() if k not in dropped})
        return out
    pre = None
    if needs_prepass(config):
        pre = run_prepass(config, layout, logp, old_logp, advantages, entropy=entropy, rollout_logp=rollout_logp,
                          is_weights=is_weights, process_group=process_group, generator=generator,
                          entropy_threshold=entropy_threshold)
        is_weights = pre.weights
        if pre.mask is not None:
            layout = dataclasses.replace(layout, mask=pre.mask)

    floats, ints = policy_spec_lists(config, has_ref=ref_logp is not None, has_entropy=entropy is not None,
                                     norm_length=default_norm_length(layout, config.norm_length),
                                     has_is_weights=is_weights is not None, metrics=metric_names)
    roll = rollout_logp if is_weights is None else is_weights  # the kernels' rollout slot (see loss_spec)
    old, adv, ref, roll, m = flat_inputs(layout, old_logp, advantages, ref_logp, roll, layout.mask)
    tensor_count = isinstance(num_tokens, torch.Tensor)
    kl_index = kl_scale = None
    if pre is not None and pre.kl_cov_index is not None:  # KL-Cov's few tokens: folded into the fused op
        kl_index, kl_scale = pre.kl_cov_index, pre.kl_cov_scale
    args = (layout.flat(logp), old, adv, ref, layout.flat(entropy), roll, m, layout.cu_seqlens,
            num_tokens if tensor_count else None, -1 if num_tokens is None or tensor_count else num_tokens,
            kl_index, kl_scale, floats, ints, not layout.is_padded, backend)
    if not direct_call_ok(logp, old, adv, ref, entropy, roll, m, args[8], kl_index, kl_scale):
        loss, stats, _, _ = _policy_loss_fwd(*args)
    elif torch.is_grad_enabled() and (logp.requires_grad or (entropy is not None and entropy.requires_grad)):
        loss, stats = _EagerPolicyLoss.apply(*args)
    else:
        loss, stats, _, _ = _run_op_args(*args)
    metrics = metrics_from(stats, POLICY_METRICS if metric_names is None else metric_names)
    if pre is not None:
        metrics.update(pre.metrics)
    return LossOutput(loss, metrics)
