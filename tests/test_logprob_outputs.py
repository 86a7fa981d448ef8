"""The per-token statistics of the log-prob ops (issue 16 item 1): ``outputs=("logp", "entropy",
"log_sum_sq_probs", "is_top1", "mean_logits")``, for both ops and every backend, against
fastpo.reference and TRL 1.16's ``ChunkedLogProbFunction``."""

import pytest
import torch

import fastpo
from fastpo import reference
from helpers import assert_close, make_labels

ALL = ("logp", "entropy", "log_sum_sq_probs", "is_top1", "mean_logits")
FLOATS = ("logp", "entropy", "log_sum_sq_probs", "mean_logits")


def _labels_with_argmax(logits, generator):
    """Random labels with ignored rows, a third of the rows relabelled to their (first) argmax."""
    labels = make_labels(logits.shape[:-1], logits.shape[-1], generator=generator)
    pick = torch.rand(labels.shape, generator=generator) < 0.35
    return torch.where(pick, logits.float().argmax(-1), labels)


def _check_against_reference(got, logits, labels, temperature, dtype):
    want = reference.token_logprobs(logits.cpu().double(), labels.cpu(), temperature, -100, False, ALL)
    for name in FLOATS:
        assert getattr(got, name).dtype == torch.float32 and getattr(got, name).shape == labels.shape, name
        assert_close(getattr(got, name), getattr(want, name), dtype)
    assert got.is_top1.dtype == torch.bool
    assert torch.equal(got.is_top1.cpu(), want.is_top1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 7, 3000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_outputs_match_reference(backend, dtype, vocab, temperature):
    g = torch.Generator().manual_seed(vocab)
    logits = (3 * torch.randn(2, 5, vocab, generator=g)).to(dtype)
    labels = _labels_with_argmax(logits, g)
    got = fastpo.token_logprobs(logits.to(backend), labels.to(backend), temperature=temperature, outputs=ALL)
    assert isinstance(got, fastpo.LogProbOutputs)
    _check_against_reference(got, logits, labels, temperature, dtype)
    ignored = labels == -100
    assert ignored.any()
    for name in FLOATS:
        assert (getattr(got, name).cpu()[ignored] == 0).all()
    assert not got.is_top1.cpu()[ignored].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [7, 3000])
def test_linear_outputs_match_reference_and_keep_gradients(backend, dtype, vocab):
    g = torch.Generator().manual_seed(vocab + 1)
    hidden, weight = torch.randn(9, 8, generator=g).to(dtype), torch.randn(vocab, 8, generator=g).to(dtype)
    labels = _labels_with_argmax(hidden.float() @ weight.float().t(), g)
    h, w = hidden.to(backend).clone().requires_grad_(), weight.to(backend).clone().requires_grad_()
    got = fastpo.linear_token_logprobs(h, w, labels.to(backend), outputs=ALL, chunk_size=4)
    logits = hidden.float() @ weight.float().t()
    _check_against_reference(got, logits.to(dtype), labels, 1.0, dtype)
    # logp and entropy stay differentiable (with the statistics asked for too); the others are detached.
    assert got.logp.requires_grad and got.entropy.requires_grad
    assert not any(getattr(got, n).requires_grad for n in ("log_sum_sq_probs", "is_top1", "mean_logits"))
    (got.logp.sum() + got.entropy.sum()).backward()
    if dtype != torch.float32:  # 16-bit chunk GEMMs: their rounding is the existing tests' business
        return
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = reference.linear_token_logprobs(hr, wr, labels, None, 1.0, -100, False, ("logp", "entropy"))
    (want.logp.sum() + want.entropy.sum()).backward()
    assert_close(h.grad, hr.grad, dtype, grad=True)
    assert_close(w.grad, wr.grad, dtype, grad=True)


def test_ties_resolve_to_the_first_argmax(backend):
    # Integer-valued logits in {0, 1, 2}: most rows have several maxima.
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 3, (40, 6), generator=g).float()
    first = logits.argmax(-1)
    labels = torch.where(torch.arange(40) % 2 == 0, first, torch.randint(0, 6, (40,), generator=g))
    got = fastpo.token_logprobs(logits.to(backend), labels.to(backend), outputs=("is_top1",))
    assert got.logp is None and got.entropy is None and got.mean_logits is None
    assert torch.equal(got.is_top1.cpu(), labels == first)
    # A later maximum is not the top-1; the first one is (as torch.argmax and TRL decide).
    row = torch.tensor([[2.0, 5.0, 5.0, 1.0]] * 3, device=backend)
    top1 = fastpo.token_logprobs(row, torch.tensor([1, 2, 3], device=backend), outputs=("is_top1",)).is_top1
    assert top1.tolist() == [True, False, False]


def test_extreme_logits(backend):
    logits = torch.tensor([[1e4, -1e4, 0.0, float("-inf")], [-3e4, -3e4 + 1, float("-inf"), -3e4],
                           [80.0, 80.0, 80.0, 80.0]], device=backend)
    labels = torch.tensor([0, 1, 3], device=backend)
    got = fastpo.token_logprobs(logits, labels, outputs=ALL)
    want = reference.token_logprobs(logits.cpu().double(), labels.cpu(), 1.0, -100, False, ALL)
    for name in ("logp", "entropy", "log_sum_sq_probs"):
        torch.testing.assert_close(getattr(got, name).cpu().double(), getattr(want, name), atol=1e-5, rtol=1e-6)
    assert got.log_sum_sq_probs.cpu().tolist()[0] == 0.0  # p = (1, 0, 0, 0)
    assert torch.equal(got.mean_logits.cpu()[:2], torch.tensor([float("-inf")] * 2))
    assert got.is_top1.cpu().tolist() == [True, True, False]


def test_only_what_is_asked_and_return_entropy_unchanged(cpu_backend):
    logits, labels = torch.randn(4, 11), torch.tensor([1, 2, -100, 3])
    got = fastpo.token_logprobs(logits, labels, outputs=("mean_logits", "logp"))
    assert got.entropy is None and got.log_sum_sq_probs is None and got.is_top1 is None
    logp, entropy = fastpo.token_logprobs(logits, labels, return_entropy=True)
    assert torch.equal(got.logp, logp)
    assert torch.equal(fastpo.token_logprobs(logits, labels, outputs=("entropy",)).entropy, entropy)


@pytest.mark.parametrize("outputs, exc, fragment", [
    (("logp", "top1"), ValueError, "top1"), ((), ValueError, "non-empty"), ("logp", TypeError, "tuple")])
def test_bad_outputs_raise(cpu_backend, outputs, exc, fragment):
    logits, labels = torch.randn(2, 5), torch.tensor([1, 2])
    for call in (lambda: fastpo.token_logprobs(logits, labels, outputs=outputs),
                 lambda: fastpo.linear_token_logprobs(logits, torch.randn(3, 5), labels, outputs=outputs)):
        with pytest.raises(exc, match=fragment):
            call()
    with pytest.raises(ValueError, match="return_entropy"):
        fastpo.token_logprobs(logits, labels, return_entropy=True, outputs=("logp",))


def test_under_torch_compile_fullgraph(cpu_backend):
    def fn(logits, labels):
        out = fastpo.token_logprobs(logits, labels, outputs=ALL, temperature=0.8)
        return out.logp.sum() + out.entropy.sum(), out.log_sum_sq_probs, out.is_top1, out.mean_logits

    logits, labels = torch.randn(6, 13), torch.tensor([0, 3, -100, 12, 5, 5])
    labels[1] = logits[1].argmax()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    x, xc = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    want, got = fn(x, labels), compiled(xc, labels)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    want[0].backward()
    got[0].backward()
    torch.testing.assert_close(xc.grad, x.grad)


# --- parity with TRL 1.16's ChunkedLogProbFunction ---------------------------------------------

def _trl():
    return pytest.importorskip("trl.kernels.chunked_logprob", reason="trl (the parity extra) is not installed")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_extra_outputs_match_trl(cpu_backend, monkeypatch, temperature):
    trl_mod = _trl()
    g = torch.Generator().manual_seed(7)
    vocab = 300
    hidden, weight, bias = torch.randn(12, 16, generator=g), torch.randn(vocab, 16, generator=g), torch.randn(vocab, generator=g)
    labels = torch.randint(0, vocab, (12,), generator=g)
    labels[::3] = (hidden @ weight.t() + bias)[::3].argmax(-1)
    want = trl_mod.ChunkedLogProbFunction.apply(hidden, weight, bias, labels, temperature, 64, None, 1.0,
                                                trl_mod.OPTIONAL_OUTPUTS)
    # fastpo must not delegate to TRL: any call into its folding code fails the test.
    calls = []
    monkeypatch.setattr(trl_mod, "_forward_tile", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(trl_mod.ChunkedLogProbFunction, "forward", staticmethod(lambda *a, **k: calls.append(a)))
    got = fastpo.linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, outputs=ALL)
    assert not calls
    logp, entropy, log_sum_sq, mean_logits, is_top1 = want
    torch.testing.assert_close(got.logp, logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.entropy, entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.log_sum_sq_probs, log_sum_sq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.mean_logits, mean_logits, atol=1e-5, rtol=1e-5)
    assert is_top1.any() and torch.equal(got.is_top1, is_top1)


def test_is_top1_ties_match_trl(cpu_backend):
    trl_mod = _trl()
    hidden = torch.eye(4)
    # Vocabulary entries 1 and 2 are copies: a tie between them in every row that prefers them.
    weight = torch.tensor([[0.0, 0, 0, 0], [3.0, 1, 0, 0], [3.0, 1, 0, 0], [0.0, 0, 2, 0], [0.0, 0, 2, 5]])
    labels = torch.tensor([1, 2, 3, 4])
    want = trl_mod.ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 2, None, 1.0, ("is_top1",))[-1]
    got = fastpo.linear_token_logprobs(hidden, weight, labels, outputs=("is_top1",)).is_top1
    assert want.tolist() == [True, False, True, True]
    assert torch.equal(got, want)
