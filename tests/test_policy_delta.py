"""TRL's two-sided clip ``delta`` below 1 + ε_high: the clipped branch can be the max inside [lo, hi],
where it carries the ratio's gradient (the fused kernels used to zero it there)."""

import dataclasses

import pytest
import torch

import fastpo
from fastpo import reference

CFG = fastpo.PolicyLossConfig(clip_low=0.2, clip_high=0.28, delta=1.1, aggregation="token_sum")


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    B, T = 3, 40
    log_r = torch.empty(B, T).uniform_(-0.4, 0.4, generator=g)        # r in [0.67, 1.49]: every region
    logp = (-torch.rand(B, T, generator=g) * 2).to(device)
    adv = torch.randn(B, T, generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) > 0.2).to(device)
    return logp, logp - log_r.to(device), adv, mask


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_gradient_matches_reference_with_delta_below_the_upper_bound(backend, level, dual_clip):
    cfg = dataclasses.replace(CFG, ratio_level=level, dual_clip=dual_clip)
    logp, old, adv, mask = _inputs(backend)
    got_x = logp.clone().requires_grad_()
    got = fastpo.policy_loss(got_x, old, adv, mask, config=cfg)
    got.loss.backward()
    want_x = logp.cpu().clone().requires_grad_()
    want = reference.policy_loss(want_x, old.cpu(), adv.cpu(), mask.cpu(), config=cfg)
    want.loss.backward()
    torch.testing.assert_close(got.loss.cpu(), want.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_x.grad.cpu(), want_x.grad, atol=1e-5, rtol=1e-5)
    for name, value in want.metrics.items():
        torch.testing.assert_close(got.metrics[name].cpu(), value, atol=1e-5, rtol=1e-5)


def test_the_case_that_was_zeroed(backend):
    """A = −1, r = 1.2, δ = 1.1: max(1.1, 1.2) is the clipped branch, inside [0.8, 1.28]: ∂/∂logp = r."""
    logp = torch.zeros(1, 1, device=backend, requires_grad=True)
    old = torch.full((1, 1), -0.2, device=backend)
    adv = -torch.ones(1, 1, device=backend)
    fastpo.policy_loss(logp, old, adv, config=CFG).loss.backward()
    torch.testing.assert_close(logp.grad.cpu(), torch.exp(torch.tensor([[0.2]])))
