"""``PolicyLossConfig``: every knob of :func:`fastpo.policy_loss`, validated once, plus the presets.

The config is a frozen dataclass, hashable and cheap to pass around; ``dataclasses.replace(GRPO,
kl_coef=0.0)`` derives a variant (and validates it again). Values are checked at construction:
unknown mode strings and out-of-range numbers raise ``ValueError``, wrong types ``TypeError``,
each naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Optional, Union

from fastpo._validation import check_choice as _choice

__all__ = [
    "PolicyLossConfig", "PPO", "GRPO", "DAPO", "DR_GRPO", "GSPO", "BNPO", "LUSPO", "CISPO", "CISPO_TRL", "SAPO",
    "GMPO", "GPG", "DPPO_TV", "DPPO_KL", "DRO", "VESPO",
    "CLIP_COV", "KL_COV", "SURROGATES", "RATIO_LEVELS", "KL_ESTIMATORS", "AGGREGATIONS", "ROLLOUT_IS_MODES",
    "ROLLOUT_IS_SEQUENCE_RATIOS",
]

# The per-token objective; fastpo.reference.policy states each formula.
SURROGATES = ("clip", "cispo", "cispo_upper", "sapo", "reinforce", "dppo_tv", "dppo_kl", "dro", "geo_mean", "vespo",
              "ratio")
# Surrogates whose ratio may be the GSPO sequence ratio (the others read log-probs, not a ratio).
SEQUENCE_RATIO_SURROGATES = ("clip", "cispo", "cispo_upper", "sapo", "ratio")
# Surrogates whose per-token gradient reads the whole sequence's log-probs (see PolicyLossConfig.token_local).
NON_LOCAL_SURROGATES = ("geo_mean", "vespo")
RATIO_LEVELS = ("token", "sequence")
# kX+: the value of kX with the gradient of k2 (verl's straight-through estimators).
KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm", "token_sum")
ROLLOUT_IS_MODES = ("none", "token_truncate", "sequence_truncate", "token_mask", "sequence_mask")
# The sequence modes' weight: exp(mean_t Δ) (fastpo's historical default) or exp(Σ_t Δ) (verl and TRL).
ROLLOUT_IS_SEQUENCE_RATIOS = ("geometric_mean", "product")


def _real(value, name: str, *, optional: bool = False) -> Optional[float]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        kind = "a real number or None" if optional else "a real number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _positive(value, name: str, *, optional: bool = False) -> Optional[float]:
    value = _real(value, name, optional=optional)
    if value is not None and not value > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_aggregation(value, name: str = "aggregation") -> str:
    """``value`` is one of :data:`AGGREGATIONS` (shared with ``value_loss``)."""
    return _choice(value, name, AGGREGATIONS)


@dataclass(frozen=True)
class PolicyLossConfig:
    """The policy-gradient loss of :func:`fastpo.policy_loss` (math in its docstring and DESIGN.md).

    ``clip_low``, ``clip_high`` (ε_low in [0, 1), ε_high >= 0): the ratio is clipped to
    [1 − ε_low, 1 + ε_high]. ``dual_clip`` (None or c > 1): for A < 0 the token loss is capped at
    −c·A. ``ratio_level``: "token" (PPO) or "sequence" (GSPO, token-gradient form).
    ``kl_coef`` (>= 0), ``kl_estimator`` ("k1" | "k2" | "k3"), ``kl_clamp`` (None or > 0): the
    +kl_coef·k penalty towards ``ref_logp``. ``entropy_coef`` (any finite value): −entropy_coef·H.
    ``aggregation``: "token_mean" | "seq_mean_token_mean" | "seq_mean_token_sum" | "token_sum_norm".
    ``norm_length`` (None or int >= 1): the L of token_sum_norm. ``rollout_is``: "none" |
    "token_truncate" | "sequence_truncate" | "token_mask" | "sequence_mask", with ``rollout_is_cap``
    (> 0) the truncation / rejection threshold.

    ``surrogate`` picks the per-token objective (formulas in :func:`fastpo.policy_loss`): "clip"
    (PPO, the default), "cispo" (verl, both bounds), "cispo_upper" (TRL: only the upper bound
    1 + clip_high), "sapo", "reinforce" (−A·logp: verl's gpg and bypass REINFORCE), "dppo_tv",
    "dppo_kl", "dro", "geo_mean" (GMPO), "vespo" or "ratio" (−A·r unclipped: verl's kl_cov base). ``delta`` (None or > 1): TRL's two-sided clip,
    the unclipped ratio capped at delta ("clip" only). ``sapo_tau_pos`` / ``sapo_tau_neg`` (> 0): SAPO's
    gate temperatures for A > 0 / A <= 0. ``dppo_ratio_cap`` (> 0): the truncation of DPPO's detached
    ratio (clip_low / clip_high are DPPO's divergence thresholds). ``dro_beta`` (> 0, needed by "dro"):
    the weight of DRO's ½·(logp − old_logp)² penalty. ``vespo_k_pos``, ``vespo_lambda_pos``,
    ``vespo_k_neg``, ``vespo_lambda_neg``: VESPO's gamma weight φ(w) = e^λ·w^k·e^(−λw) for A >= 0 / A < 0.
    ``kl_bias_correction``: the KL term times the (differentiable) ratio, TRL's ``use_bias_correction_kl``.
    ``count_empty_sequences``: the sequence means divide by every sequence of the batch, empty ones too
    (TRL's grpo / luspo and verl's geo_mean), instead of by the non-empty ones (verl's agg_loss).

    Token selection over the batch (``fastpo.ops.policy_prepass``: one detached pass before the fused loss;
    global across data-parallel ranks with ``policy_loss(process_group=)``): ``clip_cov_ratio`` (None or in
    (0, 1]; surrogate "clip"): Clip-Cov cuts the gradient of max(1, ⌊ratio·N⌋) random unclipped tokens with
    ``clip_cov_lower`` < cov_t < ``clip_cov_upper``; ``kl_cov_ratio`` (None or in (0, 1]): KL-Cov adds
    ``kl_cov_coef``·|logp − old_logp| on the max(1, ⌊ratio·N⌋) tokens of largest covariance;
    ``top_entropy_quantile`` (in (0, 1]; 1 = off, TRL's name): only tokens whose entropy is at least the
    (1 − q) quantile keep their policy term; ``off_policy_mask_threshold`` (None or a float, TRL's OPSM):
    sequences with A < 0 whose mean of rollout_logp − logp (old_logp without rollout_logp) exceeds it drop
    their policy term.

    Rollout correction beyond the per-token cap: ``rollout_is_sequence_ratio`` ("geometric_mean" |
    "product": exp Σ_t Δ, as verl and TRL) for the sequence modes; ``rollout_is_floor`` (None or in (0,
    cap]): the lower bound (truncate: clamp up to it, TRL's clip_min; mask: 0 below it, IcePop);
    ``rollout_is_batch_normalize``: divide the weights by their batch mean (over sequences at sequence
    level; verl's); ``rollout_rejection`` (None or verl's comma-chained ``rollout_rs`` options
    token_k1/k2/k3, seq_sum_*, seq_mean_*, seq_max_k2/k3) with ``rollout_rejection_threshold`` (a number
    or verl's string: "lo_hi" for k1, one value or one per option): rejected tokens leave the mask.
    NaN rollout log-probs on counted tokens (vLLM could not score them) give Δ = 0, as TRL.
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    ratio_level: str = "token"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_clamp: Optional[float] = 10.0
    entropy_coef: float = 0.0
    aggregation: str = "token_mean"
    norm_length: Optional[int] = None
    rollout_is: str = "none"
    rollout_is_cap: float = 2.0
    surrogate: str = "clip"
    delta: Optional[float] = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    dppo_ratio_cap: float = 20.0
    dro_beta: Optional[float] = None
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    kl_bias_correction: bool = False
    count_empty_sequences: bool = False
    clip_cov_ratio: Optional[float] = None
    clip_cov_lower: float = 1.0
    clip_cov_upper: float = 5.0
    kl_cov_ratio: Optional[float] = None
    kl_cov_coef: float = 1.0
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: Optional[float] = None
    rollout_is_sequence_ratio: str = "geometric_mean"
    rollout_is_floor: Optional[float] = None
    rollout_is_batch_normalize: bool = False
    rollout_rejection: Optional[str] = None
    rollout_rejection_threshold: Union[str, float, None] = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)
            return value

        put("clip_low", _real(self.clip_low, "clip_low"))
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must lie in [0, 1) (the ratio's lower bound is 1 - clip_low > 0), "
                             f"got {self.clip_low}")
        put("clip_high", _real(self.clip_high, "clip_high"))
        if self.clip_high < 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        put("dual_clip", _real(self.dual_clip, "dual_clip", optional=True))
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be None or > 1 (Ye et al. use 3), got {self.dual_clip}")
        _choice(self.ratio_level, "ratio_level", RATIO_LEVELS)
        put("kl_coef", _real(self.kl_coef, "kl_coef"))
        if self.kl_coef < 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        _choice(self.kl_estimator, "kl_estimator", KL_ESTIMATORS)
        put("kl_clamp", _real(self.kl_clamp, "kl_clamp", optional=True))
        if self.kl_clamp is not None and not self.kl_clamp > 0.0:
            raise ValueError(f"kl_clamp must be None or > 0, got {self.kl_clamp}")
        put("entropy_coef", _real(self.entropy_coef, "entropy_coef"))
        check_aggregation(self.aggregation)
        if self.norm_length is not None:
            if isinstance(self.norm_length, bool) or not isinstance(self.norm_length, int):
                raise TypeError(f"norm_length must be an int or None, got {type(self.norm_length).__name__}")
            if self.norm_length < 1:
                raise ValueError(f"norm_length must be >= 1, got {self.norm_length}")
        _choice(self.rollout_is, "rollout_is", ROLLOUT_IS_MODES)
        put("rollout_is_cap", _real(self.rollout_is_cap, "rollout_is_cap"))
        if not self.rollout_is_cap > 0.0:
            raise ValueError(f"rollout_is_cap must be > 0, got {self.rollout_is_cap}")
        _choice(self.surrogate, "surrogate", SURROGATES)
        put("delta", _real(self.delta, "delta", optional=True))
        if self.delta is not None and not self.delta > 1.0:
            raise ValueError(f"delta must be None or > 1 (TRL recommends > 1 + epsilon_high), got {self.delta}")
        for name in ("sapo_tau_pos", "sapo_tau_neg", "dppo_ratio_cap", "vespo_lambda_pos", "vespo_lambda_neg"):
            put(name, _positive(getattr(self, name), name))
        put("dro_beta", _positive(self.dro_beta, "dro_beta", optional=True))
        for name in ("vespo_k_pos", "vespo_k_neg"):
            put(name, _real(getattr(self, name), name))
        _flag(self.kl_bias_correction, "kl_bias_correction")
        _flag(self.count_empty_sequences, "count_empty_sequences")
        self._check_selection(put)
        self._check_rollout(put)
        self._check_combinations()

    @property
    def token_local(self) -> bool:
        """Whether each token's loss gradient ∂L/∂logp_t reads no other token's log-prob: its ratio is the
        token's own (not GSPO's sequence ratio) and the surrogate is not a sequence functional (geo_mean,
        vespo). The masks, the aggregation weights and the rollout IS weights are constants of the batch,
        so they keep a config token-local. :func:`fastpo.linear_policy_loss` takes its one-pass (three
        GEMM) path exactly for these configs."""
        return (self.ratio_level == "token" and self.surrogate not in NON_LOCAL_SURROGATES
                and not self.selects_tokens)

    @property
    def selects_tokens(self) -> bool:
        """Whether a token-selection step runs over the batch (Clip-Cov, KL-Cov, the entropy quantile,
        OPSM): each reads other tokens' log-probs or entropies, so such a config is not token_local."""
        return (self.clip_cov_ratio is not None or self.kl_cov_ratio is not None or self.top_entropy_quantile < 1.0
                or self.off_policy_mask_threshold is not None)

    def _check_selection(self, put):
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            v = put(name, _real(getattr(self, name), name, optional=True))
            if v is not None and not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be None or lie in (0, 1], got {v}")
        put("clip_cov_lower", _real(self.clip_cov_lower, "clip_cov_lower"))
        put("clip_cov_upper", _real(self.clip_cov_upper, "clip_cov_upper"))
        if not self.clip_cov_lower < self.clip_cov_upper:
            raise ValueError(f"clip_cov_lower must be < clip_cov_upper, got {self.clip_cov_lower} and "
                             f"{self.clip_cov_upper}")
        put("kl_cov_coef", _real(self.kl_cov_coef, "kl_cov_coef"))
        if self.kl_cov_coef < 0.0:
            raise ValueError(f"kl_cov_coef must be >= 0, got {self.kl_cov_coef}")
        q = put("top_entropy_quantile", _real(self.top_entropy_quantile, "top_entropy_quantile"))
        if not 0.0 < q <= 1.0:
            raise ValueError(f"top_entropy_quantile must lie in (0, 1] (1: off), got {q}")
        put("off_policy_mask_threshold", _real(self.off_policy_mask_threshold, "off_policy_mask_threshold",
                                               optional=True))
        if self.clip_cov_ratio is not None and self.surrogate != "clip":
            raise ValueError(f"clip_cov_ratio selects among the tokens PPO's clip leaves unclipped: it needs "
                             f"surrogate='clip', got surrogate={self.surrogate!r}")
        if self.selects_tokens and self.ratio_level != "token":
            raise ValueError("token selection (clip_cov_ratio, kl_cov_ratio, top_entropy_quantile, "
                             "off_policy_mask_threshold) needs ratio_level='token'")

    def _check_rollout(self, put):
        _choice(self.rollout_is_sequence_ratio, "rollout_is_sequence_ratio", ROLLOUT_IS_SEQUENCE_RATIOS)
        floor = put("rollout_is_floor", _positive(self.rollout_is_floor, "rollout_is_floor", optional=True))
        if floor is not None and floor > self.rollout_is_cap:
            raise ValueError(f"rollout_is_floor must be <= rollout_is_cap, got {floor} > {self.rollout_is_cap}")
        _flag(self.rollout_is_batch_normalize, "rollout_is_batch_normalize")
        if self.rollout_is == "none" and (floor is not None or self.rollout_is_batch_normalize
                                          or self.rollout_is_sequence_ratio != "geometric_mean"):
            raise ValueError("rollout_is_floor, rollout_is_batch_normalize and rollout_is_sequence_ratio need a "
                             "rollout_is mode, got rollout_is='none'")
        rs, th = self.rollout_rejection, self.rollout_rejection_threshold
        if rs is None:
            if th is not None:
                raise ValueError("rollout_rejection_threshold needs rollout_rejection (got None)")
            return
        if not isinstance(rs, str):
            raise TypeError(f"rollout_rejection must be a str or None, got {type(rs).__name__}")
        if th is None:
            raise ValueError(f"rollout_rejection={rs!r} needs rollout_rejection_threshold (got None)")
        if isinstance(th, bool) or not isinstance(th, (str, Real)):
            raise TypeError(f"rollout_rejection_threshold must be a str or a number, got {type(th).__name__}")
        from fastpo.ops.rollout_correction import parse_rejection  # validates the options and thresholds
        parse_rejection(rs, th)

    def _check_combinations(self):
        """Options that only some surrogates read."""
        sur = self.surrogate
        if self.ratio_level == "sequence" and sur not in SEQUENCE_RATIO_SURROGATES:
            raise ValueError(f"ratio_level='sequence' needs a ratio-based surrogate {SEQUENCE_RATIO_SURROGATES}, "
                             f"got surrogate={sur!r}")
        if self.dual_clip is not None and sur != "clip":
            raise ValueError(f"dual_clip applies to surrogate='clip' only, got surrogate={sur!r}")
        if self.delta is not None and sur != "clip":
            raise ValueError(f"delta applies to surrogate='clip' only, got surrogate={sur!r}")
        if sur == "dro" and self.dro_beta is None:
            raise ValueError("surrogate='dro' needs dro_beta > 0 (got None)")
        if sur == "geo_mean" and self.rollout_is.startswith("token"):
            raise ValueError(f"surrogate='geo_mean' weighs whole sequences: use a sequence rollout_is mode, got "
                             f"rollout_is={self.rollout_is!r}")
        if sur == "vespo" and self.rollout_is != "none":
            raise ValueError(f"surrogate='vespo' with rollout_is={self.rollout_is!r} is not supported (TRL folds the "
                             f"rollout weight into VESPO's sequence weight; pass is_weights=None and rollout_is='none')")


PPO = PolicyLossConfig(clip_low=0.2, clip_high=0.2, dual_clip=3.0, aggregation="token_mean")
"""PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms") with the dual clip of Ye et al.
2019 ("Mastering Complex Control in MOBA Games with Deep RL"): ε = 0.2 both sides, dual_clip = 3.0,
token_mean, no KL term in the loss (RLHF puts it in the reward), no entropy bonus."""

GRPO = PolicyLossConfig(clip_low=0.2, clip_high=0.2, kl_coef=0.04, kl_estimator="k3",
                        aggregation="seq_mean_token_mean")
"""GRPO (Shao et al. 2024, "DeepSeekMath"): ε = 0.2, k3 KL to the reference with β = 0.04 (clamped
to ±10), per-response token mean then mean over responses (seq_mean_token_mean)."""

DAPO = PolicyLossConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.0, aggregation="token_mean")
"""DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"):
clip-higher ε_low = 0.2, ε_high = 0.28, token-level mean over the whole batch, no KL term."""

DR_GRPO = PolicyLossConfig(clip_low=0.2, clip_high=0.2, kl_coef=0.0, aggregation="token_sum_norm")
"""Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"): ε = 0.2,
no KL term, Σ token losses / (B · norm_length) instead of per-response length normalisation (pair
it with ``group_advantages(method="dr_grpo")``: no std division)."""

GSPO = PolicyLossConfig(clip_low=3e-4, clip_high=4e-4, ratio_level="sequence", kl_coef=0.0,
                        aggregation="seq_mean_token_mean")
"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): sequence ratio
s_i = exp(mean_t Δ) in its token-gradient form, ε_low = 3e-4, ε_high = 4e-4, no KL term,
seq_mean_token_mean."""

BNPO = PolicyLossConfig(clip_low=0.2, clip_high=0.2, kl_coef=0.0, aggregation="token_mean")
"""BNPO (TRL ``loss_type="bnpo"``, Xiao et al. 2025, "BNPO: Beta Normalization Policy Optimization"): the
clipped ratio with ε = 0.2, Σl / Σmask over the local batch, no KL term (TRL 1.16 defaults: beta = 0)."""

LUSPO = PolicyLossConfig(clip_low=3e-4, clip_high=4e-4, ratio_level="sequence", kl_coef=0.0,
                         aggregation="seq_mean_token_sum", count_empty_sequences=True)
"""LUSPO (arXiv 2602.05261, "Length-Unbiased Sequence Policy Optimization"; TRL ``loss_type="luspo"`` with
``importance_sampling_level="sequence"``, which it requires): GSPO's sequence ratio and bounds, each
sequence's token sum averaged over all B rows (TRL: ``(l·m).sum(-1).mean()``), no KL term."""

CISPO = PolicyLossConfig(surrogate="cispo", clip_low=0.2, clip_high=0.2, kl_coef=0.0, aggregation="token_mean")
"""CISPO (MiniMax 2025, "MiniMax-M1", arXiv 2506.13585) as verl's ``cispo``: −sg(clip(r, 1 − ε_low,
1 + ε_high))·A·logp with verl's actor defaults ε = 0.2 both sides, token_mean."""

CISPO_TRL = PolicyLossConfig(surrogate="cispo_upper", clip_high=4.0, kl_coef=0.0, aggregation="token_mean")
"""CISPO as TRL 1.16 ``loss_type="cispo"``: only the upper bound, −sg(min(r, ε_max))·A·logp, with the
ScaleRL recipe's ε_max = 5.0 (``epsilon_high=5.0``, i.e. clip_high = 4.0 here since the bound is
1 + clip_high); token_mean (pass TRL's global token count as ``num_tokens``)."""

SAPO = PolicyLossConfig(surrogate="sapo", sapo_tau_pos=1.0, sapo_tau_neg=1.05, kl_coef=0.0,
                        aggregation="seq_mean_token_mean")
"""SAPO (Gao et al. 2025, "Soft Adaptive Policy Optimization", arXiv 2511.20347): gate
σ(τ(r − 1))·4/τ instead of the clip, τ_pos = 1.0, τ_neg = 1.05 (the verl and TRL defaults), per-sequence
token mean (verl forces seq-mean-token-mean)."""

GMPO = PolicyLossConfig(surrogate="geo_mean", clip_low=0.4, clip_high=0.4, kl_coef=0.0,
                        aggregation="seq_mean_token_mean", count_empty_sequences=True)
"""GMPO (Zhao et al. 2025, "Geometric-Mean Policy Optimization", arXiv 2507.20673), verl's ``geo_mean``:
the sequence ratio is the geometric mean of the token ratios, each log-ratio clipped to [−0.4, 0.4]
(the paper's and TRL's experimental GMPO default; verl reads its actor's clip_ratio), mean over all rows."""

GPG = PolicyLossConfig(surrogate="reinforce", kl_coef=0.0, aggregation="token_mean")
"""GPG (Chu et al. 2025, "GPG: A Simple and Strong Reinforcement Learning Baseline", arXiv 2504.02546),
verl's ``gpg``: −A·logp with no ratio and no clip, token_mean (pair it with verl's gpg advantage)."""

DPPO_TV = PolicyLossConfig(surrogate="dppo_tv", clip_low=0.2, clip_high=0.2, dppo_ratio_cap=20.0, kl_coef=0.0,
                           aggregation="token_mean")
"""DPPO-Binary-TV (arXiv 2602.04879, "Divergence PPO"), verl's ``dppo_tv``: −A·sg(min(r, 20))·logp on tokens
whose probability moved by at most the threshold in the advantage's direction, thresholds 0.2 (verl
reads clip_ratio) and the truncation 20 (verl's clip_ratio_c fallback for DPPO)."""

DPPO_KL = PolicyLossConfig(surrogate="dppo_kl", clip_low=0.2, clip_high=0.2, dppo_ratio_cap=20.0, kl_coef=0.0,
                           aggregation="token_mean")
"""DPPO-Binary-KL (arXiv 2602.04879), verl's ``dppo_kl``: as DPPO_TV with the binary KL divergence of the
token's probability as the trust region, thresholds 0.2 and truncation 20 (verl's defaults)."""

DRO = PolicyLossConfig(surrogate="dro", dro_beta=0.1, kl_coef=0.0, aggregation="token_mean")
"""DRO (Richemond et al. 2024, "Offline Regularised RL for LLM Alignment", and Kimi k1.5's squared
log-ratio), verl's ``dro``: −(A·logp − ½β·(logp − old_logp)²); β = 0.1 here (verl has no default and
requires ``dro_beta`` > 0)."""

VESPO = PolicyLossConfig(surrogate="vespo", kl_coef=0.0, aggregation="token_mean")
"""VESPO (arXiv 2602.10693, "Variational Sequence-Level Soft Policy Optimization"), TRL ``loss_type="vespo"``:
−sg(φ(w))·A·logp with w = exp(Σ_t Δ) the sequence ratio and φ(w) = e^λ·w^k·e^(−λw), k/λ = 2/3 for A >= 0
and 3/2 for A < 0 (TRL's defaults), token_mean (TRL normalises by the global token count)."""

CLIP_COV = PolicyLossConfig(clip_low=0.2, clip_high=0.2, kl_coef=0.0, aggregation="token_mean", clip_cov_ratio=2e-4,
                            clip_cov_lower=1.0, clip_cov_upper=5.0)
"""Clip-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models",
arXiv 2505.22617), verl's ``clip_cov``: the PPO clip (ε = 0.2, no dual clip) with the gradient cut on
max(1, ⌊2e-4·N⌋) random unclipped tokens whose covariance lies in (1, 5) (verl's yaml defaults
clip_cov_ratio = 2e-4, clip_cov_lb = 1, clip_cov_ub = 5), token_mean."""

KL_COV = PolicyLossConfig(surrogate="ratio", kl_coef=0.0, aggregation="token_mean", kl_cov_ratio=2e-4, kl_cov_coef=0.1)
"""KL-Cov (Cui et al. 2025, arXiv 2505.22617), verl's ``kl_cov``: −A·r unclipped plus 0.1·|logp − old_logp|
on the max(1, ⌊2e-4·N⌋) tokens of largest covariance (verl's yaml defaults kl_cov_ratio = 2e-4,
ppo_kl_coef = 0.1; its code falls back to 1.0), token_mean."""
