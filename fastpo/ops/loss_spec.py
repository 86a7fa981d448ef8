"""``TokenLossSpec``: one per-token loss (policy or value) with its aggregation, as plain numbers.

The custom ops take it as two lists (``floats``, ``ints``) so that their schema stays flat; both
backends (``fastpo.kernels.policy_loss`` and ``fastpo.ops.cpu_policy``) read the same fields.
Their forward returns ``(loss, stats [len(STATS)], unit [N], unit_entropy [N or 0])`` where
``unit`` is ∂loss/∂x divided by the global scale ``stats[1]`` (so the backward is
``grad_x = g·scale·unit``) and ``stats`` holds the loss, the scale and the metrics.
"""

from __future__ import annotations

from typing import Iterable, List, NamedTuple, Optional, Tuple

import torch

from fastpo.policy_config import AGGREGATIONS, ROLLOUT_IS_MODES, SURROGATES, PolicyLossConfig

__all__ = ["TokenLossSpec", "STATS", "POLICY_METRICS", "policy_spec", "policy_spec_lists", "value_spec", "SURROGATE_CODES",
           "ROLLOUT_CODES", "METRIC_LEVELS", "metric_level", "check_metric_names"]

# stats layout; for value_loss, slot 2 (clip_frac) holds vf_clip_frac
STATS = ("loss", "scale", "clip_frac", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "ppo_kl", "ref_kl",
         "ratio_mean", "ratio_min", "ratio_max", "entropy")
POLICY_METRICS = STATS[2:]
# The fused pass's metric levels (TokenLossSpec.metric_level): level i forms the sums of METRIC_LEVELS[i]
# only (the CPU kernel skips the rest; the other backends form every sum). The lean levels apply without
# ref_logp and entropy, whose metrics are then 0 in every level.
_CLIP = ("clip_frac", "clip_frac_low", "clip_frac_high", "dual_clip_frac")
_ZERO_WITHOUT_INPUTS = ("ref_kl", "entropy")
METRIC_LEVELS = (frozenset(POLICY_METRICS), frozenset(_CLIP + ("ppo_kl",) + _ZERO_WITHOUT_INPUTS),
                 frozenset(("ppo_kl",) + _ZERO_WITHOUT_INPUTS), frozenset(_ZERO_WITHOUT_INPUTS))
KL_CODES = {"k1": 1, "k2": 2, "k3": 3, "abs": 4}
# One kernel per surrogate family: "cispo_upper" is "cispo" with the lower bound 0 (clip_low = 1).
SURROGATE_CODES = {"clip": 0, "cispo": 1, "cispo_upper": 1, "sapo": 2, "reinforce": 3, "dppo_tv": 4, "dppo_kl": 5,
                   "dro": 6, "geo_mean": 7, "vespo": 8, "ratio": 9}
assert set(SURROGATE_CODES) == set(SURROGATES)
# The rollout slot's meaning: a fastpo rollout_is mode (rollout_logp), or "weights" (the caller's is_weights).
ROLLOUT_CODES = ROLLOUT_IS_MODES + ("weights",)
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
    surrogate: int = 0           # SURROGATE_CODES
    delta: float = INF           # TRL's two-sided clip of the unclipped ratio; inf: off
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    ratio_cap: float = 20.0      # DPPO's truncation of the detached ratio
    dro_beta: float = 0.0
    vespo_k_pos: float = 2.0
    vespo_l_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_l_neg: float = 2.0
    kl_st: bool = False          # kX+: the value of kX, the gradient of k2
    kl_bias: bool = False        # KL·r (TRL's use_bias_correction_kl)
    count_empty: bool = False    # sequence means over all sequences
    metric_level: int = 0        # METRIC_LEVELS index: the metric sums the fused pass forms

    @property
    def rollout_seq(self) -> bool:
        return ROLLOUT_CODES[self.rollout].startswith("sequence")

    @property
    def rollout_mask(self) -> bool:
        return ROLLOUT_CODES[self.rollout].endswith("mask")

    @property
    def rollout_given(self) -> bool:
        return ROLLOUT_CODES[self.rollout] == "weights"

    @property
    def per_seq_mean(self) -> bool:
        return AGGREGATIONS[self.aggregation] == "seq_mean_token_mean"

    def floats(self) -> List[float]:
        return [float(getattr(self, f)) for f in FLOAT_FIELDS]

    def ints(self) -> List[int]:
        return [int(getattr(self, f)) for f in INT_FIELDS]

    @classmethod
    def from_lists(cls, floats, ints) -> "TokenLossSpec":
        """The spec of the op's two lists; cached per value (the op runs it on every call)."""
        key = (tuple(floats), tuple(ints))
        spec = _FROM_LISTS.get(key)
        if spec is None:
            spec = _bounded_put(_FROM_LISTS, key, cls._from_lists(floats, ints))
        return spec

    @classmethod
    def _from_lists(cls, floats, ints) -> "TokenLossSpec":
        fi, ii = iter(floats), iter(ints)
        kw = {}
        for f in cls._fields:
            default = cls._field_defaults[f]
            kw[f] = float(next(fi)) if isinstance(default, float) else type(default)(next(ii))
        return cls(**kw)


# Per-call caches of the specs (a config's numbers never change: PolicyLossConfig is frozen). Bounded: a
# key holding NaN never hits, and a run that builds configs on the fly must not grow them without end.
_CACHE_SIZE = 512
_FROM_LISTS: dict = {}
_POLICY_LISTS: dict = {}


def _bounded_put(cache: dict, key, value):
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = value
    return value


def check_metric_names(metrics) -> Optional[Tuple[str, ...]]:
    """``metrics`` (None: all) as the requested fused-pass metric names, in :data:`POLICY_METRICS` order."""
    if metrics is None:
        return None
    if isinstance(metrics, str) or not isinstance(metrics, Iterable):
        raise TypeError(f"metrics must be None or a collection of metric names, got {type(metrics).__name__}")
    names = tuple(metrics)
    unknown = [n for n in names if n not in POLICY_METRICS]
    if unknown:
        raise ValueError(f"metrics: unknown name(s) {unknown}; the fused pass's metrics are {list(POLICY_METRICS)}")
    return tuple(n for n in POLICY_METRICS if n in names)


def metric_level(metrics: Optional[Tuple[str, ...]], *, has_ref: bool, has_entropy: bool) -> int:
    """The leanest :data:`METRIC_LEVELS` index that forms every name of ``metrics`` (None: all, level 0)."""
    if metrics is None or has_ref or has_entropy:
        return 0
    wanted = set(metrics)
    return max(i for i, level in enumerate(METRIC_LEVELS) if wanted <= level)


def policy_spec_lists(config: PolicyLossConfig, *, has_ref: bool, has_entropy: bool, norm_length: int,
                      has_is_weights: bool = False, metrics: Optional[Tuple[str, ...]] = None
                      ) -> Tuple[List[float], List[int]]:
    """``(spec.floats(), spec.ints())`` of :func:`policy_spec` (``num_tokens`` = -1), cached per config and
    flags outside ``torch.compile`` (which traces the construction instead). The lists are shared: read only."""
    key = (config, has_ref, has_entropy, norm_length, has_is_weights, metrics)
    compiling = torch.compiler.is_compiling()
    hit = None if compiling else _POLICY_LISTS.get(key)
    if hit is None:
        spec = policy_spec(config, has_ref=has_ref, has_entropy=has_entropy, norm_length=norm_length,
                           num_tokens=-1.0, has_is_weights=has_is_weights)
        spec = spec._replace(metric_level=metric_level(metrics, has_ref=has_ref, has_entropy=has_entropy))
        hit = (spec.floats(), spec.ints())
        if not compiling:
            _bounded_put(_POLICY_LISTS, key, hit)
    return hit


# The field names by kind, fixed at import: floats() / ints() read no float default under torch.compile
# (which would trace the defaults as symbolic floats, then restart its analysis to specialise them).
FLOAT_FIELDS = tuple(f for f in TokenLossSpec._fields if isinstance(TokenLossSpec._field_defaults[f], float))
INT_FIELDS = tuple(f for f in TokenLossSpec._fields if f not in FLOAT_FIELDS)


def policy_spec(config: PolicyLossConfig, *, has_ref: bool, has_entropy: bool, norm_length: int,
                num_tokens: float, has_is_weights: bool = False) -> TokenLossSpec:
    c = config
    return TokenLossSpec(
        seq_ratio=c.ratio_level == "sequence", clip_low=1.0 if c.surrogate == "cispo_upper" else c.clip_low,
        clip_high=c.clip_high, dual_clip=c.dual_clip or 0.0, kl=KL_CODES[c.kl_estimator.rstrip("+")] if has_ref else 0,
        kl_coef=c.kl_coef, kl_clamp=INF if c.kl_clamp is None else c.kl_clamp,
        entropy_coef=c.entropy_coef, has_entropy=has_entropy,
        rollout=len(ROLLOUT_IS_MODES) if has_is_weights else ROLLOUT_IS_MODES.index(c.rollout_is),
        rollout_cap=c.rollout_is_cap, aggregation=AGGREGATIONS.index(c.aggregation), norm_length=norm_length,
        num_tokens=num_tokens, surrogate=SURROGATE_CODES[c.surrogate], delta=INF if c.delta is None else c.delta,
        tau_pos=c.sapo_tau_pos, tau_neg=c.sapo_tau_neg, ratio_cap=c.dppo_ratio_cap, dro_beta=c.dro_beta or 0.0,
        vespo_k_pos=c.vespo_k_pos, vespo_l_pos=c.vespo_lambda_pos, vespo_k_neg=c.vespo_k_neg,
        vespo_l_neg=c.vespo_lambda_neg, kl_st=c.kl_estimator.endswith("+") and has_ref,
        kl_bias=c.kl_bias_correction and has_ref, count_empty=c.count_empty_sequences)


def value_spec(clip, aggregation: str, norm_length: int) -> TokenLossSpec:
    return TokenLossSpec(value=True, aggregation=AGGREGATIONS.index(aggregation), norm_length=norm_length,
                         value_clip=INF if clip is None else float(clip))
