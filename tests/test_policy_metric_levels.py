"""policy_loss(metrics=...): only the named metrics are returned, the loss and gradients do not change, and
the CPU kernel's lean metric levels (fastpo.ops.loss_spec.METRIC_LEVELS) form exactly the sums they keep,
for every surrogate, on every backend."""

import dataclasses

import pytest
import torch

import fastpo
from fastpo import policy_config as pc
from fastpo.ops import cpu_policy
from fastpo.ops.loss_spec import METRIC_LEVELS, POLICY_METRICS, STATS, metric_level, policy_spec
from test_policy_loss import assert_same, run
from test_policy_surrogates import probability_batch

R = fastpo.PolicyLossConfig
CONFIGS = {
    "PPO": fastpo.PPO, "GSPO": fastpo.GSPO, "CISPO": pc.CISPO, "CISPO_TRL": pc.CISPO_TRL, "SAPO": pc.SAPO,
    "GPG": pc.GPG, "DPPO_TV": pc.DPPO_TV, "DPPO_KL": pc.DPPO_KL, "DRO": pc.DRO, "GMPO": pc.GMPO, "VESPO": pc.VESPO,
    "ratio": R(surrogate="ratio"), "token-is": dataclasses.replace(pc.CISPO, rollout_is="token_truncate"),
    "seq-is": dataclasses.replace(fastpo.PPO, rollout_is="sequence_mask", rollout_is_cap=1.1),
}
SUBSETS = [(), ("ppo_kl",), ("clip_frac", "ppo_kl", "dual_clip_frac"), ("clip_frac_low", "clip_frac_high"),
           ("ratio_max", "ppo_kl"), ("ref_kl", "entropy")]


def uses(config):
    return ("rollout_logp",) if config.rollout_is != "none" else ()


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(s) or "none")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_subset_equals_the_full_metrics(backend, name, subset):
    config = CONFIGS[name]
    ins, mask = probability_batch([13, 9, 5], seed=4, device=backend)
    mask[1, 3:] = False
    full = run(fastpo.policy_loss, ins, mask, config, use=uses(config))
    lean = run(lambda *a, **kw: fastpo.policy_loss(*a, metrics=subset, **kw), ins, mask, config, use=uses(config))
    assert list(lean[3]) == [k for k in POLICY_METRICS if k in subset]
    assert_same(lean, (*full[:3], {k: full[3][k] for k in subset}), atol=0, rtol=0)


def test_subset_with_ref_and_entropy(backend):
    """With ref_logp and entropy every sum is formed (level 0); the named ones are returned."""
    config = R(kl_coef=0.1, entropy_coef=0.01)
    ins, mask = probability_batch([13, 9, 5], seed=5, device=backend)
    full = run(fastpo.policy_loss, ins, mask, config, use=("ref_logp", "entropy"))
    lean = run(lambda *a, **kw: fastpo.policy_loss(*a, metrics=["entropy", "ref_kl"], **kw), ins, mask, config,
               use=("ref_logp", "entropy"))
    assert list(lean[3]) == ["ref_kl", "entropy"]
    assert_same(lean, (*full[:3], {k: full[3][k] for k in ("ref_kl", "entropy")}), atol=0, rtol=0)


def test_prepass_metrics_are_kept(cpu_backend):
    ins, mask = probability_batch([13, 9, 5], seed=6)
    out = fastpo.policy_loss(ins["logp"], ins["old_logp"], ins["advantages"], mask, rollout_logp=ins["rollout_logp"],
                             config=dataclasses.replace(fastpo.DAPO, rollout_is="token_truncate",
                                                        rollout_is_batch_normalize=True), metrics=())
    assert "is_mean" in out.metrics and not set(POLICY_METRICS) & set(out.metrics)


@pytest.mark.parametrize("bad,err", [("ppo_kl", TypeError), (3, TypeError), (["ppo_kl", "kl"], ValueError),
                                     (["loss"], ValueError)])
def test_bad_metrics_raise(bad, err):
    ins, mask = probability_batch([13, 9, 5])
    with pytest.raises(err, match="metrics"):
        fastpo.policy_loss(ins["logp"], ins["old_logp"], ins["advantages"], mask, metrics=bad)


def test_levels():
    assert METRIC_LEVELS[0] == frozenset(POLICY_METRICS)
    assert metric_level(None, has_ref=False, has_entropy=False) == 0
    assert metric_level((), has_ref=False, has_entropy=False) == 3
    assert metric_level(("ppo_kl",), has_ref=False, has_entropy=False) == 2
    assert metric_level(("clip_frac", "ppo_kl"), has_ref=False, has_entropy=False) == 1
    assert metric_level(("ratio_mean",), has_ref=False, has_entropy=False) == 0
    assert metric_level((), has_ref=True, has_entropy=False) == 0
    assert metric_level((), has_ref=False, has_entropy=True) == 0


# The stats each level forms (the kernel leaves the others 0): proves the lean kernels run, and form the rest.
FORMED = {level: {STATS.index(k) for k in METRIC_LEVELS[level]} for level in range(len(METRIC_LEVELS))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cpu_kernel_forms_only_its_level(name, dtype):
    config = CONFIGS[name]
    ins, mask = probability_batch([13, 9, 5], seed=7, dtype=dtype)
    flat = {k: v.reshape(-1) for k, v in ins.items()}
    cu = torch.tensor([0, 13, 26, 39])
    roll = flat["rollout_logp"] if config.rollout_is != "none" else None
    results = []
    for level in range(len(METRIC_LEVELS)):
        spec = policy_spec(config, has_ref=False, has_entropy=False, norm_length=0, num_tokens=-1.0)
        spec = spec._replace(metric_level=level)
        loss, stats, unit, _ = cpu_policy.token_loss_forward(flat["logp"], flat["old_logp"], flat["advantages"],
                                                             None, None, roll, mask.reshape(-1), cu, None, spec)
        results.append((loss, stats, unit))
    loss0, stats0, unit0 = results[0]
    for level, (loss, stats, unit) in enumerate(results):
        assert torch.equal(loss, loss0) and torch.equal(unit, unit0), level
        for i in range(2, len(STATS)):
            if i in FORMED[level]:
                assert torch.equal(stats[i], stats0[i]), (level, STATS[i])
            else:
                assert stats[i] == 0, (level, STATS[i])
    assert stats0[STATS.index("ratio_max")] > 0  # level 0 formed the ratio statistics


def test_cpu_kernel_rejects_unknown_level():
    spec = policy_spec(fastpo.GRPO, has_ref=False, has_entropy=False, norm_length=0, num_tokens=-1.0)
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="metric_level"):
        cpu_policy.token_loss_forward(x, x, x, None, None, None, None, torch.tensor([0, 4]), None,
                                      spec._replace(metric_level=4))


def test_cpu_kernel_runs_every_sum_with_ref_logp():
    """A lean level asked for with ref_logp (the Python side never asks for one) runs level 0: the lean
    kernels are built without ref_logp and entropy."""
    ins, mask = probability_batch([13, 9, 5], seed=8)
    flat = {k: v.reshape(-1) for k, v in ins.items()}
    cu = torch.tensor([0, 13, 26, 39])
    spec = policy_spec(R(kl_coef=0.1), has_ref=True, has_entropy=False, norm_length=0, num_tokens=-1.0)
    outs = [cpu_policy.token_loss_forward(flat["logp"], flat["old_logp"], flat["advantages"], flat["ref_logp"], None,
                                          None, mask.reshape(-1), cu, None, spec._replace(metric_level=level))
            for level in (0, 3)]
    assert all(torch.equal(a, b) for a, b in zip(outs[0][:3], outs[1][:3]))
    assert outs[1][1][STATS.index("ratio_max")] > 0
