"""fastpo.ops.rollout_correction against verl 0.9.1's rollout_corr_helper (its own functions) and TRL 1.16's
vLLM importance-sampling ratio (reproduced from ``GRPOTrainer._generate_and_score_completions``, cited
below), plus NaN rollout log-probs and the hand-checked edge cases."""

import math

import pytest
import torch

from fastpo.ops.rollout_correction import RS_OPTIONS, rejection_mask, rollout_is_metrics, rollout_is_weights

B, T = 6, 10


def make_batch(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 7, 0, 4, 9, 1])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g) * 2
    rollout = old + 0.4 * torch.randn(B, T, generator=g)
    return old, rollout, mask


@pytest.fixture(scope="module")
def verl_helper():
    try:
        from verl.trainer.ppo import rollout_corr_helper
    except Exception as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"verl is not importable ({type(exc).__name__}: {exc}); install the parity extra")
    return rollout_corr_helper


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("threshold", [2.0, 1.2, "0.7_1.4", "0.2_5.0"])
@pytest.mark.parametrize("normalize", [False, True])
def test_weights_equal_verl(verl_helper, level, threshold, normalize):
    for seed in range(3):
        old, rollout, mask = make_batch(seed)
        want, _ = verl_helper.compute_rollout_correction_weights(
            old - rollout, mask.float(), rollout_is=level, rollout_is_threshold=threshold,
            rollout_is_batch_normalize=normalize)
        lo, hi = (None, float(threshold)) if not isinstance(threshold, str) else map(float, threshold.split("_"))
        got = rollout_is_weights(old, rollout, mask, level=level, mode="truncate" if lo is None else "mask", upper=hi,
                                 lower=lo, batch_normalize=normalize)
        torch.testing.assert_close(torch.where(mask, got, 0.0), torch.where(mask, want, 0.0), atol=1e-6, rtol=1e-5)


CHAINS = [(o, t) for o in RS_OPTIONS for t in (["1.5", "0.6_1.8"] if o.endswith("k1") else ["0.05", "0.4"])]
CHAINS += [("token_k1,seq_max_k3", "1.5,0.2"), ("seq_mean_k2,token_k3,seq_sum_k1", "0.1,0.3,0.5_4.0")]


@pytest.mark.parametrize("options,threshold", CHAINS)
def test_rejection_equals_verl(verl_helper, options, threshold):
    for seed in range(3):
        old, rollout, mask = make_batch(seed)
        want, _ = verl_helper.compute_rollout_rejection_mask(old - rollout, mask.float(), rollout_rs=options,
                                                             rollout_rs_threshold=threshold)
        got = rejection_mask(old, rollout, mask, options, threshold)
        assert torch.equal(got, want.bool()), (options, threshold, seed)


def trl_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """TRL 1.16 grpo_trainer.py L2660-2705 (``vllm_importance_sampling_correction``), minimally."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("clip_min,clip_max", [(None, 3.0), (0.5, 2.0)])
def test_weights_equal_trl_with_nan(mode, clip_min, clip_max):
    old, sampling, mask = make_batch(4)
    sampling[0, 3] = sampling[4, 0] = float("nan")  # tokens vLLM could not score
    want = trl_ratio(old, sampling, mask.float(), mode, clip_min, clip_max).expand(B, T)
    level, kind = mode.split("_")
    got = rollout_is_weights(old, sampling, mask, level=level, mode=kind, lower=clip_min, upper=clip_max,
                             log_clamp=None)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(torch.where(mask, got, 0.0), torch.where(mask, want, 0.0), atol=1e-6, rtol=1e-5)


def test_nan_rollout_logps_are_no_evidence():
    old, rollout, mask = make_batch(5)
    rollout[1, :] = float("nan")  # a whole sequence unscored: weight 1, never rejected
    w = rollout_is_weights(old, rollout, mask, level="sequence", upper=10.0)
    assert torch.all(w[1, mask[1]] == 1.0)
    keep = rejection_mask(old, rollout, mask, "seq_max_k2,token_k1", "0.01,1.001")
    assert torch.equal(keep[1], mask[1])


def test_batch_normalize_mean_one_and_errors():
    old, rollout, mask = make_batch(6)
    w = rollout_is_weights(old, rollout, mask, upper=1.5, batch_normalize=True)
    assert w[mask].mean().item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="level"):
        rollout_is_weights(old, rollout, mask, level="seq")
    with pytest.raises(ValueError, match="options"):
        rejection_mask(old, rollout, mask, "token_k4", 1.0)
    with pytest.raises(ValueError, match="seq_max_k2"):
        rejection_mask(old, rollout, mask, "seq_max_k2", "0.1_0.3")
    with pytest.raises(ValueError, match="shape"):
        rejection_mask(old, rollout[:, :3], mask, "token_k2", 1.0)


@pytest.mark.parametrize("threshold", [2.0, 1.1, "0.7_1.4"])
def test_metrics_equal_verl(verl_helper, threshold):
    old, rollout, mask = make_batch(7)
    want_w, want = verl_helper.compute_rollout_correction_weights(old - rollout, mask.float(), rollout_is="token",
                                                                  rollout_is_threshold=threshold)
    lo, hi = (None, float(threshold)) if not isinstance(threshold, str) else map(float, threshold.split("_"))
    w = rollout_is_weights(old, rollout, mask, mode="truncate" if lo is None else "mask", upper=hi, lower=lo)
    got = rollout_is_metrics(w, mask, upper=hi)
    for key in ("mean", "min", "max", "std", "eff_sample_size"):
        assert got[key].item() == pytest.approx(want[f"rollout_is_{key}"], abs=1e-6, rel=1e-5), key
    equal = rollout_is_metrics(torch.ones(B, T), mask)
    assert equal["eff_sample_size"].item() == pytest.approx(1.0) and equal["std"].item() == 0.0
    assert rollout_is_metrics(w, torch.zeros_like(mask))["eff_sample_size"].item() == 0.0
