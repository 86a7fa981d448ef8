"""fastpo.token_logprobs: CPU path and Triton kernels against fastpo.reference."""

import pytest
import torch

import fastpo
from fastpo import reference
from helpers import assert_close, make_labels


def _run(fn, logits, labels, grad_logp, grad_entropy, **kw):
    """Forward and backward of both outputs; returns (logp, entropy, dlogits)."""
    x = logits.detach().clone().requires_grad_()
    logp, entropy = fn(x, labels, return_entropy=True, **kw)
    (logp * grad_logp).sum().add_((entropy * grad_entropy).sum()).backward()
    return logp.detach(), entropy.detach(), x.grad


def _reference(logits, labels, grad_logp, grad_entropy, temperature=1.0):
    """The spec, computed in float64 from the same (rounded) input values."""
    x = logits.detach().double().requires_grad_()
    logp, entropy = reference.token_logprobs(x, labels.cpu(), temperature, -100, True)
    (logp * grad_logp.double()).sum().add_((entropy * grad_entropy.double()).sum()).backward()
    return logp.detach(), entropy.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 3, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(backend, dtype, vocab, temperature):
    g = torch.Generator().manual_seed(vocab)
    logits = (3 * torch.randn(2, 3, vocab, generator=g)).to(dtype)
    labels = make_labels((2, 3), vocab, generator=g)
    grad_logp, grad_entropy = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    want = _reference(logits, labels, grad_logp, grad_entropy, temperature)
    got = _run(fastpo.token_logprobs, logits.to(backend), labels.to(backend), grad_logp.to(backend),
               grad_entropy.to(backend), temperature=temperature)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[2].dtype == dtype
    assert got[0].shape == labels.shape and got[0].device.type == torch.device(backend).type
    assert_close(got[0], want[0], dtype)
    assert_close(got[1], want[1], dtype)
    assert_close(got[2], want[2], dtype, grad=True)


@pytest.mark.parametrize("vocab", [50257, 4099])
def test_large_vocab_not_a_block_multiple(backend, vocab):
    g = torch.Generator().manual_seed(1)
    logits = 4 * torch.randn(3, vocab, generator=g)
    labels = torch.tensor([0, vocab - 1, 12345 % vocab])
    grad_logp, grad_entropy = torch.randn(3, generator=g), torch.randn(3, generator=g)
    want = _reference(logits, labels, grad_logp, grad_entropy)
    got = _run(fastpo.token_logprobs, logits.to(backend), labels.to(backend), grad_logp.to(backend),
               grad_entropy.to(backend))
    for a, b in zip(got, want):
        assert_close(a, b, torch.float32)


def test_float16_inputs(backend):
    g = torch.Generator().manual_seed(2)
    logits = (2 * torch.randn(5, 77, generator=g)).half()
    labels = make_labels((5,), 77, generator=g)
    grad_logp, grad_entropy = torch.randn(5, generator=g), torch.randn(5, generator=g)
    want = _reference(logits, labels, grad_logp, grad_entropy)
    got = _run(fastpo.token_logprobs, logits.to(backend), labels.to(backend), grad_logp.to(backend),
               grad_entropy.to(backend))
    assert_close(got[0], want[0], torch.float16)
    assert_close(got[1], want[1], torch.float16)
    assert_close(got[2], want[2], torch.float16, grad=True)


def test_logp_only_and_entropy_only_gradients(backend):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 33, generator=g, device="cpu").to(backend)
    labels = make_labels((4,), 33, generator=g, device=backend)
    x = logits.clone().requires_grad_()
    fastpo.token_logprobs(x, labels).sum().backward()
    xr = logits.cpu().double().requires_grad_()
    reference.token_logprobs(xr, labels.cpu()).sum().backward()
    assert_close(x.grad, xr.grad, torch.float32, grad=True)

    x.grad = None
    xr.grad = None
    fastpo.token_logprobs(x, labels, return_entropy=True)[1].sum().backward()
    reference.token_logprobs(xr, labels.cpu(), return_entropy=True)[1].sum().backward()
    assert_close(x.grad, xr.grad, torch.float32, grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_gradient_into_logits(backend, dtype):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(6, 8, generator=g).to(dtype).to(backend)
    weight = torch.randn(301, 8, generator=g).to(dtype).to(backend)
    labels = make_labels((6,), 301, generator=g, device=backend)

    def grads(inplace):
        w = weight.clone().requires_grad_()
        logits = hidden @ w.t()  # a non-leaf, as an lm_head output is
        buffer = logits.detach()  # shares the logits' memory
        fastpo.token_logprobs(logits, labels, return_entropy=True, inplace_backward=inplace)[0].sum().backward()
        return w.grad, buffer

    want_grad, untouched = grads(False)
    got_grad, buffer = grads(True)
    torch.testing.assert_close(got_grad, want_grad, atol=0, rtol=0)
    x = (hidden @ weight.t()).requires_grad_()
    fastpo.token_logprobs(x, labels).sum().backward()
    torch.testing.assert_close(buffer, x.grad, atol=0, rtol=0)  # the buffer now holds dL/dlogits
    assert not torch.equal(untouched, buffer)


def test_ignore_index_rows_are_zero_with_zero_gradient(backend):
    logits = torch.randn(3, 4, 10).to(backend).mul_(50)
    labels = torch.full((3, 4), -7, device=backend)
    x = logits.clone().requires_grad_()
    logp, entropy = fastpo.token_logprobs(x, labels, ignore_index=-7, return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    assert torch.count_nonzero(logp) == 0 and torch.count_nonzero(entropy) == 0
    assert torch.count_nonzero(x.grad) == 0


def test_extreme_logits_stay_finite(backend):
    logits = torch.tensor([[1e4, -1e4, 0.0, 5.0], [3.0, 3.0, 3.0, 3.0], [-1e4, -1e4, -1e4, 1e4]]).to(backend)
    labels = torch.tensor([1, 2, 3], device=backend)
    x = logits.clone().requires_grad_()
    logp, entropy = fastpo.token_logprobs(x, labels, return_entropy=True, temperature=0.5)
    (logp.sum() + entropy.sum()).backward()
    want_logp, want_entropy = reference.token_logprobs(logits.cpu().double(), labels.cpu(), 0.5, -100, True)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all() and torch.isfinite(x.grad).all()
    assert_close(logp, want_logp, torch.float32)
    assert_close(entropy, want_entropy, torch.float32)


def test_empty_and_scalar_shapes(backend):
    empty = torch.empty(0, 7, device=backend, requires_grad=True)
    out = fastpo.token_logprobs(empty, torch.empty(0, dtype=torch.long, device=backend))
    out.sum().backward()
    assert out.shape == (0,) and empty.grad.shape == (0, 7)

    row = torch.randn(11, device=backend)
    logp = fastpo.token_logprobs(row, torch.tensor(4, device=backend))
    assert logp.shape == () and torch.allclose(logp.cpu(), torch.log_softmax(row.cpu(), -1)[4])


def test_non_contiguous_logits(backend):
    wide = torch.randn(5, 40).to(backend)
    logits = wide[:, :33]  # strided rows
    labels = make_labels((5,), 33, device=backend)
    want = reference.token_logprobs(logits.cpu().double(), labels.cpu())
    assert_close(fastpo.token_logprobs(logits, labels), want, torch.float32)
    transposed = torch.randn(33, 5).to(backend).t()  # last dim not contiguous
    want = reference.token_logprobs(transposed.cpu().double(), labels.cpu())
    assert_close(fastpo.token_logprobs(transposed, labels), want, torch.float32)


def test_int32_labels(backend):
    logits = torch.randn(4, 9).to(backend)
    labels = torch.tensor([0, 8, -100, 3], dtype=torch.int32, device=backend)
    want = reference.token_logprobs(logits.cpu().double(), labels.cpu().long())
    assert_close(fastpo.token_logprobs(logits, labels), want, torch.float32)


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_gradcheck_float64(monkeypatch, backend_name):
    monkeypatch.setenv("FASTPO_BACKEND", backend_name)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 5, -100, 2])

    def both(x):
        return fastpo.token_logprobs(x, labels, temperature=0.7, return_entropy=True)

    assert torch.autograd.gradcheck(both, (logits,), eps=1e-6, atol=1e-7)
    out = both(logits)
    assert out[0].dtype == torch.float64


def test_reference_backend_dispatch(monkeypatch):
    monkeypatch.setenv("FASTPO_BACKEND", "reference")
    logits = torch.randn(3, 8)
    labels = torch.tensor([1, 2, 3])
    torch.testing.assert_close(fastpo.token_logprobs(logits, labels), reference.token_logprobs(logits, labels))


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_double_backward_raises_not_implemented(backend, inplace_backward):
    """A gradient of the gradient is refused with a clear NotImplementedError (was torch's
    developer-facing "no autograd formula was registered"); create_graph=True alone still gives the
    right first-order gradient, and the in-place backward then leaves the logits alone."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 13, generator=g).to(backend)
    labels = make_labels((5,), 13, generator=g, device=backend)
    x = logits.clone().requires_grad_()
    logp, entropy = fastpo.token_logprobs(x, labels, return_entropy=True, inplace_backward=inplace_backward)
    (grad,) = torch.autograd.grad(logp.sum() + entropy.sum(), x, create_graph=True)
    xr = logits.cpu().double().requires_grad_()
    want_logp, want_entropy = reference.token_logprobs(xr, labels.cpu(), 1.0, -100, True)
    (want,) = torch.autograd.grad(want_logp.sum() + want_entropy.sum(), xr)
    assert_close(grad, want, torch.float32, grad=True)
    assert torch.equal(x.detach(), logits)
    with pytest.raises(NotImplementedError, match="token_logprobs does not support double backward"):
        grad.square().sum().backward()
