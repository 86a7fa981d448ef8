"""Per-token temperature tensors in token_logprobs / linear_token_logprobs: C++ and Triton (interpreter on
CPU) against the float64 reference, which is checked against log_softmax(z_i / τ_i) directly."""

import pytest
import torch

import fastpo
from fastpo import reference
from helpers import assert_close, make_labels

ALL = ("logp", "entropy", "log_sum_sq_probs", "is_top1", "mean_logits")


def _temps(shape, generator):
    return 0.3 + 1.5 * torch.rand(shape, generator=generator)


def test_reference_is_per_row_log_softmax():
    g = torch.Generator().manual_seed(0)
    x, labels, tau = torch.randn(4, 5, 9, generator=g, dtype=torch.float64), make_labels((4, 5), 9, generator=g), \
        _temps((4, 5), g).double()
    got = reference.token_logprobs(x, labels, tau, -100, True)
    logq = torch.log_softmax(x / tau[..., None], -1)
    valid = labels != -100
    want = logq.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(got[0][valid], want[valid], atol=1e-12)
    assert torch.allclose(got[1][valid], -(logq.exp() * logq).sum(-1)[valid], atol=1e-12)
    assert (got[0][~valid] == 0).all()


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels, tau = torch.tensor([1, -100, 5]), _temps(3, g).double()
    assert torch.autograd.gradcheck(lambda z: reference.token_logprobs(z, labels, tau, -100, True), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 7, 50257])
def test_token_matches_reference(backend, dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    shape = (2, 3) if vocab < 1000 else (1, 3)
    logits = (3 * torch.randn(*shape, vocab, generator=g)).to(dtype)
    labels = make_labels(shape, vocab, generator=g)
    tau = _temps(shape, g)
    gl, ge = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    x = logits.double().requires_grad_()
    want = reference.token_logprobs(x, labels, tau.double(), -100, outputs=ALL)
    (want.logp * gl.double() + want.entropy * ge.double()).sum().backward()
    y = logits.to(backend).requires_grad_()
    got = fastpo.token_logprobs(y, labels.to(backend), temperature=tau.to(backend), outputs=ALL)
    (got.logp * gl.to(backend) + got.entropy * ge.to(backend)).sum().backward()
    for name in ("logp", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert_close(getattr(got, name), getattr(want, name), dtype)
    assert torch.equal(got.is_top1.cpu(), want.is_top1)
    assert_close(y.grad, x.grad, dtype, grad=True)


def test_float64_op_gradcheck(cpu_backend):  # (the Triton kernels accumulate in float32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels, tau = torch.tensor([0, 4, -100, 2]), _temps(4, g).double()
    assert torch.autograd.gradcheck(
        lambda z: fastpo.token_logprobs(z, labels, temperature=tau, return_entropy=True), (x,))


def test_broadcast_per_sequence_equals_expanded(backend):
    g = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(3, 4, 11, generator=g).to(backend), make_labels((3, 4), 11, generator=g).to(backend)
    per_seq = _temps((3, 1), g).to(backend)
    a = fastpo.token_logprobs(logits, labels, temperature=per_seq, return_entropy=True)
    b = fastpo.token_logprobs(logits, labels, temperature=per_seq.expand(3, 4).contiguous(), return_entropy=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_constant_tensor_equals_float(backend):
    g = torch.Generator().manual_seed(4)
    logits, labels = torch.randn(6, 13, generator=g).to(backend), make_labels((6,), 13, generator=g).to(backend)
    a = fastpo.token_logprobs(logits, labels, temperature=0.7, return_entropy=True)
    b = fastpo.token_logprobs(logits, labels, temperature=torch.full((6,), 0.7, device=backend), return_entropy=True)
    assert_close(a[0], b[0], torch.float32)
    assert_close(a[1], b[1], torch.float32)


def test_temperature_gets_no_gradient(backend):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 7, generator=g, device=backend).requires_grad_()
    tau = _temps(4, g).to(backend).requires_grad_()
    logp = fastpo.token_logprobs(logits, torch.tensor([0, 1, 2, 3], device=backend), temperature=tau)
    logp.sum().backward()
    assert tau.grad is None and logits.grad is not None


def test_extreme_logits_no_nan(backend):
    logits = torch.tensor([[1e4, -1e4, 0.0], [-float("inf"), 3.0, 2.0], [1e30, -1e30, 5.0]], device=backend)
    tau = torch.tensor([1e-3, 50.0, 0.5], device=backend)
    x = logits.clone().requires_grad_()
    logp, ent = fastpo.token_logprobs(x, torch.tensor([0, 1, 2], device=backend), temperature=tau,
                                      return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(logp[:2]).all() and torch.isfinite(ent).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_values_raise(backend, bad):
    tau = torch.tensor([1.0, bad], device=backend)
    logits = torch.randn(2, 5, device=backend)
    with pytest.raises(ValueError, match="temperature"):
        fastpo.token_logprobs(logits, torch.tensor([0, 1], device=backend), temperature=tau)
    with pytest.raises(ValueError, match="temperature"):
        fastpo.linear_token_logprobs(torch.randn(2, 3, device=backend), torch.randn(5, 3, device=backend),
                                     torch.tensor([0, 1], device=backend), temperature=tau)


def test_bad_shape_and_dtype_raise():
    logits, labels = torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"temperature.*\(2, 3\).*\(3, 2\)"):
        fastpo.token_logprobs(logits, labels, temperature=torch.ones(3, 2))
    with pytest.raises(TypeError, match="temperature"):
        fastpo.token_logprobs(logits, labels, temperature=torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_reference(backend, dtype):
    g = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(2, 5, 8, generator=g).to(dtype), (0.5 * torch.randn(7, 8, generator=g)).to(dtype)
    labels, tau = make_labels((2, 5), 7, generator=g), _temps((2, 5), g)
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = reference.linear_token_logprobs(h, w, labels, None, tau.double(), -100, True)
    (want[0].sum() + want[1].sum()).backward()
    h2, w2 = hidden.to(backend).requires_grad_(), weight.to(backend).requires_grad_()
    got = fastpo.linear_token_logprobs(h2, w2, labels.to(backend), temperature=tau.to(backend),
                                       return_entropy=True, chunk_size=3)
    (got[0].sum() + got[1].sum()).backward()
    # (16-bit logits are rounded to the dtype by the matmul; tolerances as in test_linear_token_logprobs)
    atol, rtol = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (6e-2, 5e-2)}[dtype]
    for a, w in zip((got[0], got[1], h2.grad, w2.grad), (want[0], want[1], h.grad, w.grad)):
        torch.testing.assert_close(a.cpu().double(), w, atol=atol, rtol=rtol)


@pytest.mark.parametrize("op", ["token", "linear"])
def test_compile_fullgraph(backend, op):
    g = torch.Generator().manual_seed(7)
    logits, hidden, weight = torch.randn(6, 9, generator=g), torch.randn(6, 4, generator=g), torch.randn(9, 4,
                                                                                                        generator=g)
    labels, tau = make_labels((6,), 9, generator=g), _temps(6, g)

    def fn(a, b, t):
        if op == "token":
            return fastpo.token_logprobs(a, labels.to(backend), temperature=t, return_entropy=True)
        return fastpo.linear_token_logprobs(a, b, labels.to(backend), temperature=t, return_entropy=True)

    first = logits if op == "token" else hidden
    eager_in, comp_in = first.to(backend).requires_grad_(), first.to(backend).requires_grad_()
    want = fn(eager_in, weight.to(backend), tau.to(backend))
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(comp_in, weight.to(backend), tau.to(backend))
    (want[0].sum() + want[1].sum()).backward()
    (got[0].sum() + got[1].sum()).backward()
    assert_close(got[0], want[0], torch.float32)
    assert_close(comp_in.grad, eager_in.grad, torch.float32, grad=True)
