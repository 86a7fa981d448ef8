"""``TokenLossSpec``: one per-token loss (policy or value) with its aggregation, as plain numbers.

The custom ops take it as two lists (``floats``, ``ints``) so that their schema stays flat; both
backends (``fastpo.kernels.policy_loss`` and ``fastpo.ops.cpu_policy``) read the same fields.
Their forward returns ``(loss, stats [len(STATS)], unit [N], unit_entropy [N or 0])`` where
``unit`` is ∂loss/∂x divided by the global scale ``stats[1]`` (so the backward is
``grad_x = g·scale·unit``) and ``stats`` holds the loss, the scale and the metrics.
"""

from __future__ import annotations

from typing import List, NamedTuple

from fastpo.policy_config import AGGREGATIONS, ROLLOUT_IS_MODES, PolicyLossConfig

__all__ = ["TokenLossSpec", "STATS", "POLICY_METRICS", "policy_spec", "value_spec"]

# stats layout; for value_loss, slot 2 (clip_frac) holds vf_clip_frac
STATS = ("loss", "scale", "clip_frac", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "ppo_kl", "ref_kl",
         "ratio_mean", "ratio_min", "ratio_max", "entropy")
POLICY_METRICS = STATS[2:]
KL_CODES = {"k1": 1, "k2": 2, "k3": 3}
INF = float("inf")


class TokenLossSpec(NamedTuple):
    value: bool = False          # value loss instead of policy loss
    seq_ratio: bool = False      # GSPO sequence ratio
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float = 0.0       # 0: off
    kl: int = 0                  # 0: no ref_logp; 1/2/3: k1/k2/k3
    kl_coef: float = 0.0
    kl_clamp: float = INF
    entropy_coef: float = 0.0
    has_entropy: bool = False
    rollout: int = 0             # index in ROLLOUT_IS_MODES
    rollout_cap: float = 2.0
    aggregation: int = 0         # index in AGGREGATIONS
    norm_length: int = 0         # token_sum_norm's L; 0: the longest sequence
    num_tokens: float = -1.0     # token_mean's denominator; < 0: Σmask (or the num_tokens tensor)
    value_clip: float = INF

    @property
    def rollout_seq(self) -> bool:
        return ROLLOUT_IS_MODES[self.rollout].startswith("sequence")

    @property
    def rollout_mask(self) -> bool:
        return ROLLOUT_IS_MODES[self.rollout].endswith("mask")

    @property
    def per_seq_mean(self) -> bool:
        return AGGREGATIONS[self.aggregation] == "seq_mean_token_mean"

    def floats(self) -> List[float]:
        return [float(getattr(self, f)) for f in self._fields if isinstance(self._field_defaults[f], float)]

    def ints(self) -> List[int]:
        return [int(getattr(self, f)) for f in self._fields if not isinstance(self._field_defaults[f], float)]

    @classmethod
    def from_lists(cls, floats, ints) -> "TokenLossSpec":
        fi, ii = iter(floats), iter(ints)
        kw = {}
        for f in cls._fields:
            default = cls._field_defaults[f]
            kw[f] = float(next(fi)) if isinstance(default, float) else type(default)(next(ii))
        return cls(**kw)


def policy_spec(config: PolicyLossConfig, *, has_ref: bool, has_entropy: bool, norm_length: int,
                num_tokens: float) -> TokenLossSpec:
    return TokenLossSpec(
        seq_ratio=config.ratio_level == "sequence", clip_low=config.clip_low, clip_high=config.clip_high,
        dual_clip=config.dual_clip or 0.0, kl=KL_CODES[config.kl_estimator] if has_ref else 0,
        kl_coef=config.kl_coef, kl_clamp=INF if config.kl_clamp is None else config.kl_clamp,
        entropy_coef=config.entropy_coef, has_entropy=has_entropy,
        rollout=ROLLOUT_IS_MODES.index(config.rollout_is), rollout_cap=config.rollout_is_cap,
        aggregation=AGGREGATIONS.index(config.aggregation), norm_length=norm_length, num_tokens=num_tokens)


def value_spec(clip, aggregation: str, norm_length: int) -> TokenLossSpec:
    return TokenLossSpec(value=True, aggregation=AGGREGATIONS.index(aggregation), norm_length=norm_length,
                         value_clip=INF if clip is None else float(clip))
