"""``fastpo.dpo_loss``: TRL 1.16's DPO loss types, MPO weights, f-divergences, WPO, LD-DPO and RPO.

The loss acts on one value per pair (the ``[B]`` output of ``fastpo.sequence_logprobs``); it
validates its arguments and runs the composite of ``fastpo.reference.dpo`` (the spec). The helpers
that need tokens, LD-DPO's sequence log-probs and WPO's weights, go through the fused
``fastpo.sequence_logprobs`` op.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from fastpo import _preference_checks as pc
from fastpo import _validation as check
from fastpo.loss_output import LossOutput
from fastpo.ops.sequence_logprobs import sequence_logprobs
from fastpo.reference import dpo as spec

__all__ = ["dpo_loss", "ld_sequence_logprobs", "wpo_weights", "DPO_LOSS_TYPES", "F_DIVERGENCES"]

DPO_LOSS_TYPES = spec.DPO_LOSS_TYPES
F_DIVERGENCES = spec.F_DIVERGENCES
_SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")  # the types that read label_smoothing
_SORTED = ("aot", "aot_unpaired")


def _loss_types(loss_type) -> Tuple[str, ...]:
    if isinstance(loss_type, str):
        types = (loss_type,)
    elif isinstance(loss_type, (list, tuple)) and loss_type:
        types = tuple(loss_type)
    else:
        raise TypeError(f"loss_type must be a str or a non-empty list of str, got {loss_type!r}")
    for t in types:
        pc.choice(t, "loss_type", DPO_LOSS_TYPES)
    return types


def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: Optional[torch.Tensor] = None,
    ref_rejected_logp: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    label_smoothing: float = 0.0,
    loss_weights: Optional[Sequence[float]] = None,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    nll: Optional[torch.Tensor] = None,
    rpo_alpha: Optional[float] = None,
) -> LossOutput:
    """DPO and its variants on sequence log-probs, as TRL 1.16's ``DPOTrainer`` computes them.

    With ρc = chosen − ref_chosen, ρr = rejected − ref_rejected (reference-free: refs are 0),
    f-divergence scores sc = f(ρc), sr = f(ρr), Δ = sc − sr, z = βΔ, ε = ``label_smoothing``::

        sigmoid       −(1−ε)·logσ(z) − ε·logσ(−z)           DPO; cDPO when ε > 0 (TRL 1.16 ignores ε here)
        hinge         relu(1 − z)                           SLiC
        ipo           (sc/|c| − sr/|r| − 1/(2β))²            IPO; no lengths: (Δ − 1/(2β))², pass averages
        exo_pair      σ(z)(logσ(z) − log(1−ε)) + σ(−z)(logσ(−z) − log ε)    EXO, needs ε > 0
        nca_pair      −logσ(βρc) − ½logσ(−βρc) − ½logσ(−βρr)
        robust        ((1−ε)·(−logσ(z)) + ε·logσ(−z)) / (1−2ε)
        bco_pair      −logσ(βρc) − logσ(−βρr)
        sppo_hard     (ρc − 1/(2β))² + (ρr + 1/(2β))²
        aot           cDPO form on sort(c − r) − sort(ref_c − ref_r) (sorted over the batch)
        aot_unpaired  cDPO form on sort(ρc) − sort(ρr)
        apo_zero      1 − σ(βρc) + σ(βρr)
        apo_down      σ(βρc) + 1 − σ(β(ρc − ρr))
        discopop      (1 − σ(z/τ))·(−logσ(z)) + σ(z/τ)·e^(−z)            τ = ``discopop_tau``
        sft           ``nll`` (the token-mean NLL of the chosen responses, ``fastpo.nll_loss``)
        sigmoid_norm  −logσ(β·(sc/|c| − sr/|r|))              needs the lengths

    ``loss_type`` may be a list; the loss is Σ_k w_k·mean(loss_k·weights) with ``loss_weights``
    (default 1 each: MPO's combination). ``f_divergence``: ``reverse_kl`` (f(ρ) = ρ),
    ``forward_kl`` (1 − e^(−ρ)), ``js_divergence`` (log 2 + logσ(ρ)), ``alpha_divergence``
    ((e^((α−1)ρ) − 1)/(α−1), α = ``f_alpha``); a non-default one needs every loss type in
    sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft (as TRL). Exponents are clamped
    at 20 (TRL: only the α-divergence's, at 80), so log-probs down to −1e4 give finite values where
    TRL gives inf/NaN.

    ``chosen_lengths`` / ``rejected_lengths``: completion token counts (clamped ≥ 1), for ipo and
    sigmoid_norm. ``weights``: per-pair weights, detached, multiplying every loss type's per-pair
    loss (WPO: ``wpo_weights(chosen...) * wpo_weights(rejected...)``; not with aot, which sorts).
    For LD-DPO pass the log-probs of ``ld_sequence_logprobs`` (policy and reference alike).

    RPO (Pang et al. 2024): ``rpo_alpha=α`` adds α·``nll`` to the loss, where ``nll`` is the NLL of
    the chosen responses **per token**: one mean over all chosen completion tokens of the batch
    (``fastpo.nll_loss(chosen_token_logp, chosen_mask)``). It is TRL 1.16's RPO,
    ``loss_type=[..., "sft"]`` with weight α, WPO weights included (TRL 1.16 has no ``rpo_alpha``;
    older TRL's ``rpo_alpha`` added the same token-mean NLL).

    Metrics (TRL's names in brackets): ``reward_chosen``/``reward_rejected`` (rewards/chosen,
    rewards/rejected: means of βρ), ``reward_accuracy`` (rewards/accuracies: fraction with
    βρc > βρr), ``reward_margin`` (rewards/margins), ``logps_chosen``/``logps_rejected``
    (logps/chosen, logps/rejected: means of the log-probs given), and ``nll_loss`` when ``nll`` is
    given. ``beta``, ``label_smoothing``, ``f_alpha``, ``discopop_tau``, ``rpo_alpha`` and the loss
    weights may change between compiled calls without a recompile per value.
    """
    pc.same_shape(chosen_logp=chosen_logp, rejected_logp=rejected_logp,
                  ref_chosen_logp=ref_chosen_logp, ref_rejected_logp=ref_rejected_logp)
    if (ref_chosen_logp is None) != (ref_rejected_logp is None):
        raise ValueError("ref_chosen_logp and ref_rejected_logp must both be given or both be None "
                         "(reference-free), got only one")
    beta = pc.positive(beta, "beta")
    types = _loss_types(loss_type)
    shown = loss_type if isinstance(loss_type, str) else list(types)
    if loss_weights is not None:
        if not isinstance(loss_weights, (list, tuple)):
            raise TypeError(f"loss_weights must be a list of numbers, got {type(loss_weights).__name__}")
        if len(loss_weights) != len(types):
            raise ValueError(f"loss_weights must have one weight per loss type, got {len(loss_weights)} "
                             f"weights for loss_type {shown!r}")
        loss_weights = [pc.real(w, "loss_weights") for w in loss_weights]
    label_smoothing = pc.real(label_smoothing, "label_smoothing", low=0.0, high=0.5, high_open=True)
    uses_eps = [t for t in types if t in _SMOOTHED]
    if not pc.traced(label_smoothing):
        if label_smoothing > 0 and not uses_eps:
            raise ValueError(f"label_smoothing applies to loss types {_SMOOTHED} only, got "
                             f"label_smoothing={label_smoothing} with loss_type={shown!r}")
        if label_smoothing == 0 and "exo_pair" in types:
            raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (log ε; the EXO paper uses 1e-3)")
    pc.choice(f_divergence, "f_divergence", F_DIVERGENCES)
    if f_divergence != "reverse_kl":
        bad = [t for t in types if t not in spec.F_DIVERGENCE_LOSS_TYPES]
        if bad:
            raise ValueError(f"f_divergence={f_divergence!r} is defined for loss types "
                             f"{spec.F_DIVERGENCE_LOSS_TYPES} only (the f-DPO normaliser cancels in Δ "
                             f"alone), got loss_type {shown!r}")
    f_alpha = pc.real(f_alpha, "f_alpha")
    discopop_tau = pc.positive(discopop_tau, "discopop_tau")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("chosen_lengths and rejected_lengths must both be given or both be None, got only one")
    if chosen_lengths is not None:
        pc.like(chosen_lengths, "chosen_lengths", chosen_logp, "chosen_logp", integer_ok=True)
        pc.like(rejected_lengths, "rejected_lengths", chosen_logp, "chosen_logp", integer_ok=True)
    elif "sigmoid_norm" in types:
        raise ValueError("loss_type 'sigmoid_norm' needs chosen_lengths and rejected_lengths "
                         "(completion token counts)")
    if weights is not None:
        pc.like(weights, "weights", chosen_logp, "chosen_logp")
        if any(t in _SORTED for t in types):
            raise ValueError("weights (WPO) cannot be combined with loss types 'aot' / 'aot_unpaired': they sort "
                             "the pairs, which would misalign per-pair weights")
    if rpo_alpha is not None:
        rpo_alpha = pc.real(rpo_alpha, "rpo_alpha")
    needs_nll = "sft" in types or rpo_alpha is not None
    if nll is not None:
        nll = pc.scalar_tensor(nll, "nll", chosen_logp, "chosen_logp")
        if not needs_nll:
            raise ValueError("nll is read by loss type 'sft' and by rpo_alpha only; got neither "
                             f"(loss_type={shown!r})")
    elif needs_nll:
        raise ValueError("loss type 'sft' and rpo_alpha need nll: pass nll=fastpo.nll_loss(chosen_token_logp, "
                         "chosen_mask)")
    return spec.dpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, types,
                         label_smoothing, loss_weights=loss_weights, f_divergence=f_divergence, f_alpha=f_alpha,
                         discopop_tau=discopop_tau, chosen_lengths=chosen_lengths,
                         rejected_lengths=rejected_lengths, weights=weights, nll=nll, rpo_alpha=rpo_alpha)


def _padded(token_logp, mask, name: str, mask_name: str) -> torch.Tensor:
    check.check_float_tensor(token_logp, name)
    if token_logp.dim() != 2:
        raise ValueError(f"{name} must be padded [B, T], got shape {check.shape_of(token_logp)}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{mask_name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(token_logp.shape):
        raise ValueError(f"{mask_name} must have the shape of {name}, got {mask_name} {check.shape_of(mask)} "
                         f"and {name} {check.shape_of(token_logp)}")
    check.check_same_device(**{name: token_logp, mask_name: mask})
    return mask != 0


def ld_sequence_logprobs(chosen_token_logp: torch.Tensor, rejected_token_logp: torch.Tensor,
                         chosen_mask: torch.Tensor, rejected_mask: torch.Tensor, *,
                         ld_alpha: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's length-desensitised sequence log-probs (Liu et al. 2024), as TRL's ``ld_alpha``.

    Per pair, with L = min(counted chosen tokens, counted rejected tokens): the sum over the first L
    counted tokens of a response plus ``ld_alpha`` × the sum over the rest. Two
    ``fastpo.sequence_logprobs`` calls (shared prefix, tail) per response. Padded ``[B, T]`` inputs
    (the chosen and rejected T may differ); masked tokens are ignored whatever they hold. Apply it to
    the reference's token log-probs too, and pass the results to ``dpo_loss``.
    ``ld_alpha`` ∈ [0, 1]: 1 is plain DPO, 0 drops the tokens past the shared length.
    """
    c_mask = _padded(chosen_token_logp, chosen_mask, "chosen_token_logp", "chosen_mask")
    r_mask = _padded(rejected_token_logp, rejected_mask, "rejected_token_logp", "rejected_mask")
    if chosen_token_logp.shape[0] != rejected_token_logp.shape[0]:
        raise ValueError(f"chosen_token_logp and rejected_token_logp must have one row per pair, got "
                         f"{check.shape_of(chosen_token_logp)} and {check.shape_of(rejected_token_logp)}")
    ld_alpha = pc.real(ld_alpha, "ld_alpha", low=0.0, high=1.0)
    shared = torch.minimum(c_mask.sum(-1), r_mask.sum(-1)).unsqueeze(-1)
    out = []
    for x, m in ((chosen_token_logp, c_mask), (rejected_token_logp, r_mask)):
        in_prefix = m & (m.cumsum(-1) <= shared)
        out.append(sequence_logprobs(x, in_prefix) + ld_alpha * sequence_logprobs(x, m & ~in_prefix))
    return out[0], out[1]


def wpo_weights(token_logp: torch.Tensor, log_sum_sq_probs: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """WPO's per-sequence weight (Zhou et al. 2024, eq. 2) as TRL computes it: ``[B]``, detached.

    w = exp(mean over the counted tokens of (logp_t − log Σ_v π_t(v)²)), the policy's own
    probability of the response relative to its on-policy baseline (0 counted tokens: mean 0). The
    exponent is clamped at 20 (TRL: no clamp). ``log_sum_sq_probs``: log Σ_v softmax(z_t)² per
    token, shaped like ``token_logp``. The pair weight for ``dpo_loss(weights=)`` is the product of
    the chosen and the rejected response's weights.
    """
    check.check_float_tensor(token_logp, "token_logp")
    pc.like(log_sum_sq_probs, "log_sum_sq_probs", token_logp, "token_logp")
    with torch.no_grad():
        aligned = token_logp.detach() - log_sum_sq_probs.detach()
        mean = sequence_logprobs(aligned, mask, cu_seqlens=cu_seqlens, average=True)
        return torch.exp(mean.clamp(max=spec.exp_clamp_max(mean.dtype)))
