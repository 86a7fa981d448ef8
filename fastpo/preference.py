"""Preference losses: ``dpo_loss`` (sigmoid, robust, hinge, IPO), ``simpo_loss``, ``orpo_loss``, ``kto_loss``.

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

import math
from numbers import Real
from typing import Optional, Union

import torch

from fastpo import _validation as check
from fastpo.loss_output import LossOutput
from fastpo.reference import preference as spec

__all__ = ["dpo_loss", "simpo_loss", "orpo_loss", "kto_loss"]


def _check_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_positive(value, name: str) -> float:
    value = _check_real(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _check_same_shape(**tensors: Optional[torch.Tensor]) -> None:
    """Floating tensors (None skipped) of one shape on one device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    for name, t in present.items():
        check.check_float_tensor(t, name)
    shapes = {tuple(t.shape) for t in present.values()}
    if len(shapes) > 1:
        seen = ", ".join(f"{name} {check.shape_of(t)}" for name, t in present.items())
        raise ValueError(f"log-prob arguments must have one shape, got {seen}")
    check.check_same_device(**present)


def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: Optional[torch.Tensor] = None,
    ref_rejected_logp: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO loss of sequence log-probs, mean over pairs.

    With x = (chosen − ref_chosen) − (rejected − ref_rejected), z = βx and ε = ``label_smoothing``::

        sigmoid = −(1−ε)·logσ(z) − ε·logσ(−z)             DPO (Rafailov et al.); cDPO when ε > 0
        robust  = ((1−ε)·(−logσ(z)) + ε·logσ(−z)) / (1−2ε)   robust DPO (Chowdhury et al.)
        hinge   = relu(1 − z)                             SLiC
        ipo     = (x − 1/(2β))²                           IPO: pass length-averaged log-probs

    ``ref_*`` both None: reference-free (the reference log-probs are taken as 0); both or neither
    must be given. ``label_smoothing`` ∈ [0, 0.5) applies to sigmoid and robust; a non-zero value
    with hinge or ipo is an error (it would be ignored). Metrics: ``reward_chosen``,
    ``reward_rejected`` (means of β·(logp − ref)), ``reward_accuracy`` (fraction of pairs whose
    chosen reward is higher), ``reward_margin`` (mean difference).
    """
    _check_same_shape(chosen_logp=chosen_logp, rejected_logp=rejected_logp,
                      ref_chosen_logp=ref_chosen_logp, ref_rejected_logp=ref_rejected_logp)
    if (ref_chosen_logp is None) != (ref_rejected_logp is None):
        raise ValueError("ref_chosen_logp and ref_rejected_logp must both be given or both be None "
                         "(reference-free), got only one")
    beta = _check_positive(beta, "beta")
    if not isinstance(loss_type, str):
        raise TypeError(f"loss_type must be a str, got {type(loss_type).__name__}")
    if loss_type not in spec.DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {spec.DPO_LOSS_TYPES}, got {loss_type!r}")
    label_smoothing = _check_real(label_smoothing, "label_smoothing")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type in ("hinge", "ipo"):
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' and 'robust' only, "
                         f"got label_smoothing={label_smoothing} with loss_type={loss_type!r}")
    return spec.dpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp,
                         beta, loss_type, label_smoothing)


def simpo_loss(chosen_avg_logp: torch.Tensor, rejected_avg_logp: torch.Tensor, *,
               beta: float = 2.0, gamma: float = 1.0) -> LossOutput:
    """SimPO (Meng et al. 2024): mean of −logσ(β·(c − r) − γ) over pairs, no reference model.

    ``c``, ``r``: length-averaged log-probs (``sequence_logprobs(..., average=True)``); γ is the
    target reward margin (any finite value). Metrics as ``dpo_loss`` with rewards β·c and β·r.
    """
    _check_same_shape(chosen_avg_logp=chosen_avg_logp, rejected_avg_logp=rejected_avg_logp)
    beta = _check_positive(beta, "beta")
    gamma = _check_real(gamma, "gamma")
    return spec.simpo_loss(chosen_avg_logp, rejected_avg_logp, beta, gamma)


def orpo_loss(chosen_avg_logp: torch.Tensor, rejected_avg_logp: torch.Tensor, *, beta: float = 0.1) -> LossOutput:
    """ORPO's odds-ratio term (Hong et al. 2024): mean of −β·logσ(log odds(c) − log odds(r)).

    log odds(p) = logp − log(1 − e^logp) on length-averaged log-probs, computed stably
    (``log1p``/``expm1`` forms; logp is clamped to ≤ −eps of the compute dtype, where p = 1 would
    have infinite odds). β is the paper's λ and multiplies the log-sigmoid, as in TRL's
    ORPOTrainer; add the result to your SFT (NLL) loss. Metrics as ``dpo_loss`` (rewards β·c, β·r)
    plus ``log_odds_ratio`` (mean logσ(·)) and ``log_odds_chosen`` (mean log-odds difference).
    """
    _check_same_shape(chosen_avg_logp=chosen_avg_logp, rejected_avg_logp=rejected_avg_logp)
    beta = _check_positive(beta, "beta")
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
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024) on unpaired samples, mean over the batch.

    With ℓ = logp − ref_logp and z0 the KL reference point, per sample::

        desirable:    w_d·(1 − σ(β·(ℓ − z0)))      undesirable:  w_u·(1 − σ(β·(z0 − ℓ)))

    ``desirable``: bool (or integer, non-zero = desirable) tensor shaped like ``logp``.
    ``kl_ref_point``: z0 as a number or a one-element tensor, used as max(z0, 0) and detached, as
    TRL's KTOTrainer does with its batch KL estimate. None means z0 = 0; to follow TRL, pass the mean
    of ``logp − ref_logp`` over mismatched (prompt, completion) pairs, computed under ``no_grad``.
    Metrics: ``reward_chosen`` / ``reward_rejected`` (mean β·ℓ of the desirable / undesirable
    samples, 0 when there are none), ``reward_margin``, ``reward_accuracy`` (fraction of samples
    whose β·(ℓ − z0) has the sign of their label) and ``kl_ref_point`` (z0).
    """
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    if not isinstance(desirable, torch.Tensor):
        raise TypeError(f"desirable must be a torch.Tensor, got {type(desirable).__name__}")
    if desirable.dtype != torch.bool and desirable.dtype not in check.INT_DTYPES:
        raise TypeError(f"desirable must be a bool or integer tensor, got dtype {desirable.dtype}")
    if tuple(desirable.shape) != tuple(logp.shape):
        raise ValueError(f"desirable must have the shape of logp, got desirable {check.shape_of(desirable)} "
                         f"and logp {check.shape_of(logp)}")
    check.check_same_device(logp=logp, desirable=desirable)
    beta = _check_positive(beta, "beta")
    for value, name in ((desirable_weight, "desirable_weight"), (undesirable_weight, "undesirable_weight")):
        if _check_real(value, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if isinstance(kl_ref_point, torch.Tensor):
        check.check_float_tensor(kl_ref_point, "kl_ref_point")
        if kl_ref_point.numel() != 1:
            raise ValueError(f"kl_ref_point must hold one value, got shape {check.shape_of(kl_ref_point)}")
        check.check_same_device(logp=logp, kl_ref_point=kl_ref_point)
    elif kl_ref_point is not None:
        kl_ref_point = _check_real(kl_ref_point, "kl_ref_point")
    return spec.kto_loss(logp, ref_logp, desirable, beta, float(desirable_weight), float(undesirable_weight),
                         kl_ref_point)
