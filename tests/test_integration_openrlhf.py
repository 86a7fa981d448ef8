"""fastpo.integrations.openrlhf against OpenRLHF 0.11's own PolicyLoss / ValueLoss (the installed loss.py, loaded
without its package ``__init__`` by tests/openrlhf_loader.py): every mode on random inputs, all outputs and
gradients, a counter proving fastpo computed them, and ``install()``."""

import itertools
import sys
import types

import pytest
import torch

from openrlhf_loader import load_openrlhf_loss

L = load_openrlhf_loss()
if L is None:
    pytest.skip("openrlhf is not installed: pip install --no-deps openrlhf==0.11.2", allow_module_level=True)

from fastpo.integrations import openrlhf as fo  # noqa: E402

if not fo.openrlhf_supported():
    pytest.skip("the installed openrlhf is outside fastpo's tested range", allow_module_level=True)

B, T = 5, 7
IS_MODES = {  # name -> (level, mode, gating, threshold)
    "off": ("off", "mask", "ratio", (0.5, 5.0)),
    "token-mask": ("token", "mask", "ratio", (0.8, 1.25)),
    "seq-mask": ("seq", "mask", "ratio", (0.9, 1.1)),
    "token-clip": ("token", "clip", "ratio", (0.8, 1.25)),
    "token-binary_kl": ("token", "mask", "binary_kl", (0.0, 0.02)),
    "seq-tv": ("seq", "mask", "tv", (0.0, 0.1)),
}
BATCH_INFO = {"none": {}, "global": dict(dp_size=2, batch_num_tokens=41.0, global_batch_size=9)}


def make_inputs(seed, *, seq_constant_adv):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 4, 0, 2, 6])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logp = -torch.rand(B, T, generator=g) * 2 - 0.05
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    rollout = old + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, 1, generator=g).expand(B, T) if seq_constant_adv else torch.randn(B, T, generator=g)
    # OpenRLHF's inputs are action-aligned and already multiplied by the action mask
    return logp * mask, old * mask, adv * mask, mask, rollout * mask


def run(cls, kwargs, inputs, info):
    logp, old, adv, mask, rollout = inputs
    x = logp.clone().requires_grad_()
    out = cls(**kwargs)(x, old, adv, action_mask=mask, rollout_log_probs=rollout, **info)
    out[0].backward()
    return out, x.grad


def assert_same(got, want):
    (out_g, grad_g), (out_w, grad_w) = got, want
    assert len(out_g) == len(out_w) == 5
    for i, (a, b) in enumerate(zip(out_g, out_w)):
        assert (a is None) == (b is None), i
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, equal_nan=True, msg=lambda m: f"output {i}: {m}")
    torch.testing.assert_close(grad_g, grad_w, atol=1e-6, rtol=1e-5, msg=lambda m: f"grad: {m}")


CASES = list(itertools.product(["ppo", "gspo"], [None, 3.0], [True, False], list(IS_MODES), list(BATCH_INFO)))


@pytest.mark.parametrize("loss_type,dual_clip,token_level,is_mode,info", CASES)
def test_policy_loss(loss_type, dual_clip, token_level, is_mode, info):
    level, mode, gating, threshold = IS_MODES[is_mode]
    kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip, token_level_loss=token_level,
                  policy_loss_type=loss_type, is_correction_level=level, is_correction_mode=mode,
                  is_correction_gating=gating, is_correction_threshold=threshold)
    seed = CASES.index((loss_type, dual_clip, token_level, is_mode, info)) % 3
    inputs = make_inputs(seed, seq_constant_adv=loss_type == "gspo")
    fo.STATS.clear()
    got = run(fo.FastpoPolicyLoss, kwargs, inputs, BATCH_INFO[info])
    assert fo.STATS == {"served:PolicyLoss": 1}, fo.STATS
    assert_same(got, run(L.PolicyLoss, kwargs, inputs, BATCH_INFO[info]))


def test_policy_loss_delegates_gspo_with_token_advantages():
    inputs = make_inputs(0, seq_constant_adv=False)
    kwargs = dict(policy_loss_type="gspo")
    fo.STATS.clear()
    got = run(fo.FastpoPolicyLoss, kwargs, inputs, {})
    assert fo.STATS == {"delegated:PolicyLoss": 1}
    assert_same(got, run(L.PolicyLoss, kwargs, inputs, {}))


def test_policy_loss_comparison_can_fail():
    """A fastpo loss built with another clip bound does not pass the comparison."""
    inputs = make_inputs(1, seq_constant_adv=False)
    got = run(fo.FastpoPolicyLoss, dict(clip_eps_high=0.05), inputs, {})
    with pytest.raises(AssertionError):
        assert_same(got, run(L.PolicyLoss, dict(clip_eps_high=0.28), inputs, {}))


@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("info", list(BATCH_INFO))
def test_value_loss(clip, token_level, info):
    g = torch.Generator().manual_seed(3)
    _, _, _, mask, _ = make_inputs(3, seq_constant_adv=False)
    values, old, returns = (torch.randn(B, T, generator=g) * mask for _ in range(3))
    grads, outs = [], []
    fo.STATS.clear()
    for cls in (fo.FastpoValueLoss, L.ValueLoss):
        v = values.clone().requires_grad_()
        loss = cls(clip, token_level_loss=token_level)(v, old, returns, action_mask=mask, **BATCH_INFO[info])
        loss.backward()
        outs.append(loss.detach())
        grads.append(v.grad)
    assert fo.STATS == {"served:ValueLoss": 1}
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_install_patches_the_trainer_modules(monkeypatch):
    """install() replaces the names the PPO actor / critic modules imported, and openrlhf.models' for later
    imports (the real modules need deepspeed and ray; stand-ins with the same names are patched here)."""
    models = sys.modules["openrlhf.models"]
    monkeypatch.setattr(models, "PolicyLoss", L.PolicyLoss, raising=False)
    monkeypatch.setattr(models, "ValueLoss", L.ValueLoss, raising=False)
    actor = types.ModuleType("openrlhf.trainer.ray.ppo_actor")
    critic = types.ModuleType("openrlhf.trainer.ray.ppo_critic")
    actor.PolicyLoss, critic.ValueLoss = L.PolicyLoss, L.ValueLoss
    monkeypatch.setitem(sys.modules, actor.__name__, actor)
    monkeypatch.setitem(sys.modules, critic.__name__, critic)
    assert fo.install(actor_forward=False)  # the Actor.forward swap: tests/test_integration_openrlhf_actor.py
    assert actor.PolicyLoss is fo.FastpoPolicyLoss and critic.ValueLoss is fo.FastpoValueLoss
    assert models.PolicyLoss is fo.FastpoPolicyLoss and models.ValueLoss is fo.FastpoValueLoss


def test_version_gate(monkeypatch):
    assert fo.openrlhf_supported("0.11.2") and not fo.openrlhf_supported("0.10.4")
    assert not fo.openrlhf_supported("0.12.0")
    monkeypatch.setattr(fo, "_installed_version", lambda: "0.12.0")
    with pytest.warns(UserWarning, match="tested with openrlhf"):
        assert not fo.install()
    fo.STATS.clear()
    inputs = make_inputs(0, seq_constant_adv=False)
    run(fo.FastpoPolicyLoss, {}, inputs, {})
    assert fo.STATS == {"delegated:PolicyLoss": 1}
