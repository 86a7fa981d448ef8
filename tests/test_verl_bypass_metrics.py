"""fastpo.ops.rollout_metrics against verl 0.9.1's compute_rollout_correction_and_rejection_mask: every
``rollout_corr/*`` key and value, for each IS level / threshold form, each rejection option (alone and
chained), with batch normalisation, on ragged batches with an empty row; verl's helper is blocked while
fastpo runs. Plus NaN padding and fastpo's own errors."""

import math

import pytest
import torch

try:
    from verl.trainer.ppo import rollout_corr_helper
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"verl is not importable ({type(exc).__name__}: {exc})", allow_module_level=True)

from fastpo.ops.rollout_correction import RS_OPTIONS
from fastpo.ops.rollout_metrics import verl_rollout_corr_metrics

B, T = 7, 13


def batch(seed, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 9, 0, 4, 12, 1, 6])
    mask = (torch.arange(T)[None, :] < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.1)
    logp = -torch.rand(B, T, generator=g) * 3.0 - 0.01
    rollout = logp + spread * torch.randn(B, T, generator=g)
    return logp, rollout, mask.float()


def verl(logp, rollout, mask, **kw):
    return rollout_corr_helper.compute_rollout_correction_and_rejection_mask(logp, rollout, mask, **kw)[2]


def fastpo(logp, rollout, mask, **kw):
    """fastpo's metrics with verl's helper blocked, from the C++ row pass, checked against the torch one."""
    with pytest.MonkeyPatch.context() as mp:
        for attr in dir(rollout_corr_helper):
            if attr.startswith("compute_"):
                mp.setattr(rollout_corr_helper, attr, _raise)
        got = verl_rollout_corr_metrics(logp, rollout, mask, backend="cpp", **kw)
        compare(got, verl_rollout_corr_metrics(logp, rollout, mask, backend="torch", **kw), rtol=1e-5, atol=1e-7)
        return got


def _raise(*args, **kwargs):
    raise AssertionError("fastpo delegated to verl's rollout_corr_helper")


def compare(got, want, rtol=2e-5, atol=2e-6):
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k, v in want.items():
        assert isinstance(got[k], float), k
        assert got[k] == pytest.approx(float(v), rel=rtol, abs=atol), (k, got[k], v)


IS_CASES = [("token", 2.0, False), ("token", 1.1, True), ("token", "0.7_1.4", False), ("token", "0.5_2.0", True),
            ("sequence", 2.0, False), ("sequence", 5.0, True), ("sequence", "0.3_3.0", False),
            ("sequence", "0.1_10.0", True), (None, 2.0, False)]


@pytest.mark.parametrize("level,threshold,normalize", IS_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_is_metrics_equal_verl(level, threshold, normalize, seed):
    logp, rollout, mask = batch(seed)
    kw = dict(rollout_is=level, rollout_is_threshold=threshold, rollout_is_batch_normalize=normalize)
    compare(fastpo(logp, rollout, mask, **kw), verl(logp, rollout, mask, **kw))


RS_THRESHOLDS = {"k1": ["1.5", "0.6_1.3"], "k2": ["0.05"], "k3": ["0.02", "0.5"]}


@pytest.mark.parametrize("option", RS_OPTIONS)
def test_rejection_metrics_equal_verl(option):
    for seed in (0, 2):
        for thr in RS_THRESHOLDS[option[-2:]]:
            logp, rollout, mask = batch(seed, spread=0.3)
            kw = dict(rollout_is="token", rollout_rs=option, rollout_rs_threshold=thr)
            compare(fastpo(logp, rollout, mask, **kw), verl(logp, rollout, mask, **kw))


def test_chained_rejection_and_duplicates_equal_verl():
    logp, rollout, mask = batch(4, spread=0.4)
    kw = dict(rollout_is="sequence", rollout_is_threshold="0.5_2.0", rollout_is_batch_normalize=True,
              rollout_rs="token_k1,seq_mean_k3,seq_max_k2,token_k1", rollout_rs_threshold="0.5_2.0,0.1,0.2")
    got = fastpo(logp, rollout, mask, **kw)
    compare(got, verl(logp, rollout, mask, **kw))
    assert 0 < got["rollout_corr/rollout_rs_masked_fraction"] < 1


def test_single_token_and_extreme_ratios_equal_verl():
    """One counted token (std 0, one row), then ratios of e^±40 (clamped at ±20 as verl)."""
    logp, rollout, _ = batch(5)
    one = torch.zeros(B, T)
    one[3, 2] = 1.0
    kw = dict(rollout_is="token", rollout_is_threshold=2.0, rollout_rs="seq_sum_k2,token_k1",
              rollout_rs_threshold="1.0,1.5")
    compare(fastpo(logp, rollout, one, **kw), verl(logp, rollout, one, **kw))
    logp, rollout, mask = batch(6)
    rollout = rollout + torch.where(torch.rand(B, T) > 0.5, 40.0, -40.0)
    kw["rollout_is"] = "sequence"
    got = fastpo(logp, rollout, mask, **kw)
    compare(got, verl(logp, rollout, mask, **kw), rtol=1e-4)


def test_nan_padding_changes_nothing():
    """vLLM can leave NaN / inf where no token was scored: selected away, the metrics are the clean ones
    (on both row-pass backends: fastpo() runs the two)."""
    logp, rollout, mask = batch(7)
    kw = dict(rollout_is="sequence", rollout_is_threshold="0.5_2.0", rollout_rs="seq_max_k3,token_k2",
              rollout_rs_threshold="0.3,0.1")
    clean = fastpo(logp, rollout, mask, **kw)
    bad_l, bad_r = logp.clone(), rollout.clone()
    bad_l[mask == 0], bad_r[mask == 0] = float("nan"), float("inf")
    dirty = fastpo(bad_l, bad_r, mask, **kw)
    assert all(math.isfinite(v) for v in dirty.values())
    assert dirty == clean
    compare(dirty, verl(bad_l, bad_r, mask, **kw))  # verl selects padding away too


def test_errors():
    logp, rollout, mask = batch(0)
    with pytest.raises(ValueError, match="at least one valid token"):
        verl_rollout_corr_metrics(logp, rollout, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="one shape"):
        verl_rollout_corr_metrics(logp, rollout[:, :-1], mask)
    with pytest.raises(ValueError, match="rollout_rs_threshold"):
        verl_rollout_corr_metrics(logp, rollout, mask, rollout_rs="token_k2")
    with pytest.raises(ValueError, match="rollout_is"):
        verl_rollout_corr_metrics(logp, rollout, mask, rollout_is="tokens")
    with pytest.raises(TypeError, match="rollout_is_threshold"):
        verl_rollout_corr_metrics(logp, rollout, mask, rollout_is="token", rollout_is_threshold=True)
    with pytest.raises(ValueError, match="lower <= upper"):
        verl_rollout_corr_metrics(logp, rollout, mask, rollout_is="token", rollout_is_threshold="3.0_2.0")


def _distributed_worker(rank, world, init_file, results):
    import torch.distributed as dist

    from test_parity_verl_policy import actor_config, run, verl_blocked
    from verl.trainer.ppo import core_algos

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        logp, rollout, mask = batch(10 + rank, spread=0.4 + 0.3 * rank)  # the ranks' mean weights differ
        adv = torch.randn(B, 1, generator=torch.Generator().manual_seed(rank)).expand(B, T).clone()
        for level, loss_type in (("token", "reinforce"), ("sequence", "reinforce"), ("sequence", "ppo_clip")):
            config = actor_config("bypass_mode", {}, dict(loss_type=loss_type, rollout_is=level,
                                                           rollout_is_threshold=4.0, rollout_is_batch_normalize=True))
            want = run(core_algos.get_policy_loss_fn("bypass_mode"), logp, rollout, adv, mask, "token-mean",
                       config, None)
            with verl_blocked():
                got = run(core_algos.get_policy_loss_fn("fastpo_bypass_mode"), logp, rollout, adv, mask,
                          "token-mean", config, None)
            torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=2e-5)
            torch.testing.assert_close(got[1], want[1], atol=2e-6, rtol=2e-5)
            compare(got[2], want[2])
            results[f"{rank}:{level}:{loss_type}"] = got[2]["rollout_corr/rollout_is_batch_norm_factor"]
    finally:
        dist.destroy_process_group()


def test_batch_normalize_is_global_under_torch_distributed(tmp_path):
    """Two gloo ranks with different batches: verl normalises the rollout IS weights by the mean over both
    ranks (verl_F.distributed_masked_mean); fastpo_bypass_mode's loss, gradient and rollout_corr/* equal
    verl's on each rank, and the factor is the same global one on both."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    for case in ("token:reinforce", "sequence:reinforce", "sequence:ppo_clip"):
        level = case.split(":")[0]
        assert results[f"0:{case}"] == pytest.approx(results[f"1:{case}"], rel=1e-6)
        local = [verl_rollout_corr_metrics(*batch(10 + r, spread=0.4 + 0.3 * r), rollout_is=level,
                                           rollout_is_threshold=4.0, rollout_is_batch_normalize=True)
                 ["rollout_corr/rollout_is_batch_norm_factor"] for r in (0, 1)]
        assert all(v != pytest.approx(results[f"0:{case}"], rel=1e-3) for v in local), (local, case)
