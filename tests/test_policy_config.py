"""PolicyLossConfig validation and the preset values."""

import dataclasses

import pytest

import fastpo
from fastpo import PolicyLossConfig


def test_presets():
    assert (fastpo.PPO.clip_low, fastpo.PPO.clip_high, fastpo.PPO.dual_clip, fastpo.PPO.aggregation) == \
        (0.2, 0.2, 3.0, "token_mean")
    assert (fastpo.GRPO.aggregation, fastpo.GRPO.kl_estimator, fastpo.GRPO.kl_coef) == ("seq_mean_token_mean", "k3", 0.04)
    assert (fastpo.DAPO.clip_low, fastpo.DAPO.clip_high, fastpo.DAPO.aggregation, fastpo.DAPO.kl_coef) == \
        (0.2, 0.28, "token_mean", 0.0)
    assert (fastpo.DR_GRPO.aggregation, fastpo.DR_GRPO.kl_coef) == ("token_sum_norm", 0.0)
    assert (fastpo.GSPO.ratio_level, fastpo.GSPO.clip_low, fastpo.GSPO.clip_high, fastpo.GSPO.aggregation) == \
        ("sequence", 3e-4, 4e-4, "seq_mean_token_mean")


def test_frozen_hashable_and_replace_validates():
    with pytest.raises(dataclasses.FrozenInstanceError):
        fastpo.GRPO.kl_coef = 0.0
    assert hash(fastpo.GRPO) == hash(dataclasses.replace(fastpo.GRPO))
    with pytest.raises(ValueError, match="kl_estimator"):
        dataclasses.replace(fastpo.GRPO, kl_estimator="k4")
    assert PolicyLossConfig(clip_low=0, dual_clip=2).clip_low == 0.0  # ints accepted, stored as float


@pytest.mark.parametrize("field,value,exc", [
    ("clip_low", -0.1, ValueError), ("clip_low", 1.0, ValueError), ("clip_low", "0.2", TypeError),
    ("clip_low", float("nan"), ValueError), ("clip_high", -1e-3, ValueError), ("clip_high", float("inf"), ValueError),
    ("clip_high", True, TypeError), ("dual_clip", 1.0, ValueError), ("dual_clip", "3", TypeError),
    ("ratio_level", "seq", ValueError), ("ratio_level", None, TypeError), ("kl_coef", -0.1, ValueError),
    ("kl_coef", None, TypeError), ("kl_estimator", "k4", ValueError), ("kl_clamp", 0.0, ValueError),
    ("kl_clamp", "big", TypeError), ("entropy_coef", float("inf"), ValueError), ("entropy_coef", None, TypeError),
    ("aggregation", "mean", ValueError), ("aggregation", 0, TypeError), ("norm_length", 0, ValueError),
    ("norm_length", 10.0, TypeError), ("norm_length", True, TypeError), ("rollout_is", "token", ValueError),
    ("rollout_is", None, TypeError), ("rollout_is_cap", 0.0, ValueError), ("rollout_is_cap", "2", TypeError),
])
def test_invalid_fields(field, value, exc):
    with pytest.raises(exc, match=field):
        PolicyLossConfig(**{field: value})
