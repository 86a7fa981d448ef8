"""policy_loss surrogates (issue 14): reference vs the C++ CPU path vs Triton (interpreter), for every
surrogate, KL estimator and aggregation added with them; float64 gradcheck of the reference (and of the
CPU path); packed vs padded; NaN/±inf in padding; log-ratios of ±80; given is_weights; hand-checked values."""

import dataclasses
import math

import pytest
import torch

import fastpo
from fastpo import reference
from fastpo import policy_config as pc
from test_policy_loss import assert_same, make_batch, packed_view, run, to_packed

R = fastpo.PolicyLossConfig
T = 13
LENGTHS = [13, 0, 7, 4]
PRESETS = ["BNPO", "LUSPO", "CISPO", "CISPO_TRL", "SAPO", "GMPO", "GPG", "DPPO_TV", "DPPO_KL", "DRO", "VESPO"]
CONFIGS = {
    **{name: getattr(pc, name) for name in PRESETS},
    "delta": R(delta=1.3, clip_high=0.1),
    "delta-dual": R(delta=1.5, dual_clip=2.0, clip_low=0.1),
    "sapo-seq": dataclasses.replace(pc.SAPO, ratio_level="sequence", sapo_tau_neg=2.0),
    "cispo-seq": dataclasses.replace(pc.CISPO, ratio_level="sequence", clip_low=0.05, clip_high=0.05),
    "dppo_tv-tight": dataclasses.replace(pc.DPPO_TV, clip_low=0.02, clip_high=0.03, dppo_ratio_cap=1.2),
    "dppo_kl-tight": dataclasses.replace(pc.DPPO_KL, clip_low=0.005, clip_high=0.01, dppo_ratio_cap=1.2),
    "geo-seq-is": dataclasses.replace(pc.GMPO, rollout_is="sequence_mask", rollout_is_cap=1.1, clip_low=0.1),
    "cispo-token-is": dataclasses.replace(pc.CISPO, rollout_is="token_truncate", rollout_is_cap=1.1),
    "vespo-neg": dataclasses.replace(pc.VESPO, vespo_k_neg=1.5, vespo_lambda_neg=0.5),
    "ratio-kl-abs": R(surrogate="ratio", kl_coef=0.5, kl_estimator="abs", kl_clamp=None),
    "ratio-seq": R(surrogate="ratio", ratio_level="sequence"),
    **{f"kl-{est}": R(kl_coef=0.1, kl_estimator=est, kl_clamp=0.3) for est in ("abs", "k1+", "k2+", "k3+", "abs+")},
    "kl-bias": R(kl_coef=0.1, kl_bias_correction=True, kl_clamp=None),
    "kl-bias-seq": R(kl_coef=0.1, kl_bias_correction=True, ratio_level="sequence", kl_estimator="k2"),
    "token_sum": R(aggregation="token_sum", entropy_coef=0.01),
    "count-empty-mean": R(aggregation="seq_mean_token_mean", count_empty_sequences=True),
    "count-empty-sum": dataclasses.replace(pc.GPG, aggregation="seq_mean_token_sum", count_empty_sequences=True),
}
# Configs whose gradient is the derivative of their value (gradcheck applies): not the stop-gradient forms
# (cispo's and dppo's sg(ratio), vespo's sg(φ), the GSPO token-gradient ratio, straight-through kX+).
GRADCHECKABLE = [n for n, c in CONFIGS.items() if c.surrogate in ("clip", "sapo", "reinforce", "dro", "geo_mean", "ratio")
                 and c.ratio_level == "token" and not c.kl_estimator.endswith("+")]
SEQUENCE_LEVEL = ["LUSPO", "GMPO", "VESPO", "sapo-seq", "cispo-seq", "geo-seq-is", "kl-bias-seq", "count-empty-mean"]


def uses(config):
    return ("ref_logp", "entropy", "rollout_logp") if config.rollout_is != "none" else ("ref_logp", "entropy")


def probability_batch(lengths, *, seed=0, device="cpu", dtype=torch.float32):
    """make_batch with log-probs <= 0 (DPPO reads the token probabilities e^logp)."""
    ins, mask = make_batch(lengths, seed=seed, scale=0.5, device=device, dtype=dtype)
    for k in ("logp", "old_logp", "ref_logp", "rollout_logp"):
        ins[k] = -ins[k].abs() - 0.01
    return ins, mask


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(backend, name):
    config = CONFIGS[name]
    lengths = [T, 9, 5]
    ins, mask = probability_batch(lengths, device=backend)
    mask[1, 3:] = False  # a short row
    want = run(reference.policy_loss, ins, mask, config, use=uses(config))
    assert_same(run(fastpo.policy_loss, ins, mask, config, use=uses(config)), want)


@pytest.mark.parametrize("name", SEQUENCE_LEVEL + ["DPPO_KL", "DRO", "kl-abs+"])
def test_packed_with_empty_sequence_matches_padded(backend, name):
    config = CONFIGS[name]
    ins, mask = probability_batch(LENGTHS, seed=1, device=backend)
    want = packed_view(run(reference.policy_loss, ins, mask, config, use=uses(config)), LENGTHS)
    packed, pmask, cu = to_packed(ins, mask, LENGTHS)
    assert_same(run(fastpo.policy_loss, packed, pmask, config, cu_seqlens=cu, use=uses(config)), want)
    assert_same(run(reference.policy_loss, packed, pmask, config, cu_seqlens=cu, use=uses(config)), want)


@pytest.mark.parametrize("name", ["GMPO", "CISPO", "PPO", "VESPO", "SAPO"])
def test_given_is_weights(backend, name):
    """is_weights multiply the policy term (geo_mean: their geometric mean per sequence, as verl)."""
    config = CONFIGS.get(name, getattr(pc, name))
    ins, mask = probability_batch([T, 9, 5], seed=2, device=backend)
    w = torch.rand(ins["logp"].shape, generator=torch.Generator().manual_seed(3)).to(backend) * 1.5
    w[0, 2] = 0.0  # a rejected token
    got, want = [], []
    for fn, out in ((fastpo.policy_loss, got), (reference.policy_loss, want)):
        x = ins["logp"].clone().requires_grad_()
        res = fn(x, ins["old_logp"], ins["advantages"], mask, is_weights=w, config=config)
        res.loss.backward()
        out += [res.loss.detach(), x.grad, res.metrics]
    assert_same((got[0], got[1], torch.zeros(1), got[2]), (want[0], want[1], torch.zeros(1), want[2]))
    if name != "GMPO":  # ones are no weights at all
        base = reference.policy_loss(ins["logp"], ins["old_logp"], ins["advantages"], mask, config=config).loss
        ones = fastpo.policy_loss(ins["logp"], ins["old_logp"], ins["advantages"], mask,
                                  is_weights=torch.ones_like(w), config=config).loss
        torch.testing.assert_close(ones.cpu(), base.cpu(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", GRADCHECKABLE)
def test_gradcheck_float64_reference(name):
    config = CONFIGS[name]
    ins, mask = probability_batch([6, 4], seed=4, dtype=torch.float64)
    kw = {k: ins[k] for k in uses(config) if k != "entropy"}

    def f(logp, entropy):
        return reference.policy_loss(logp, ins["old_logp"], ins["advantages"], mask, entropy=entropy,
                                     config=config, **kw).loss

    x = ins["logp"][:, :6].clone().requires_grad_()
    e = ins["entropy"][:, :6].clone().requires_grad_()
    kw = {k: v[:, :6] for k, v in kw.items()}
    ins = {k: v[:, :6] for k, v in ins.items()}
    mask = mask[:, :6]
    assert torch.autograd.gradcheck(f, (x, e), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["GMPO", "SAPO", "DRO", "kl-abs", "kl-bias", "delta", "GPG"])
def test_gradcheck_float64_cpu(name, cpu_backend):
    config = CONFIGS[name]
    ins, mask = probability_batch([5, 3], seed=5, dtype=torch.float64)
    ins = {k: v[:, :5] for k, v in ins.items()}
    mask = mask[:, :5]
    kw = {k: ins[k] for k in uses(config) if k != "entropy"}
    f = lambda logp: fastpo.policy_loss(logp, ins["old_logp"], ins["advantages"], mask, config=config,  # noqa: E731
                                        **kw).loss
    assert torch.autograd.gradcheck(f, (ins["logp"].clone().requires_grad_(),), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nonfinite_padding_is_ignored(backend, name):
    config = CONFIGS[name]
    ins, mask = probability_batch([T, 9, 5], seed=6, device=backend)
    clean = run(fastpo.policy_loss, ins, mask, config, use=uses(config))
    dirty = {k: v.clone() for k, v in ins.items()}
    for i, k in enumerate(dirty):
        dirty[k][~mask] = (float("nan"), float("inf"), -float("inf"))[i % 3]
    got = run(fastpo.policy_loss, dirty, mask, config, use=uses(config))
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
    assert_same(got, clean)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_extreme_log_ratios_stay_finite(backend, name):
    """logp − old_logp = +80 on the first and last rows, −80 on the middle one (all log-probs <= 0): every
    peer formula here is finite there after its own clamps (exp of ±20), so fastpo's loss, gradient and
    metrics must be too, and equal the reference."""
    config = CONFIGS[name]
    ins, mask = probability_batch([T, 9, 5], seed=7, device=backend)
    base = -torch.rand(ins["logp"].shape, generator=torch.Generator().manual_seed(8)).to(backend) - 0.01
    sign = torch.tensor([1.0, -1.0, 1.0], device=backend)[:, None]
    up = sign > 0
    ins["logp"] = torch.where(up, base, base - 80.0)
    ins["old_logp"] = torch.where(up, base - 80.0, base)
    ins["rollout_logp"] = ins["old_logp"] + 80.0 * sign
    ins["ref_logp"] = ins["logp"] - 80.0 * sign
    got = run(fastpo.policy_loss, ins, mask, config, use=uses(config))
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()
    assert all(torch.isfinite(v) for v in got[3].values())
    want = run(reference.policy_loss, ins, mask, config, use=uses(config))
    assert_same(got, want, atol=1e-5, rtol=1e-4)


def test_surrogates_by_hand(backend):
    """One token (A = 2, r = e^0.5 = 1.6487, logp = −1, old = −1.5) through each surrogate, loss and ∂/∂logp."""
    A, x, old = 2.0, -1.0, -1.5
    r = math.exp(0.5)
    cases = {
        "cispo": (R(surrogate="cispo", clip_high=0.2), -1.2 * A * x, -1.2 * A),
        "cispo_upper": (R(surrogate="cispo_upper", clip_high=1.0), -r * A * x, -r * A),
        "reinforce": (R(surrogate="reinforce"), -A * x, -A),
        "ratio": (R(surrogate="ratio"), -A * r, -A * r),
        "dro": (R(surrogate="dro", dro_beta=0.4), -(A * x - 0.2 * 0.25), -A + 0.4 * 0.5),
        "sapo": (R(surrogate="sapo", sapo_tau_pos=1.0),
                 -A * 4 / (1 + math.exp(-(r - 1))), -4 * A * (s := 1 / (1 + math.exp(-(r - 1)))) * (1 - s) * r),
        "dppo_tv": (R(surrogate="dppo_tv", clip_high=0.5), -A * r * x, -A * r),  # p − p_old = 0.145 <= 0.5
        "dppo_tv-out": (R(surrogate="dppo_tv", clip_high=0.1), 0.0, 0.0),        # 0.145 > 0.1: dropped
        "delta": (R(delta=1.5, clip_high=1.0), -A * 1.5, 0.0),
    }
    for name, (config, loss, grad) in cases.items():
        ins = {"logp": torch.tensor([[x]], device=backend), "old_logp": torch.tensor([[old]], device=backend),
               "advantages": torch.tensor([[A]], device=backend), "entropy": torch.zeros(1, 1, device=backend)}
        got = run(fastpo.policy_loss, ins, None, dataclasses.replace(config, aggregation="token_mean"), use=())
        assert got[0].item() == pytest.approx(loss, abs=1e-5), name
        assert got[1].item() == pytest.approx(grad, abs=1e-5), name


def test_geo_mean_by_hand(backend):
    """GMPO: one sequence, A = 1, Δ = (0.1, 0.6) with ε = 0.4: Δ̃ = (0.1, 0.4) (the bound binds for the
    second), L = −exp(0.25); ∂L/∂logp = (L/2, 0) since only the first is unclipped."""
    old = torch.tensor([[-1.0, -1.0]], device=backend)
    ins = {"logp": old + torch.tensor([[0.1, 0.6]], device=backend), "old_logp": old,
           "advantages": torch.ones(1, 2, device=backend), "entropy": torch.zeros(1, 2, device=backend)}
    loss, grad, _, metrics = run(fastpo.policy_loss, ins, None, fastpo.GMPO, use=())
    L = -math.exp(0.25)
    assert loss.item() == pytest.approx(L, abs=1e-6)
    torch.testing.assert_close(grad.cpu(), torch.tensor([[L / 2, 0.0]]), atol=1e-6, rtol=1e-5)
    assert metrics["clip_frac_high"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("est,value,grad", [
    # δ = ref − logp = −0.5: abs = 0.5, ∂/∂logp = −sgn δ = 1; kX+: the kX value, ∂k2/∂logp = −δ = 0.5
    ("abs", 0.5, 1.0), ("abs+", 0.5, 0.5), ("k1+", 0.5, 0.5), ("k3+", math.exp(-0.5) - 0.5, 0.5),
])
def test_kl_estimators_by_hand(backend, est, value, grad):
    ins = {"logp": torch.tensor([[-1.0]], device=backend), "old_logp": torch.tensor([[-1.0]], device=backend),
           "advantages": torch.zeros(1, 1, device=backend), "ref_logp": torch.tensor([[-1.5]], device=backend),
           "entropy": torch.zeros(1, 1, device=backend)}
    loss, g, _, metrics = run(fastpo.policy_loss, ins, None, R(kl_coef=1.0, kl_estimator=est, kl_clamp=None),
                              use=("ref_logp",))
    assert loss.item() == pytest.approx(value, abs=1e-6)
    assert g.item() == pytest.approx(grad, abs=1e-6)
    assert metrics["ref_kl"].item() == pytest.approx(value, abs=1e-6)


def test_is_weights_errors():
    ins, mask = probability_batch([4, 3])
    with pytest.raises(ValueError, match="is_weights replaces config.rollout_is"):
        fastpo.policy_loss(ins["logp"], ins["old_logp"], ins["advantages"], mask, rollout_logp=ins["rollout_logp"],
                           is_weights=torch.ones_like(ins["logp"]), config=R(rollout_is="token_truncate"))
    with pytest.raises(ValueError, match="is_weights"):
        fastpo.policy_loss(ins["logp"], ins["old_logp"], ins["advantages"], mask, is_weights=torch.ones(2, 2))
