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


def test_surrogate_presets():
    assert (fastpo.CISPO.surrogate, fastpo.CISPO.clip_low, fastpo.CISPO.clip_high) == ("cispo", 0.2, 0.2)
    assert (fastpo.CISPO_TRL.surrogate, fastpo.CISPO_TRL.clip_high) == ("cispo_upper", 4.0)  # TRL ε_max = 5
    assert (fastpo.SAPO.sapo_tau_pos, fastpo.SAPO.sapo_tau_neg, fastpo.SAPO.aggregation) == \
        (1.0, 1.05, "seq_mean_token_mean")
    assert (fastpo.GMPO.surrogate, fastpo.GMPO.clip_low, fastpo.GMPO.count_empty_sequences) == ("geo_mean", 0.4, True)
    assert (fastpo.LUSPO.ratio_level, fastpo.LUSPO.aggregation, fastpo.LUSPO.count_empty_sequences) == \
        ("sequence", "seq_mean_token_sum", True)
    assert (fastpo.DPPO_TV.dppo_ratio_cap, fastpo.DPPO_KL.surrogate, fastpo.GPG.surrogate) == \
        (20.0, "dppo_kl", "reinforce")
    assert (fastpo.DRO.dro_beta, fastpo.BNPO.aggregation) == (0.1, "token_mean")
    assert (fastpo.VESPO.vespo_k_pos, fastpo.VESPO.vespo_lambda_pos, fastpo.VESPO.vespo_k_neg,
            fastpo.VESPO.vespo_lambda_neg) == (2.0, 3.0, 3.0, 2.0)
    for est in ("abs", "k1+", "k2+", "k3+", "abs+"):
        assert PolicyLossConfig(kl_estimator=est).kl_estimator == est


@pytest.mark.parametrize("field,value,exc", [
    ("surrogate", "ppo", ValueError), ("surrogate", None, TypeError), ("delta", 1.0, ValueError),
    ("delta", "2", TypeError), ("sapo_tau_pos", 0.0, ValueError), ("sapo_tau_neg", -1.0, ValueError),
    ("dppo_ratio_cap", 0.0, ValueError), ("dro_beta", 0.0, ValueError), ("dro_beta", "0.1", TypeError),
    ("vespo_lambda_pos", 0.0, ValueError), ("vespo_k_neg", float("nan"), ValueError),
    ("kl_bias_correction", 1, TypeError), ("count_empty_sequences", "yes", TypeError),
    ("aggregation", "token-sum", ValueError),
])
def test_invalid_surrogate_fields(field, value, exc):
    with pytest.raises(exc, match=field):
        PolicyLossConfig(**{field: value})


@pytest.mark.parametrize("kw,match", [
    (dict(surrogate="reinforce", ratio_level="sequence"), "ratio_level='sequence'"),
    (dict(surrogate="geo_mean", ratio_level="sequence"), "ratio_level='sequence'"),
    (dict(surrogate="cispo", dual_clip=3.0), "dual_clip"),
    (dict(surrogate="sapo", delta=2.0), "delta"),
    (dict(surrogate="dro"), "dro_beta"),
    (dict(surrogate="geo_mean", rollout_is="token_truncate"), "sequence rollout_is"),
    (dict(surrogate="vespo", rollout_is="sequence_mask"), "vespo"),
])
def test_surrogate_combinations(kw, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kw)
    PolicyLossConfig(**{k: v for k, v in kw.items() if k == "surrogate"}, **({"dro_beta": 0.1} if kw.get(
        "surrogate") == "dro" else {}))  # the surrogate alone is fine
