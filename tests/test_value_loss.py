"""value_loss: reference vs CPU path vs Triton (interpreter), hand-checked clipping, layouts, gradcheck,
opcheck and errors."""

import pytest
import torch

import fastpo
from fastpo import reference
from fastpo.ops.loss_spec import value_spec

T = 11
LENGTHS = [T, 0, 6, 3]
AGGREGATIONS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"]


def make_batch(lengths=LENGTHS, *, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shape = (len(lengths), T)
    values = torch.randn(shape, generator=g, dtype=dtype)
    old = values + 0.3 * torch.randn(shape, generator=g, dtype=dtype)
    returns = torch.randn(shape, generator=g, dtype=dtype)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]) & (torch.rand(shape, generator=g) > 0.2)
    return values.to(device), old.to(device), returns.to(device), mask.to(device)


def run(fn, values, old, returns, mask, **kw):
    v = values.clone().requires_grad_()
    out = fn(v, old, returns, mask, **kw)
    out.loss.backward()
    return out.loss.detach(), v.grad, out.metrics["vf_clip_frac"]


def pack(t, lengths=LENGTHS):
    return torch.cat([t[i, :n] for i, n in enumerate(lengths)])


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("clip", [0.1, None])
def test_matches_reference_padded_and_packed(backend, aggregation, clip):
    values, old, returns, mask = make_batch(device=backend)
    want = run(reference.value_loss, values, old, returns, mask, clip=clip, aggregation=aggregation)
    got = run(fastpo.value_loss, values, old, returns, mask, clip=clip, aggregation=aggregation)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    cu = torch.tensor([0] + LENGTHS, device=backend).cumsum(0)
    got = run(fastpo.value_loss, pack(values), pack(old), pack(returns), pack(mask), cu_seqlens=cu, clip=clip,
              aggregation=aggregation)
    for a, b in zip(got, (want[0], pack(want[1]), want[2])):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_clipping_by_hand(backend):
    """clip 0.2, v_old = 0: v=1, R=0 → clipped (0.2−0)² < 1, unclipped wins: 0.5, grad 1;
    v=1, R=2 → (0.2−2)² = 3.24 > 1: clipped wins, 1.62, grad 0; v=0.1, R=1: inside the range, 0.405, grad −0.9."""
    values = torch.tensor([[1.0, 1.0, 0.1]], device=backend)
    returns = torch.tensor([[0.0, 2.0, 1.0]], device=backend)
    loss, grad, frac = run(fastpo.value_loss, values, torch.zeros_like(values), returns, None)
    assert loss.item() == pytest.approx((0.5 + 1.62 + 0.405) / 3, rel=1e-6)
    torch.testing.assert_close(grad.cpu(), torch.tensor([[1.0, 0.0, -0.9]]) / 3)
    assert frac.item() == pytest.approx(1 / 3)


def test_fully_masked_and_empty(backend):
    values, old, returns, mask = make_batch(device=backend)
    for agg in AGGREGATIONS:
        loss, grad, frac = run(fastpo.value_loss, values, old, returns, torch.zeros_like(mask), aggregation=agg)
        assert loss.item() == 0.0 and not grad.any() and frac.item() == 0.0
    e = values.reshape(-1)[:0]
    loss, grad, _ = run(fastpo.value_loss, e, e, e, None, cu_seqlens=torch.zeros(3, dtype=torch.int64, device=backend))
    assert loss.item() == 0.0 and grad.shape == (0,)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gradcheck_float64(aggregation, monkeypatch):
    values, old, returns, mask = make_batch(seed=2, dtype=torch.float64)
    for path in ("reference", "cpu"):
        monkeypatch.setenv("FASTPO_BACKEND", path)
        f = lambda v: fastpo.value_loss(v, old, returns, mask, clip=0.1, aggregation=aggregation).loss  # noqa: E731
        assert torch.autograd.gradcheck(f, (values.clone().requires_grad_(),)), path


def test_custom_op_registration():
    values, old, returns, mask = make_batch(seed=3)
    spec = value_spec(None, "seq_mean_token_mean", 0)
    cu = torch.arange(0, (len(LENGTHS) + 1) * T, T)
    torch.library.opcheck(torch.ops.fastpo.value_loss_fwd.default,
                          (values.reshape(-1).clone().requires_grad_(), old.reshape(-1), returns.reshape(-1),
                           mask.reshape(-1), cu, torch.tensor(0.2, dtype=torch.float64), spec.floats(), spec.ints(), False,
                           "cpu"))


@pytest.mark.parametrize("case", [
    ("values-int", dict(values=torch.ones(2, 3, dtype=torch.long)), TypeError, "values"),
    ("old-shape", dict(old_values=torch.ones(2, 2)), ValueError, "old_values"),
    ("returns-shape", dict(returns=torch.ones(3, 3)), ValueError, "returns"),
    ("returns-dtype", dict(returns=torch.ones(2, 3, dtype=torch.long)), TypeError, "returns"),
    ("clip-negative", dict(clip=-0.1), ValueError, "clip"),
    ("clip-type", dict(clip="0.2"), TypeError, "clip"),
    ("clip-nan", dict(clip=float("nan")), ValueError, "clip"),
    ("aggregation", dict(aggregation="mean"), ValueError, "aggregation"),
    ("aggregation-type", dict(aggregation=1), TypeError, "aggregation"),
    ("mask-shape", dict(mask=torch.ones(3, 2)), ValueError, "mask"),
], ids=lambda c: c[0])
@pytest.mark.parametrize("path", ["cpu", "reference"])
def test_errors(case, path, monkeypatch):
    monkeypatch.setenv("FASTPO_BACKEND", path)
    _, over, exc, word = case
    kw = dict(values=torch.randn(2, 3), old_values=torch.randn(2, 3), returns=torch.randn(2, 3), mask=None)
    kw.update(over)
    given = dict(kw)
    snapshot = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc, match=word):
        fastpo.value_loss(kw.pop("values"), kw.pop("old_values"), kw.pop("returns"), kw.pop("mask"), **kw)
    for k, v in snapshot.items():
        assert torch.equal(given[k], v)
