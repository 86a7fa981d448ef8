"""Reference DPO family: TRL 1.16's fifteen loss types, their weighted sums (MPO), f-divergences, WPO weights.

The spec of ``fastpo.dpo_loss``. Every loss type is a small function of one ``PairTerms`` (the
log-ratios of a batch of pairs and what the variants read from it), looked up by name in
``LOSS_FNS``; ``dpo_loss`` sums ``weight · mean(per-pair loss · pair weight)`` over the requested
types, as TRL's ``DPOTrainer._compute_loss`` does. Scalars (β, ε, τ, α) may be Python numbers or
``torch.SymFloat`` (under ``torch.compile`` with dynamic scalars): nothing here branches on a value.

Notation: ℓc, ℓr the policy's sequence log-probs of the chosen / rejected response, ℓc⁰, ℓr⁰ the
reference's (0 when reference-free); ρc = ℓc − ℓc⁰, ρr = ℓr − ℓr⁰ (log-ratios); sc = f(ρc),
sr = f(ρr) the f-divergence scores (f = identity for reverse KL); Δ = sc − sr; σ the logistic
function; ε the label smoothing.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from fastpo.loss_output import LossOutput
from fastpo.reference.preference import _compute_dtype, _mean, _pair_metrics

__all__ = ["dpo_loss", "f_divergence_scores", "DPO_LOSS_TYPES", "F_DIVERGENCES", "F_DIVERGENCE_LOSS_TYPES",
           "LOSS_FNS", "PairTerms", "exp_clamp_max"]

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL: the f-DPO reparameterisation cancels β·log Z(x) only in the chosen − rejected difference.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


EXP_CLAMP = 20.0


def exp_clamp_max(dtype: torch.dtype) -> float:
    """Largest exponent fed to exp(): 20, fastpo's clamp of extreme log-ratios, in every dtype.

    TRL clamps only the α-divergence's exponent (at 80), and overflows elsewhere (inf − inf = NaN at
    log-ratios of −1e4). 20 keeps squares (ipo) and products (WPO's pair weight) finite in float32.
    """
    return EXP_CLAMP


def _scalar(value, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor of ``like``'s dtype/device holding a Python or symbolic number (traces under compile)."""
    return torch.zeros((), dtype=like.dtype, device=like.device) + value


def f_divergence_scores(log_ratio: torch.Tensor, f_divergence: str, f_alpha) -> torch.Tensor:
    """f′(π/π_ref) of f-DPO (Wang et al. 2023) as TRL computes it from ρ = log(π/π_ref).

    reverse_kl: ρ;  forward_kl: 1 − e^(−ρ);  js_divergence: log 2 + logσ(ρ);
    alpha_divergence: (e^((α−1)ρ) − 1)/(α−1), and ρ when |α − 1| < 1e-6 (the limit).
    Exponents are clamped to ≤ 20 (``exp_clamp_max``; TRL clamps the α-divergence's at 80 and no
    other), so ρ down to −1e4 gives large finite scores instead of inf − inf = NaN.
    """
    top = exp_clamp_max(log_ratio.dtype)
    if f_divergence == "reverse_kl":
        return log_ratio
    if f_divergence == "forward_kl":
        return -torch.expm1((-log_ratio).clamp(max=top))
    if f_divergence == "js_divergence":
        return torch.log(_scalar(2.0, log_ratio)) + F.logsigmoid(log_ratio)
    if f_divergence == "alpha_divergence":
        a1 = _scalar(f_alpha, log_ratio) - 1
        near_one = a1.abs() < 1e-6
        safe = torch.where(near_one, torch.ones_like(a1), a1)
        shaped = torch.expm1((safe * log_ratio).clamp(max=top)) / safe
        return torch.where(near_one, log_ratio, shaped)
    raise ValueError(f"f_divergence must be one of {F_DIVERGENCES}, got {f_divergence!r}")


class PairTerms(NamedTuple):
    """What the loss types read: log-probs, log-ratios, scores and the scalars, for one batch of pairs."""

    beta: object
    eps: object  # label smoothing
    tau: object  # DiscoPOP temperature
    chosen: torch.Tensor  # ℓc
    rejected: torch.Tensor  # ℓr
    ref_chosen: torch.Tensor  # ℓc⁰
    ref_rejected: torch.Tensor  # ℓr⁰
    chosen_ratio: torch.Tensor  # ρc
    rejected_ratio: torch.Tensor  # ρr
    chosen_score: torch.Tensor  # sc
    rejected_score: torch.Tensor  # sr
    chosen_len: Optional[torch.Tensor]  # completion token counts (ipo, sigmoid_norm), clamped ≥ 1
    rejected_len: Optional[torch.Tensor]
    nll: Optional[torch.Tensor]  # 0-d NLL of the chosen tokens (sft)

    @property
    def delta(self) -> torch.Tensor:
        return self.chosen_score - self.rejected_score

    def length_normalised_delta(self) -> torch.Tensor:
        """sc/|c| − sr/|r| (TRL's ipo and sigmoid_norm); without lengths: Δ (pass averaged log-probs)."""
        if self.chosen_len is None:
            return self.delta
        return self.chosen_score / self.chosen_len - self.rejected_score / self.rejected_len


def _smoothed_logistic(z: torch.Tensor, eps) -> torch.Tensor:
    """−(1−ε)·logσ(z) − ε·logσ(−z): DPO's loss with conservative targets (cDPO)."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _sigmoid(p: PairTerms):  # DPO (Rafailov et al. 2023); ε > 0 is cDPO (TRL 1.16's sigmoid ignores ε)
    return _smoothed_logistic(p.beta * p.delta, p.eps)


def _hinge(p: PairTerms):  # SLiC (Zhao et al. 2023)
    return torch.relu(1 - p.beta * p.delta)


def _ipo(p: PairTerms):  # IPO (Azar et al. 2023), eq. 17, length-normalised as TRL
    return (p.length_normalised_delta() - 1 / (2 * p.beta)).square()


def _exo_pair(p: PairTerms):  # EXO-pref (Ji et al. 2024), eq. 16: KL(softmax(βΔ) ‖ (1−ε, ε))
    z = p.beta * p.delta
    eps = _scalar(p.eps, z)
    return torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps)) + \
        torch.sigmoid(-z) * (F.logsigmoid(-z) - torch.log(eps))


def _nca_pair(p: PairTerms):  # NCA (Chen et al. 2024)
    zc, zr = p.beta * p.chosen_ratio, p.beta * p.rejected_ratio
    return -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr)


def _robust(p: PairTerms):  # robust DPO (Chowdhury et al. 2024)
    z = p.beta * p.delta
    return (-(1 - p.eps) * F.logsigmoid(z) + p.eps * F.logsigmoid(-z)) / (1 - 2 * p.eps)


def _bco_pair(p: PairTerms):  # BCO, paired form (Jung et al. 2024)
    return -F.logsigmoid(p.beta * p.chosen_ratio) - F.logsigmoid(-p.beta * p.rejected_ratio)


def _sppo_hard(p: PairTerms):  # SPPO (Wu et al. 2024) with hard win probabilities 1 / 0
    return (p.chosen_ratio - 0.5 / p.beta).square() + (p.rejected_ratio + 0.5 / p.beta).square()


def _sorted(x: torch.Tensor) -> torch.Tensor:
    return torch.sort(x.reshape(-1), dim=0).values.reshape(x.shape)


def _aot(p: PairTerms):  # AOT (Melnyk et al. 2024), paired: sorted policy vs sorted reference margins
    delta = _sorted(p.chosen - p.rejected) - _sorted(p.ref_chosen - p.ref_rejected)
    return _smoothed_logistic(p.beta * delta, p.eps)


def _aot_unpaired(p: PairTerms):  # AOT, unpaired: sorted chosen vs sorted rejected log-ratios
    delta = _sorted(p.chosen_ratio) - _sorted(p.rejected_ratio)
    return _smoothed_logistic(p.beta * delta, p.eps)


def _apo_zero(p: PairTerms):  # APO-zero (D'Oosterlinck et al. 2024), eq. 7
    return 1 - torch.sigmoid(p.beta * p.chosen_ratio) + torch.sigmoid(p.beta * p.rejected_ratio)


def _apo_down(p: PairTerms):  # APO-down, eq. 8
    return torch.sigmoid(p.beta * p.chosen_ratio) + \
        1 - torch.sigmoid(p.beta * (p.chosen_ratio - p.rejected_ratio))


def _discopop(p: PairTerms):  # DiscoPOP (Chris Lu et al. 2024), eq. 5
    """(1 − σ(z/τ))·(−logσ(z)) + σ(z/τ)·e^(−z), z = βΔ; the second term as exp(−z + logσ(z/τ)),
    clamped, so that z = −1e3 gives a finite value instead of inf·0."""
    z = p.beta * p.delta
    gate = z / p.tau
    exp_part = torch.exp((F.logsigmoid(gate) - z).clamp(max=exp_clamp_max(z.dtype)))
    return -F.logsigmoid(z) * torch.sigmoid(-gate) + exp_part


def _sft(p: PairTerms):  # the NLL of the chosen tokens, one value for every pair (RPO: weight α)
    return p.nll.expand(p.chosen.shape)


def _sigmoid_norm(p: PairTerms):  # DPO on length-normalised scores
    return -F.logsigmoid(p.beta * p.length_normalised_delta())


LOSS_FNS: Dict[str, Callable[[PairTerms], torch.Tensor]] = {
    "sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "exo_pair": _exo_pair, "nca_pair": _nca_pair,
    "robust": _robust, "bco_pair": _bco_pair, "sppo_hard": _sppo_hard, "aot": _aot,
    "aot_unpaired": _aot_unpaired, "apo_zero": _apo_zero, "apo_down": _apo_down, "discopop": _discopop,
    "sft": _sft, "sigmoid_norm": _sigmoid_norm,
}
DPO_LOSS_TYPES = tuple(LOSS_FNS)


def dpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor,
             ref_chosen_logp: Optional[torch.Tensor] = None, ref_rejected_logp: Optional[torch.Tensor] = None,
             beta=0.1, loss_type: Union[str, Sequence[str]] = "sigmoid", label_smoothing=0.0, *,
             loss_weights: Optional[Sequence[float]] = None, f_divergence: str = "reverse_kl", f_alpha=0.5,
             discopop_tau=0.05, chosen_lengths: Optional[torch.Tensor] = None,
             rejected_lengths: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
             nll: Optional[torch.Tensor] = None, rpo_alpha=None) -> LossOutput:
    """Σ_k w_k · mean_pairs(loss_k · pair weight) over the loss types k (one type: w = 1).

    ``weights``: per-pair weights (WPO: ``wpo_weights(chosen) · wpo_weights(rejected)``), detached.
    ``rpo_alpha``: adds ``("sft", rpo_alpha)`` to the list (RPO = DPO + α·NLL, as TRL 1.16 spells it).
    Implicit rewards (metrics): β·ρc and β·ρr, whatever the f-divergence (as TRL logs them).
    """
    types: Tuple[str, ...] = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    wts = tuple(loss_weights) if loss_weights is not None else (1.0,) * len(types)
    if rpo_alpha is not None:
        types, wts = types + ("sft",), wts + (rpo_alpha,)
    dtype = _compute_dtype(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    chosen, rejected = chosen_logp.to(dtype), rejected_logp.to(dtype)
    ref_c = torch.zeros_like(chosen) if ref_chosen_logp is None else ref_chosen_logp.detach().to(dtype)
    ref_r = torch.zeros_like(rejected) if ref_rejected_logp is None else ref_rejected_logp.detach().to(dtype)
    rho_c, rho_r = chosen - ref_c, rejected - ref_r
    lengths = [None if n is None else n.detach().to(dtype).clamp(min=1) for n in (chosen_lengths, rejected_lengths)]
    terms = PairTerms(beta, label_smoothing, discopop_tau, chosen, rejected, ref_c, ref_r, rho_c, rho_r,
                      f_divergence_scores(rho_c, f_divergence, f_alpha),
                      f_divergence_scores(rho_r, f_divergence, f_alpha),
                      lengths[0], lengths[1], None if nll is None else nll.to(dtype))
    pair_weight = None if weights is None else weights.detach().to(dtype)
    loss = torch.zeros((), dtype=dtype, device=chosen.device)
    for name, w in zip(types, wts):
        per_pair = LOSS_FNS[name](terms)
        if pair_weight is not None:
            per_pair = per_pair * pair_weight
        loss = loss + w * _mean(per_pair)
    metrics = _pair_metrics(beta * rho_c, beta * rho_r)
    metrics["logps_chosen"] = _mean(chosen.detach())
    metrics["logps_rejected"] = _mean(rejected.detach())
    if nll is not None:
        metrics["nll_loss"] = nll.detach().to(dtype)
    return LossOutput(loss, metrics)
