"""fastpo.integrations.verl against verl 0.9.1 itself: every ``fastpo_<name>`` policy loss against verl's
``<name>``, both through verl's own ``get_policy_loss_fn``, on random ragged batches: loss, ∂loss/∂log_prob
and the metrics, for every ``loss_agg_mode``, with and without ``rollout_is_weights``, with and without
verl's global normalisers (``config.global_batch_info``).

While a ``fastpo_*`` loss runs, verl's own policy losses and ``agg_loss`` are replaced by functions that
raise, so a fastpo loss that quietly called verl's would fail here.
"""

import contextlib

import pytest
import torch

try:
    from verl.trainer.ppo import core_algos, rollout_corr_helper
    from verl.trainer.config.algorithm import RolloutCorrectionConfig
    from verl.workers.config.actor import ActorConfig
    from verl.workers.config.actor import PolicyLossConfig as VerlPolicyLossConfig
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"verl is not importable ({type(exc).__name__}: {exc}); install the parity extra: "
                f"pip install 'fastpo[parity]' && pip install --no-deps verl==0.9.1", allow_module_level=True)

import fastpo.integrations.verl as fastpo_verl  # noqa: E402  (registers the fastpo_* losses)

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
NAMES = ["vanilla", "dppo_tv", "dppo_kl", "gspo", "sapo", "gpg", "geo_mean", "dro", "cispo"]
B, T = 6, 11


def make_batch(seed, *, token_adv=False):
    """Ragged [B, T] batch: one empty row, holes in the masks, log-probs < 0 (DPPO reads probabilities)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 7, 0, 4, 9, 1])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask &= torch.rand(B, T, generator=g) > 0.1
    log_prob = -torch.rand(B, T, generator=g) * 2.0 - 0.05
    old = (log_prob + 0.6 * torch.randn(B, T, generator=g)).clamp(max=-1e-3)
    adv = torch.randn(B, 1, generator=g).expand(B, T).clone()
    if token_adv:
        adv = adv + 0.5 * torch.randn(B, T, generator=g)
    weights = torch.rand(B, T, generator=g) * 1.5 * mask
    return log_prob, old, adv, mask.float(), weights


def actor_config(name, info, rollout_correction=None, policy_loss=None):
    kw = dict(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=4, rollout_n=1,
              clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28)
    if name == "geo_mean":  # GMPO clips log-ratios: a width that clips some of these tokens
        kw.update(clip_ratio_low=0.25, clip_ratio_high=0.25)
    loss_kw = {"dro_beta": 0.3} if name == "dro" else {}
    loss_kw.update(policy_loss or {})
    if rollout_correction is not None:
        loss_kw["rollout_correction"] = RolloutCorrectionConfig(**rollout_correction)
    config = ActorConfig(policy_loss=VerlPolicyLossConfig(**loss_kw), **kw)
    config.global_batch_info.update(info)  # a mutable dict (verl's ppo_loss fills it the same way)
    return config


def run(fn, log_prob, old, adv, mask, mode, config, weights):
    x = log_prob.clone().requires_grad_()
    loss, metrics = fn(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask, loss_agg_mode=mode,
                       config=config, rollout_is_weights=weights)
    loss.backward()
    return loss.detach(), x.grad, metrics


def _raiser(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"fastpo delegated to verl's {what}")
    return fail


@contextlib.contextmanager
def verl_blocked():
    """Every verl policy loss (registry entries and module functions), agg_loss and the compute_* functions of
    verl's rollout_corr_helper raise inside."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(core_algos.POLICY_LOSS_REGISTRY):
            if not key.startswith("fastpo_"):
                mp.setitem(core_algos.POLICY_LOSS_REGISTRY, key, _raiser(key))
        for attr in dir(core_algos):
            if attr.startswith("compute_policy_loss") or attr == "agg_loss":
                mp.setattr(core_algos, attr, _raiser(attr))
        for attr in dir(rollout_corr_helper):  # verl's rollout-correction weights, masks and metrics
            if attr.startswith("compute_"):
                mp.setattr(rollout_corr_helper, attr, _raiser(f"rollout_corr_helper.{attr}"))
        yield


def compare(got, want, *, atol=2e-6, rtol=2e-5):
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=rtol, msg=lambda m: f"loss: {m}")
    torch.testing.assert_close(got[1], want[1], atol=atol, rtol=rtol, msg=lambda m: f"grad: {m}")
    assert set(got[2]) == set(want[2]), (sorted(got[2]), sorted(want[2]))
    for key, value in want[2].items():
        assert isinstance(got[2][key], float), key
        assert got[2][key] == pytest.approx(float(value), abs=atol, rel=rtol), key


INFOS = {"local": {}, "global": {"dp_size": 2, "batch_num_tokens": 75, "global_batch_size": 11,
                                 "loss_scale_factor": 7}}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("info", list(INFOS))
def test_fastpo_loss_equals_verl(name, mode, info):
    for seed, with_weights in ((0, False), (1, True)):
        log_prob, old, adv, mask, weights = make_batch(seed, token_adv=name != "geo_mean" and seed == 1)
        w = weights if with_weights else None
        config = actor_config(name, INFOS[info])
        want = run(core_algos.get_policy_loss_fn(name), log_prob, old, adv, mask, mode, config, w)
        with verl_blocked():
            got = run(core_algos.get_policy_loss_fn(f"fastpo_{name}"), log_prob, old, adv, mask, mode, config, w)
        compare(got, want)


@pytest.mark.parametrize("loss_type", ["ppo_clip", "reinforce"])
@pytest.mark.parametrize("level,threshold,normalize,rs,rs_threshold", [
    (None, 2.0, False, None, None), ("token", 1.2, False, None, None), ("sequence", 2.0, False, None, None),
    ("token", "0.8_1.3", False, None, None), ("token", 1.5, True, None, None), ("sequence", "0.5_3.0", True, None, None),
    ("token", 2.0, False, "token_k1", 1.6), ("sequence", 2.0, False, "seq_max_k2,seq_mean_k3", "0.3,0.05"),
    (None, 2.0, False, "seq_sum_k1", "0.5_3.0"),
])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
def test_fastpo_bypass_mode_equals_verl(loss_type, level, threshold, normalize, rs, rs_threshold, mode):
    log_prob, old, adv, mask, _ = make_batch(3)
    config = actor_config("bypass_mode", {}, dict(loss_type=loss_type, rollout_is=level, rollout_is_threshold=threshold,
                                                   rollout_is_batch_normalize=normalize, rollout_rs=rs,
                                                   rollout_rs_threshold=rs_threshold))
    want = run(core_algos.get_policy_loss_fn("bypass_mode"), log_prob, old, adv, mask, mode, config, None)
    with verl_blocked():
        got = run(core_algos.get_policy_loss_fn("fastpo_bypass_mode"), log_prob, old, adv, mask, mode, config, None)
    compare(got, want)


def test_blocking_catches_delegation():
    """The blocking is real: verl's own loss, called directly or through the registry, raises under it."""
    log_prob, old, adv, mask, _ = make_batch(0)
    config = actor_config("vanilla", {})
    with verl_blocked():
        with pytest.raises(AssertionError, match="delegated"):
            core_algos.compute_policy_loss_vanilla(old, log_prob, adv, mask, "token-mean", config)
        with pytest.raises(AssertionError, match="delegated"):
            core_algos.get_policy_loss_fn("gspo")(old, log_prob, adv, mask, "token-mean", config)
        from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask as helper
        with pytest.raises(AssertionError, match="delegated"):
            helper(old, log_prob, mask, rollout_is="token")


def test_every_builtin_is_registered():
    names = set(core_algos.POLICY_LOSS_REGISTRY)
    builtins = {n for n in names if not n.startswith("fastpo_")}
    assert builtins == {n[len("fastpo_"):] for n in names if n.startswith("fastpo_")}
    assert set(fastpo_verl.LOSSES) == builtins


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("info", list(INFOS))
def test_cov_losses_equal_verl(name, mode, info):
    """Clip-Cov / KL-Cov with a selection ratio that picks several tokens of this small batch (the same
    global-generator state for verl's and fastpo's random pick), selected inside fastpo.policy_loss; with
    rollout_is_weights for both (verl weighs KL-Cov's term too)."""
    overrides = dict(clip_cov_ratio=0.1, clip_cov_lb=-1.0, clip_cov_ub=5.0, kl_cov_ratio=0.1, ppo_kl_coef=0.5)
    for seed in (0, 1):
        log_prob, old, adv, mask, weights = make_batch(seed, token_adv=seed == 1)
        w = weights if seed == 1 else None
        config = actor_config(name, INFOS[info], policy_loss=overrides)
        torch.manual_seed(seed)
        want = run(core_algos.get_policy_loss_fn(name), log_prob, old, adv, mask, mode, config, w)
        torch.manual_seed(seed)
        with verl_blocked():
            got = run(core_algos.get_policy_loss_fn(f"fastpo_{name}"), log_prob, old, adv, mask, mode, config, w)
        compare(got, want)


def test_clip_cov_generator_repeats():
    from fastpo.ops.token_selection import clip_cov_weights
    log_prob, old, adv, mask, _ = make_batch(1, token_adv=True)
    pick = lambda seed: clip_cov_weights(log_prob, old, adv, mask, clip_cov_ratio=0.2, clip_cov_lb=-1.0,  # noqa: E731
                                         generator=torch.Generator().manual_seed(seed))
    assert torch.equal(pick(3), pick(3)) and (pick(3) == 0).sum() >= 2
    assert any(not torch.equal(pick(3), pick(s)) for s in range(4, 10))


def test_import_fastpo_does_not_import_verl():
    import subprocess
    import sys
    code = "import sys, fastpo, fastpo.integrations; assert 'verl' not in sys.modules, 'verl imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["vanilla", "dppo_tv", "dppo_kl"])
def test_dual_clip_fraction_equals_verl(name):
    """actor/pg_clipfrac_lower with a dual-clip bound that these ratios cross (nonzero, so the key's value is
    really compared): verl's dual-clip fraction (vanilla) / ratio > c (DPPO) against fastpo's dual_clip_frac."""
    for seed in (0, 1):
        log_prob, old, adv, mask, _ = make_batch(seed, token_adv=seed == 1)
        config = actor_config(name, {})
        object.__setattr__(config, "clip_ratio_c", 1.3)
        want = run(core_algos.get_policy_loss_fn(name), log_prob, old, adv, mask, "token-mean", config, None)
        with verl_blocked():
            got = run(core_algos.get_policy_loss_fn(f"fastpo_{name}"), log_prob, old, adv, mask, "token-mean",
                      config, None)
        assert want[2]["actor/pg_clipfrac_lower"] > 0
        compare(got, want)
