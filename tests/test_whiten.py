"""fastpo.whiten: verl's masked_whiten (Bessel variance), degenerate counts, shift_mean, gradients."""

import pytest
import torch

import fastpo
from helpers import assert_raises_unmodified


def test_matches_masked_whiten_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, generator=g) * 3 + 1
    mask = torch.rand(3, 7, generator=g) > 0.4
    mean = x[mask].mean()
    var = x[mask].var()  # unbiased, as verl's masked_var
    want = (x - mean) * torch.rsqrt(var + 1e-8)
    torch.testing.assert_close(fastpo.whiten(x, mask), want)
    torch.testing.assert_close(fastpo.whiten(x, mask, shift_mean=False), want + mean)
    torch.testing.assert_close(fastpo.whiten(x), (x - x.mean()) * torch.rsqrt(x.var() + 1e-8))
    torch.testing.assert_close(fastpo.reference.whiten(x, mask), want)


@pytest.mark.parametrize("counted", [0, 1])
def test_fewer_than_two_counted(counted):
    x = torch.tensor([[1.0, 4.0, -2.0]])
    mask = torch.zeros(1, 3, dtype=torch.bool)
    mask[0, :counted] = True
    mean = x[mask].sum() / max(counted, 1)
    for fn in (fastpo.whiten, fastpo.reference.whiten):
        out = fn(x, mask)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, x - mean)
        torch.testing.assert_close(fn(x, mask, shift_mean=False), x)
    torch.testing.assert_close(fastpo.whiten(torch.tensor([5.0])), torch.tensor([0.0]))


def test_dtypes_and_gradient():
    x = torch.randn(10, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(10) % 3 != 0
    assert fastpo.whiten(x, mask).dtype == torch.float64
    assert fastpo.whiten(x.detach().bfloat16()).dtype == torch.float32
    torch.autograd.gradcheck(lambda t: fastpo.whiten(t, mask, eps=1e-6), (x,))
    torch.autograd.gradcheck(lambda t: fastpo.reference.whiten(t, mask, eps=1e-6), (x,))


ERROR_CASES = [
    ("integer x", dict(x=torch.ones(3, dtype=torch.long)), TypeError, "x"),
    ("mask shape", dict(mask=torch.ones(2)), ValueError, "mask"),
    ("mask not a tensor", dict(mask=[1, 1, 1]), TypeError, "mask"),
    ("negative eps", dict(eps=-1e-8), ValueError, "eps"),
    ("string eps", dict(eps="1e-8"), TypeError, "eps"),
    ("non-bool shift_mean", dict(shift_mean=0), TypeError, "shift_mean"),
]


@pytest.mark.parametrize("name,override,exc,fragment", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors(name, override, exc, fragment):
    kwargs = dict(x=torch.randn(3), mask=torch.ones(3))
    kwargs.update(override)
    assert_raises_unmodified(fastpo.whiten, kwargs, exc, match=fragment)


def test_flat_input_with_zero_eps_is_centred_not_nan():
    x = torch.tensor([2.0, 2.0, 2.0, 7.0])
    mask = torch.tensor([1, 1, 1, 0])
    for fn in (fastpo.whiten, fastpo.reference.whiten):
        torch.testing.assert_close(fn(x, mask, eps=0.0), torch.tensor([0.0, 0.0, 0.0, 5.0]))
