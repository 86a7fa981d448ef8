"""Preference losses: ``dpo_loss`` (in ``fastpo.dpo``), ``simpo_loss``, ``orpo_loss``, ``kto_loss``, ``cpo_loss``.

They act on one value per pair (or sample), usually the ``[B]`` output of ``fastpo.sequence_logprobs``:
the expensive part, the log-probs, is done by the fused ops before them. Each function validates
its arguments and runs the numerically stable composite of ``fastpo.reference.preference`` (the
spec), which traces under ``torch.compile(fullgraph=True)``; it returns a ``LossOutput`` whose
loss is the mean over pairs and whose metrics are detached scalars from the same pass.

Shapes: all log-prob arguments share one shape, ``[B]`` in the contract (any shape is accepted and
averaged over all elements; an empty batch gives loss 0). Any floating dtype; computed in float32
(float64 when an input is float64); gradients come back in the inputs' dtypes. Reference log-probs
are treated as constants (detached).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from fastpo import _preference_checks as pc
from fastpo import _validation as check
from fastpo.dpo import dpo_loss, ld_sequence_logprobs, wpo_weights
from fastpo.loss_output import LossOutput
from fastpo.ops.sequence_logprobs import sequence_logprobs
from fastpo.reference import preference as spec

__all__ = ["dpo_loss", "ld_sequence_logprobs", "wpo_weights", "simpo_loss", "orpo_loss", "kto_loss", "cpo_loss",
           "nll_loss", "kto_kl_ref_point"]


def simpo_loss(chosen_avg_logp: torch.Tensor, rejected_avg_logp: torch.Tensor, *,
               beta: float = 2.0, gamma: float = 1.0) -> LossOutput:
    """SimPO (Meng et al. 2024): mean of −logσ(β·(c − r) − γ) over pairs, no reference model.

    ``c``, ``r``: length-averaged log-probs (``sequence_logprobs(..., average=True)``); γ is the
    target reward margin (any finite value). Metrics as ``dpo_loss`` with rewards β·c and β·r.
    """
    pc.same_shape(chosen_avg_logp=chosen_avg_logp, rejected_avg_logp=rejected_avg_logp)
    beta = pc.positive(beta, "beta")
    gamma = pc.real(gamma, "gamma")
    return spec.simpo_loss(chosen_avg_logp, rejected_avg_logp, beta, gamma)


def orpo_loss(chosen_avg_logp: torch.Tensor, rejected_avg_logp: torch.Tensor, *, beta: float = 0.1) -> LossOutput:
    """ORPO's odds-ratio term (Hong et al. 2024): mean of −β·logσ(log odds(c) − log odds(r)).

    log odds(p) = logp − log(1 − e^logp) on length-averaged log-probs, computed stably
    (``log1p``/``expm1`` forms; logp is clamped to ≤ −eps of the compute dtype, where p = 1 would
    have infinite odds). β is the paper's λ and multiplies the log-sigmoid, as in TRL's
    ORPOTrainer; add the result to your SFT (NLL) loss. Metrics as ``dpo_loss`` (rewards β·c, β·r)
    plus ``log_odds_ratio`` (mean logσ(·)) and ``log_odds_chosen`` (mean log-odds difference).
    """
    pc.same_shape(chosen_avg_logp=chosen_avg_logp, rejected_avg_logp=rejected_avg_logp)
    beta = pc.positive(beta, "beta")
    return spec.orpo_loss(chosen_avg_logp, rejected_avg_logp, beta)


def kto_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    desirable: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl_ref_point: Union[None, float, torch.Tensor] = None,
    loss_type: str = "kto",
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024) on unpaired samples, mean over the batch, as TRL's KTOTrainer.

    With ℓ = logp − ref_logp and z0 the KL reference point, per sample::

        kto                desirable: w_d·(1 − σ(β·(ℓ − z0)))    undesirable: w_u·(1 − σ(β·(z0 − ℓ)))
        apo_zero_unpaired  desirable: w_d·(1 − σ(β·ℓ))           undesirable: w_u·σ(β·ℓ)    (APO-zero)

    ``desirable``: bool (or integer, non-zero = desirable) tensor shaped like ``logp``.
    ``kl_ref_point``: z0 as a number or a one-element tensor, used as max(z0, 0) and detached.
    None means z0 = 0; to follow TRL, pass ``fastpo.kto_kl_ref_point(kl_logp, ref_kl_logp)``, the
    mean log-ratio of mismatched (prompt, completion) pairs. apo_zero_unpaired takes no z0.
    Metrics (TRL's names in brackets): ``reward_chosen`` / ``reward_rejected`` (rewards/chosen,
    rewards/rejected: mean β·ℓ of the desirable / undesirable samples, 0 when there are none; TRL
    logs nothing then), ``reward_margin`` (rewards/margins), ``logps_chosen`` / ``logps_rejected``
    (logps/*), ``kl_ref_point`` (kl) and ``reward_accuracy`` (fraction of samples whose β·(ℓ − z0)
    has the sign of their label; not in TRL). β, the weights and a float z0 may change between
    compiled calls without a recompile per value.
    """
    pc.same_shape(logp=logp, ref_logp=ref_logp)
    if not isinstance(desirable, torch.Tensor):
        raise TypeError(f"desirable must be a torch.Tensor, got {type(desirable).__name__}")
    if desirable.dtype != torch.bool and desirable.dtype not in check.INT_DTYPES:
        raise TypeError(f"desirable must be a bool or integer tensor, got dtype {desirable.dtype}")
    if tuple(desirable.shape) != tuple(logp.shape):
        raise ValueError(f"desirable must have the shape of logp, got desirable {check.shape_of(desirable)} "
                         f"and logp {check.shape_of(logp)}")
    check.check_same_device(logp=logp, desirable=desirable)
    beta = pc.positive(beta, "beta")
    desirable_weight = pc.real(desirable_weight, "desirable_weight", low=0.0)
    undesirable_weight = pc.real(undesirable_weight, "undesirable_weight", low=0.0)
    pc.choice(loss_type, "loss_type", spec.KTO_LOSS_TYPES)
    if isinstance(kl_ref_point, torch.Tensor):
        kl_ref_point = pc.scalar_tensor(kl_ref_point, "kl_ref_point", logp, "logp")
    elif kl_ref_point is not None:
        kl_ref_point = pc.real(kl_ref_point, "kl_ref_point")
    if loss_type == "apo_zero_unpaired" and kl_ref_point is not None:
        raise ValueError("loss_type 'apo_zero_unpaired' has no KL reference point; pass kl_ref_point=None")
    return spec.kto_loss(logp, ref_logp, desirable, beta, desirable_weight, undesirable_weight, kl_ref_point,
                         loss_type)


def kto_kl_ref_point(kl_logp: torch.Tensor, ref_kl_logp: torch.Tensor) -> torch.Tensor:
    """KTO's KL reference point from mismatched pairs, as TRL: max(mean(kl_logp − ref_kl_logp), 0), detached.

    ``kl_logp`` / ``ref_kl_logp``: the policy's / reference's sequence log-probs (sums over the
    completion tokens, e.g. ``fastpo.sequence_logprobs``) of mismatched (prompt, completion) pairs:
    TRL rotates the completions by one within each batch, (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n−1}),
    i.e. ``completions[(i − 1) % n]`` for prompt i. 0-d; 0 for an empty batch. Under data
    parallelism TRL averages the ranks' means before the clamp. Pass it as ``kto_loss(kl_ref_point=)``.
    """
    pc.same_shape(kl_logp=kl_logp, ref_kl_logp=ref_kl_logp)
    return spec.kto_kl_ref_point(kl_logp, ref_kl_logp)


def nll_loss(token_logp: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
             cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The token-mean NLL over a batch: −Σ_{counted t} logp_t / (number of counted tokens), 0-d.

    One mean over every counted token of the batch (not a mean of per-sequence means), the
    normalisation of TRL's DPO ``sft`` term (so RPO's) and of CPO's ``cpo_alpha`` term. 0 when no
    token is counted (TRL: NaN). Padded ``[B, T]`` with ``mask``, packed ``[N]`` with
    ``cu_seqlens``, or any flat ``[N]`` of tokens; through the fused ``fastpo.sequence_logprobs``,
    differentiable.
    """
    check.check_float_tensor(token_logp, "token_logp")
    if token_logp.dim() == 1 and cu_seqlens is None:  # a flat run of tokens: one sequence
        token_logp, mask = token_logp.unsqueeze(0), None if mask is None else mask.unsqueeze(0)
    seq = sequence_logprobs(token_logp, mask, cu_seqlens=cu_seqlens)
    return spec.token_mean_nll(seq, token_logp, mask)


def cpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    nll: Optional[torch.Tensor] = None,
    cpo_alpha: Optional[float] = None,
) -> LossOutput:
    """CPO (Xu et al. 2024), SimPO and AlphaPO as TRL 1.16's ``CPOTrainer``: no reference model.

    With u = c − r, or, when α = ``alpha`` ≠ 0, AlphaPO's reward difference with
    r(p) = (1 − p^(−α))/α (exponent clamped at 20, finite for logp down to −1e4), and ε = label smoothing::

        sigmoid  −(1−ε)·logσ(βu) − ε·logσ(−βu)            pass summed log-probs
        hinge    relu(1 − βu)                              summed
        ipo      (u − 1/(2β))²                             length-averaged (TRL averages for ipo, simpo)
        simpo    the sigmoid form on u − γ/β, γ = ``simpo_gamma``       length-averaged
        alphapo  simpo with cpo_alpha = 0 (TRL's sugar); set ``alpha`` for the reward shape

    loss = mean(·) + cpo_alpha·nll, where ``nll`` is the token-mean NLL of the chosen responses
    (``fastpo.nll_loss(chosen_token_logp, chosen_mask)``, TRL's ``CrossEntropyLoss`` over the
    chosen tokens). ``cpo_alpha`` defaults to TRL's 1.0 (0 for alphapo); ``nll`` is needed unless
    cpo_alpha is 0. Metrics as ``dpo_loss`` (rewards β·u's terms, logps, ``nll_loss``). ``alpha``
    = 0 selects the plain form and is fixed per compiled graph; the other scalars may change freely.
    """
    pc.same_shape(chosen_logp=chosen_logp, rejected_logp=rejected_logp)
    beta = pc.positive(beta, "beta")
    pc.choice(loss_type, "loss_type", spec.CPO_LOSS_TYPES)
    label_smoothing = pc.real(label_smoothing, "label_smoothing", low=0.0, high=0.5, high_open=True)
    if not pc.traced(label_smoothing) and label_smoothing > 0 and loss_type in ("hinge", "ipo"):
        raise ValueError(f"label_smoothing applies to loss types sigmoid, simpo and alphapo only, got "
                         f"label_smoothing={label_smoothing} with loss_type={loss_type!r}")
    simpo_gamma = pc.real(simpo_gamma, "simpo_gamma")
    alpha = pc.real(alpha, "alpha")
    if cpo_alpha is None:
        cpo_alpha = 0.0 if loss_type == "alphapo" else 1.0
    cpo_alpha = pc.real(cpo_alpha, "cpo_alpha")
    if loss_type == "alphapo" and not pc.traced(cpo_alpha) and cpo_alpha != 0:
        raise ValueError(f"loss_type 'alphapo' is simpo without the NLL term (cpo_alpha = 0), got "
                         f"cpo_alpha={cpo_alpha}; use loss_type='simpo' with alpha= for both")
    if nll is not None:
        nll = pc.scalar_tensor(nll, "nll", chosen_logp, "chosen_logp")
    elif not pc.traced(cpo_alpha) and cpo_alpha != 0:
        raise ValueError(f"cpo_alpha={cpo_alpha} needs nll=fastpo.nll_loss(chosen_token_logp, chosen_mask); "
                         "pass cpo_alpha=0 for no NLL term")
    return spec.cpo_loss(chosen_logp, rejected_logp, beta, loss_type, label_smoothing, simpo_gamma, alpha, nll,
                         cpo_alpha)
