"""fastpo.linear_token_logprobs: chunked hidden → log-probs against the reference, and its memory."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastpo
from fastpo import reference
from fastpo.ops.linear_token_logprobs import default_chunk_size
from helpers import make_labels


def _inputs(n_tokens, dim, vocab, dtype, *, bias, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = lead if lead is not None else (n_tokens,)
    hidden = torch.randn(*shape, dim, generator=g).to(dtype)
    weight = (torch.randn(vocab, dim, generator=g) / dim**0.5).to(dtype)
    b = (0.1 * torch.randn(vocab, generator=g)).to(dtype) if bias else None
    labels = make_labels(shape, vocab, generator=g)
    return hidden, weight, b, labels


def _grads(fn, hidden, weight, bias, labels, grad_logp, grad_entropy, **kw):
    params = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    logp, entropy = fn(params[0], params[1], labels, bias=params[2], return_entropy=True, **kw)
    ((logp * grad_logp).sum() + (entropy * grad_entropy).sum()).backward()
    return [logp.detach(), entropy.detach()] + [p.grad if p is not None else None for p in params]


def _reference_grads(hidden, weight, bias, labels, grad_logp, grad_entropy, temperature):
    def ref(h, w, y, *, bias, return_entropy, temperature):
        return reference.linear_token_logprobs(h, w, y, bias, temperature, -100, return_entropy)
    as64 = [t.double() if t is not None else None for t in (hidden, weight, bias)]
    return _grads(ref, *as64, labels, grad_logp.double(), grad_entropy.double(), temperature=temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_matches_reference(backend, dtype, bias, chunk_size):
    hidden, weight, b, labels = _inputs(0, 24, 203, dtype, bias=bias, lead=(3, 13))
    g = torch.Generator().manual_seed(9)
    grad_logp, grad_entropy = torch.randn(3, 13, generator=g), torch.randn(3, 13, generator=g)
    temperature = 0.8
    want = _reference_grads(hidden, weight, b, labels, grad_logp, grad_entropy, temperature)
    dev = backend
    got = _grads(fastpo.linear_token_logprobs, hidden.to(dev), weight.to(dev), b.to(dev) if bias else None,
                 labels.to(dev), grad_logp.to(dev), grad_entropy.to(dev), temperature=temperature,
                 chunk_size=chunk_size)
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype and got[3].dtype == dtype
    # bf16 inputs: the chunk logits themselves are rounded to bf16 by the matmul, as in eager bf16.
    tol = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (6e-2, 5e-2)}[dtype]
    for name, a, w in zip(["logp", "entropy", "hidden", "weight", "bias"], got, want):
        if w is None:
            assert a is None
            continue
        torch.testing.assert_close(a.cpu().double(), w, atol=tol[0], rtol=tol[1], msg=lambda m: f"{name}: {m}")


def test_matches_token_logprobs_on_full_logits(backend):
    hidden, weight, _, labels = _inputs(37, 16, 1000, torch.float32, bias=False, seed=3)
    hidden, weight, labels = hidden.to(backend), weight.to(backend), labels.to(backend)
    full = fastpo.token_logprobs(hidden @ weight.t(), labels, return_entropy=True)
    chunked = fastpo.linear_token_logprobs(hidden, weight, labels, return_entropy=True, chunk_size=5)
    for a, b in zip(chunked, full):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_gradcheck_float64(monkeypatch, backend_name):
    monkeypatch.setenv("FASTPO_BACKEND", backend_name)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 6, -100, 3, 1])

    def both(h, w, b):
        return fastpo.linear_token_logprobs(h, w, labels, bias=b, temperature=1.3, return_entropy=True, chunk_size=2)

    assert torch.autograd.gradcheck(both, (hidden, weight, bias), eps=1e-6, atol=1e-7)


def test_frozen_lm_head_skips_the_weight_gradient(backend):
    hidden, weight, bias, labels = _inputs(0, 12, 90, torch.float32, bias=True, seed=4, lead=(2, 7))
    hidden, weight, bias, labels = (t.to(backend) for t in (hidden, weight, bias, labels))
    h_all, w_all, b_all = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    fastpo.linear_token_logprobs(h_all, w_all, labels, bias=b_all, chunk_size=5).sum().backward()

    h = hidden.clone().requires_grad_()
    fastpo.linear_token_logprobs(h, weight, labels, bias=bias, chunk_size=5).sum().backward()
    torch.testing.assert_close(h.grad, h_all.grad)

    w = weight.clone().requires_grad_()
    fastpo.linear_token_logprobs(hidden, w, labels, bias=bias, chunk_size=5).sum().backward()
    torch.testing.assert_close(w.grad, w_all.grad)


def test_frozen_lm_head_allocates_no_weight_gradient(cpu_backend):
    n_tokens, dim, vocab = 64, 256, 300
    hidden, weight, _, labels = _inputs(n_tokens, dim, vocab, torch.float32, bias=False)
    logp = fastpo.linear_token_logprobs(hidden.requires_grad_(), weight, labels, chunk_size=8)
    with _LargestAllocation() as seen:
        logp.sum().backward()
    assert seen.largest < vocab * dim  # chunk logits and grad_hidden only


def test_default_chunk_size():
    assert default_chunk_size(8192, 32768) == 128
    assert default_chunk_size(16384, 152064) == 256
    assert default_chunk_size(10, 1000) == 10
    assert default_chunk_size(1024, 32000) == 128
    assert default_chunk_size(1_000_000, 152064) * 152064 <= (1 << 27) + 16 * 152064
    assert default_chunk_size(0, 5) == 1


class _LargestAllocation(TorchDispatchMode):
    """Records the largest new tensor (in elements) any aten op produces while active; views and
    in-place results, whose memory belongs to an input, do not count."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        owned = {t.untyped_storage().data_ptr() for t in inputs}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in owned:
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_full_logits(cpu_backend):
    n_tokens, dim, vocab, chunk = 512, 16, 3000, 32
    hidden, weight, _, labels = _inputs(n_tokens, dim, vocab, torch.float32, bias=False)
    hidden.requires_grad_()
    weight.requires_grad_()
    with _LargestAllocation() as seen:
        logp, entropy = fastpo.linear_token_logprobs(hidden, weight, labels, return_entropy=True, chunk_size=chunk)
        (logp.sum() + entropy.sum()).backward()
    # Largest tensors: one chunk of logits, or the weight gradient; never N x V.
    assert seen.largest <= max(chunk * vocab, vocab * dim)
    assert seen.largest < n_tokens * vocab // 8


def test_token_logprobs_inplace_backward_allocates_no_vocab_sized_gradient(cpu_backend):
    hidden = torch.randn(64, 8, requires_grad=True)
    weight = torch.randn(500, 8, requires_grad=True)
    labels = make_labels((64,), 500)
    logp, entropy = fastpo.token_logprobs(hidden @ weight.t(), labels, inplace_backward=True, return_entropy=True)
    with _LargestAllocation() as seen:
        (logp.sum() + entropy.sum()).backward()
    assert seen.largest <= 500 * 8  # the weight gradient; no [64, 500] buffer


def test_token_logprobs_forward_allocates_only_per_row_outputs(cpu_backend):
    logits = torch.randn(64, 500)
    with _LargestAllocation() as seen:
        fastpo.token_logprobs(logits, make_labels((64,), 500), return_entropy=True)
    assert seen.largest <= 64


@pytest.mark.parametrize("bias", [False, True])
def test_zero_hidden_size(backend, bias):
    """D = 0: the logits are the bias (or 0), so logp = log_softmax(bias)[y] (−log V without one);
    was a reshape RuntimeError."""
    vocab = 11
    hidden = torch.randn(4, 0, device=backend, requires_grad=True)
    weight = torch.randn(vocab, 0, device=backend, requires_grad=True)
    b = torch.randn(vocab, device=backend, requires_grad=True) if bias else None
    labels = torch.tensor([0, 3, -100, 10], device=backend)
    logp, entropy = fastpo.linear_token_logprobs(hidden, weight, labels, bias=b, return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    z = (b.detach().cpu().double() if bias else torch.zeros(vocab, dtype=torch.float64)).expand(4, vocab)
    zr = z.clone().requires_grad_()
    want_logp, want_entropy = reference.token_logprobs(zr, labels.cpu(), 1.0, -100, True)
    (want_logp.sum() + want_entropy.sum()).backward()
    torch.testing.assert_close(logp.cpu().double(), want_logp.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(entropy.cpu().double(), want_entropy.detach(), atol=1e-6, rtol=1e-6)
    if not bias:
        assert torch.allclose(logp[labels != -100].cpu(), torch.tensor(-torch.log(torch.tensor(11.0)).item()))
    assert hidden.grad.shape == (4, 0) and weight.grad.shape == (vocab, 0)
    if bias:
        torch.testing.assert_close(b.grad.cpu().double(), zr.grad.sum(0), atol=1e-6, rtol=1e-5)


def test_double_backward_raises_not_implemented(backend):
    hidden, weight, _, labels = _inputs(6, 8, 30, torch.float32, bias=False, seed=5)
    h = hidden.to(backend).requires_grad_()
    logp = fastpo.linear_token_logprobs(h, weight.to(backend), labels.to(backend), chunk_size=4)
    (grad,) = torch.autograd.grad(logp.sum(), h, create_graph=True)
    hr = hidden.double().requires_grad_()
    (want,) = torch.autograd.grad(reference.linear_token_logprobs(hr, weight.double(), labels).sum(), hr)
    torch.testing.assert_close(grad.cpu().double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="linear_token_logprobs does not support double backward"):
        grad.square().sum().backward()
