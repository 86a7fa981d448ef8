"""fastpo.sequence_logprobs: CPU path and Triton segment kernels against fastpo.reference, both layouts."""

import pytest
import torch

import fastpo
from fastpo import reference
from helpers import assert_close
from helpers import assert_raises_unmodified

# Packed sequence lengths: empty sequences, and one longer than the kernel's chunk (the mean length).
LENGTHS = [1, 40, 0, 3, 0, 7]


def _padded_case(dtype, generator, b=3, t=37):
    x = (-3 * torch.rand(b, t, generator=generator)).to(dtype)
    mask = torch.rand(b, t, generator=generator) < 0.7
    mask[1] = False  # a fully masked row
    return x, mask


def _packed_case(dtype, generator, lengths=LENGTHS):
    n = sum(lengths)
    x = (-3 * torch.rand(n, generator=generator)).to(dtype)
    mask = torch.rand(n, generator=generator) < 0.7
    cu = torch.tensor([0] + lengths).cumsum(0)
    return x, mask, cu


def _run(x, mask, cu, average, upstream, device):
    leaf = x.detach().to(device).requires_grad_()
    out = fastpo.sequence_logprobs(leaf, None if mask is None else mask.to(device),
                                   cu_seqlens=None if cu is None else cu.to(device), average=average)
    (out * upstream.to(device)).sum().backward()
    return out.detach(), leaf.grad


def _reference(x, mask, cu, average, upstream):
    """The spec in float64 from the same (rounded) input values."""
    leaf = x.detach().double().requires_grad_()
    out = reference.sequence_logprobs(leaf, mask, cu, average)
    (out * upstream.double()).sum().backward()
    return out.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("with_mask", [True, False])
def test_matches_reference(backend, dtype, average, layout, with_mask):
    g = torch.Generator().manual_seed(3)
    if layout == "padded":
        (x, mask), cu = _padded_case(dtype, g), None
    else:
        x, mask, cu = _packed_case(dtype, g)
    mask = mask if with_mask else None
    num_seqs = x.shape[0] if cu is None else cu.numel() - 1
    upstream = torch.randn(num_seqs, generator=g)
    got = _run(x, mask, cu, average, upstream, backend)
    want = _reference(x, mask, cu, average, upstream)
    assert got[0].dtype == torch.float32 and got[0].shape == (num_seqs,)
    assert got[1].dtype == dtype and got[1].shape == x.shape
    assert_close(got[0], want[0], dtype)
    assert_close(got[1], want[1], dtype, grad=True)


def test_padded_equals_packed(backend):
    """The same sequences, padded to [B, T] with a mask or packed back to back, give the same result."""
    g = torch.Generator().manual_seed(4)
    lengths, t = [5, 0, 12, 1], 12
    padded = -4 * torch.rand(len(lengths), t, generator=g)
    valid = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    packed = padded[valid]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)  # any integer dtype
    upstream = torch.randn(len(lengths), generator=g)
    for average in (False, True):
        out_p, grad_p = _run(padded, valid, None, average, upstream, backend)
        out_k, grad_k = _run(packed, None, cu, average, upstream, backend)
        torch.testing.assert_close(out_p, out_k)
        torch.testing.assert_close(grad_p[valid.to(backend)], grad_k)
        assert not grad_p[~valid.to(backend)].any()


@pytest.mark.parametrize("average", [False, True])
def test_empty_sequences_and_batches(backend, average):
    g = torch.Generator().manual_seed(5)
    cases = [
        (torch.randn(3, 4, generator=g), torch.zeros(3, 4, dtype=torch.bool), None),  # every row masked
        (torch.randn(3, 0, generator=g), None, None),  # T = 0
        (torch.randn(0, 5, generator=g), None, None),  # B = 0
        (torch.randn(0, generator=g), None, torch.tensor([0, 0, 0])),  # N = 0, two empty sequences
        (torch.randn(4, generator=g), None, torch.tensor([0, 0, 4, 4])),  # empty first and last
        (torch.randn(0, generator=g), None, torch.tensor([0])),  # B = 0 packed
    ]
    for x, mask, cu in cases:
        num_seqs = x.shape[0] if cu is None else cu.numel() - 1
        out, grad = _run(x, mask, cu, average, torch.ones(num_seqs), backend)
        want, want_grad = _reference(x, mask, cu, average, torch.ones(num_seqs))
        assert out.shape == (num_seqs,) and torch.isfinite(out).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(out.double().cpu(), want)
        torch.testing.assert_close(grad.double().cpu(), want_grad)


def test_masked_values_are_ignored(backend):
    """inf / NaN under the mask (e.g. garbage in padding) never reaches the result or the gradient."""
    x = torch.tensor([[-1.0, float("nan"), -2.0], [float("-inf"), -0.5, float("inf")]])
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    out, grad = _run(x, mask, None, True, torch.ones(2), backend)
    torch.testing.assert_close(out, torch.tensor([-1.5, -0.5], device=out.device))
    torch.testing.assert_close(grad.cpu(), torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]]))


def test_mask_dtypes_agree(backend):
    g = torch.Generator().manual_seed(6)
    x, mask = _padded_case(torch.float32, g)
    want = fastpo.sequence_logprobs(x.to(backend), mask.to(backend), average=True)
    for m in (mask.to(torch.int32), mask.to(torch.float32) * 3.0, mask.to(torch.uint8)):
        torch.testing.assert_close(fastpo.sequence_logprobs(x.to(backend), m.to(backend), average=True), want)


def test_strided_inputs(backend):
    """Non-contiguous views (a shifted slice, a transpose, a strided packed view, strided masks) are read in place."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(5, 19, generator=g)
    for x in (base[:, 1:], base.t()[:, :4], base[::2, ::3]):
        mask = (torch.rand(x.shape[::-1], generator=g) < 0.6).t()  # a strided mask too
        upstream = torch.randn(x.shape[0], generator=g)
        got = _run(x, mask, None, True, upstream, backend)
        want = _reference(x, mask, None, True, upstream)
        assert_close(got[0], want[0], torch.float32)
        assert_close(got[1], want[1], torch.float32, grad=True)
    flat = base.reshape(-1)[::3]
    cu = torch.tensor([0, 10, 10, flat.numel()])
    got = _run(flat, None, cu, False, torch.ones(3), backend)
    want = _reference(flat, None, cu, False, torch.ones(3))
    assert_close(got[0], want[0], torch.float32)


def test_linear_token_logprobs_feed(backend):
    """ignore_index tokens are 0 in linear_token_logprobs: a sum needs no mask, a mean takes labels != -100."""
    g = torch.Generator().manual_seed(8)
    hidden, weight = torch.randn(2, 6, 8, generator=g), torch.randn(11, 8, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :2] = -100
    logp = fastpo.linear_token_logprobs(hidden.to(backend), weight.to(backend), labels.to(backend))
    full = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    keep = labels != -100
    want_sum = (full * keep).sum(-1)
    torch.testing.assert_close(fastpo.sequence_logprobs(logp).double().cpu(), want_sum, atol=1e-4, rtol=1e-5)
    got_mean = fastpo.sequence_logprobs(logp, keep.to(backend), average=True).double().cpu()
    torch.testing.assert_close(got_mean, want_sum / keep.sum(-1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gradcheck_float64(monkeypatch, backend_name, layout):
    monkeypatch.setenv("FASTPO_BACKEND", backend_name)
    g = torch.Generator().manual_seed(9)
    if layout == "padded":
        (x, mask), cu = _padded_case(torch.float64, g, b=3, t=5), None
    else:
        x, mask, cu = _packed_case(torch.float64, g, lengths=[2, 0, 5, 1])
    for average in (False, True):
        torch.autograd.gradcheck(
            lambda v: fastpo.sequence_logprobs(v, mask, cu_seqlens=cu, average=average),
            (x.clone().requires_grad_(),))


def test_float64_stays_float64(backend):
    x = torch.randn(2, 3, dtype=torch.float64)
    out, grad = _run(x, None, None, True, torch.ones(2), backend)
    assert out.dtype == torch.float64 and grad.dtype == torch.float64
    torch.testing.assert_close(out.cpu(), x.mean(-1))


ERROR_CASES = [
    # (description, kwargs override, exception, message fragment)
    ("integer token_logp", dict(token_logp=torch.zeros(2, 3, dtype=torch.long)), TypeError, "token_logp"),
    ("token_logp not a tensor", dict(token_logp=[[0.0]]), TypeError, "token_logp"),
    ("3-D padded", dict(token_logp=torch.zeros(2, 3, 1), mask=None), ValueError, "(2, 3, 1)"),
    ("mask shape", dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "(2, 4)"),
    ("mask not a tensor", dict(mask=[[1, 1, 1]]), TypeError, "mask"),
    ("2-D packed", dict(cu_seqlens=torch.tensor([0, 6])), ValueError, "cu_seqlens"),
    ("float cu_seqlens", dict(token_logp=torch.zeros(6), mask=None, cu_seqlens=torch.tensor([0.0, 6.0])),
     TypeError, "cu_seqlens"),
    ("cu_seqlens short of N", dict(token_logp=torch.zeros(6), mask=None, cu_seqlens=torch.tensor([0, 2, 5])),
     ValueError, "N=6"),
    ("cu_seqlens decreasing", dict(token_logp=torch.zeros(6), mask=None, cu_seqlens=torch.tensor([0, 4, 3, 6])),
     ValueError, "non-decreasing"),
    ("cu_seqlens not from 0", dict(token_logp=torch.zeros(6), mask=None, cu_seqlens=torch.tensor([1, 6])),
     ValueError, "cu_seqlens"),
    ("non-bool average", dict(average=1), TypeError, "average"),
]


@pytest.mark.parametrize("name,override,exc,fragment", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
@pytest.mark.parametrize("backend_name", ["cpu", "triton", "reference"])
def test_errors(monkeypatch, backend_name, name, override, exc, fragment):
    monkeypatch.setenv("FASTPO_BACKEND", backend_name)
    inputs = dict(token_logp=-torch.rand(2, 3), mask=torch.tensor([[1, 0, 1], [1, 1, 0]]), cu_seqlens=None,
                  average=True)
    inputs.update(override)
    assert_raises_unmodified(fastpo.sequence_logprobs, inputs, exc, fragment=fragment)


def _opcheck_cases():
    g = torch.Generator().manual_seed(10)
    x, mask = _padded_case(torch.float32, g, b=3, t=6)
    flat, flat_mask, cu = _packed_case(torch.float32, g, lengths=[2, 0, 5])
    count = mask.sum(-1).float()
    ops = torch.ops.fastpo
    return [
        ("fwd_padded_mask", ops.sequence_logprobs_fwd.default, (x.clone().requires_grad_(), mask, None, True, "cpu")),
        ("fwd_padded", ops.sequence_logprobs_fwd.default, (x.clone().requires_grad_(), None, None, False, "cpu")),
        ("fwd_packed_mask", ops.sequence_logprobs_fwd.default,
         (flat.clone().requires_grad_(), flat_mask, cu, True, "cpu")),
        ("bwd_padded", ops.sequence_logprobs_bwd.default,
         (torch.randn(3, generator=g), count, mask, None, [3, 6], torch.bfloat16, True, "cpu")),
        ("bwd_packed", ops.sequence_logprobs_bwd.default,
         (torch.randn(3, generator=g), torch.tensor([2.0, 0.0, 5.0]), None, cu, [7], torch.float32, False, "cpu")),
    ]


@pytest.mark.parametrize("case", _opcheck_cases(), ids=lambda c: c[0])
def test_custom_op_registration(case):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of both ops."""
    _, op, args = case
    torch.library.opcheck(op, args)
