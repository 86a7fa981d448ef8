"""The C++ softcap (z = c·tanh(x/c)) keeps float32 accuracy where the logits are far below the cap:
tanh there is a polynomial, not 1 − 2/(e^{2u} + 1), whose cancellation lost ~1e-3 relative at u = 1e-4."""

import pytest
import torch

import fastpo
from fastpo import reference

ALL = ("logp", "entropy", "log_sum_sq_probs", "is_top1", "mean_logits")


@pytest.mark.parametrize("cap", [1e4, 50.0, 2.0])
def test_softcap_matches_float64_tanh(cpu_backend, cap):
    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(6, 257, generator=g), 40 * torch.randn(6, 257, generator=g)])
    labels = torch.randint(0, 257, (12,), generator=g)
    x = logits.clone().requires_grad_()
    got = fastpo.token_logprobs(x, labels, outputs=ALL, logit_softcap=cap, temperature=0.7)
    (got.logp.sum() + got.entropy.sum()).backward()
    xr = logits.double().requires_grad_()
    want = reference.token_logprobs(xr, labels, 0.7, -100, False, ALL, cap, 1.0)
    (want.logp.sum() + want.entropy.sum()).backward()
    for name in ("logp", "entropy", "log_sum_sq_probs", "mean_logits"):
        torch.testing.assert_close(getattr(got, name).double(), getattr(want, name), atol=2e-5, rtol=2e-5,
                                   msg=name)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=2e-6, rtol=1e-4)


def test_huge_cap_is_the_identity_to_float_rounding(cpu_backend):
    """c = 1e4 over logits of size ~1: c·tanh(x/c) = x (1 − x²/(3c²)), within 1e-8 of x."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 100, generator=g)
    labels = torch.randint(0, 100, (8,), generator=g)
    capped = fastpo.token_logprobs(logits, labels, outputs=("logp", "mean_logits"), logit_softcap=1e4)
    plain = fastpo.token_logprobs(logits, labels, outputs=("logp", "mean_logits"))
    torch.testing.assert_close(capped.logp, plain.logp, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(capped.mean_logits, plain.mean_logits, atol=1e-6, rtol=1e-5)


def test_softcap_non_finite_logits(cpu_backend):
    """±inf logits are capped to ±c (finite), so the row stays finite; NaN poisons its row only."""
    logits = torch.tensor([[float("inf"), 0.0, -float("inf"), 1.0], [float("nan"), 0.0, 1.0, 2.0]])
    labels = torch.tensor([0, 1])
    logp, entropy = fastpo.token_logprobs(logits, labels, logit_softcap=3.0, return_entropy=True)
    want = torch.log_softmax(3.0 * torch.tanh(logits[0].double() / 3.0), -1)[0]
    torch.testing.assert_close(logp[0].double(), want, atol=1e-6, rtol=1e-6)
    assert torch.isfinite(entropy[0]) and torch.isnan(logp[1])
