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
from typing import Optional

__all__ = [
    "PolicyLossConfig", "PPO", "GRPO", "DAPO", "DR_GRPO", "GSPO",
    "RATIO_LEVELS", "KL_ESTIMATORS", "AGGREGATIONS", "ROLLOUT_IS_MODES",
]

RATIO_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm")
ROLLOUT_IS_MODES = ("none", "token_truncate", "sequence_truncate", "token_mask", "sequence_mask")


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


def _choice(value, name: str, choices) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
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

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

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
