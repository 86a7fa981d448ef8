"""Logit transforms of the log-prob ops (issue 16 item 2): ``logit_scale`` k and ``logit_softcap`` c,
z = c·tanh(k·x/c) before the temperature, with their derivative in the backward; every backend against
fastpo.reference (itself gradchecked in float64) and TRL 1.16's ``ChunkedLogProbFunction``."""

import pytest
import torch

import fastpo
from fastpo import reference
from helpers import assert_close, make_labels

ALL = ("logp", "entropy", "log_sum_sq_probs", "is_top1", "mean_logits")
TRANSFORMS = [(5.0, 1.0), (None, 0.5), (3.0, 2.0)]


@pytest.mark.parametrize("softcap, scale", TRANSFORMS)
def test_reference_gradcheck_float64(softcap, scale):
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(3, 6, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.tensor([1, -100, 5])

    def fn(x):
        logp, entropy = reference.token_logprobs(x, labels, 0.7, -100, True, None, softcap, scale)
        return logp, entropy

    assert torch.autograd.gradcheck(fn, (logits,))


def _loss(out, g_logp, g_ent):
    return (out.logp * g_logp).sum() + (out.entropy * g_ent).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 3000])
@pytest.mark.parametrize("softcap, scale", TRANSFORMS)
def test_token_transforms_match_reference(backend, dtype, vocab, softcap, scale):
    g = torch.Generator().manual_seed(vocab)
    # Logits small enough that the softcap does not saturate float32 (where is_top1 ties are judged on
    # the float32 transformed values, as TRL's are, and a float64 reference would not tie).
    logits = (2 * torch.randn(2, 4, vocab, generator=g)).to(dtype)
    labels = make_labels((2, 4), vocab, generator=g)
    labels[0, 0] = logits[0, 0].float().argmax()
    g_logp, g_ent = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    x = logits.to(backend).clone().requires_grad_()
    got = fastpo.token_logprobs(x, labels.to(backend), temperature=0.8, outputs=ALL, logit_softcap=softcap,
                                logit_scale=scale)
    _loss(got, g_logp.to(backend), g_ent.to(backend)).backward()
    xr = logits.double().requires_grad_()
    want = reference.token_logprobs(xr, labels, 0.8, -100, False, ALL, softcap, scale)
    _loss(want, g_logp.double(), g_ent.double()).backward()
    for name in ("logp", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert_close(getattr(got, name), getattr(want, name), dtype)
    assert torch.equal(got.is_top1.cpu(), want.is_top1)
    assert_close(x.grad, xr.grad, dtype, grad=True)


def test_softcap_changes_the_result(cpu_backend):
    # Guards the tests above against a transform that is silently ignored.
    logits, labels = 10 * torch.randn(3, 9), torch.tensor([0, 4, 8])
    plain = fastpo.token_logprobs(logits, labels)
    capped = fastpo.token_logprobs(logits, labels, logit_softcap=2.0)
    assert (plain - capped).abs().max() > 0.1
    torch.testing.assert_close(capped, fastpo.token_logprobs(2.0 * torch.tanh(logits / 2.0), labels))


@pytest.mark.parametrize("softcap, scale", TRANSFORMS)
def test_linear_transforms_match_reference(backend, softcap, scale):
    g = torch.Generator().manual_seed(11)
    hidden, weight = torch.randn(9, 8, generator=g), torch.randn(300, 8, generator=g)
    labels = make_labels((9,), 300, generator=g)
    h, w = hidden.to(backend).clone().requires_grad_(), weight.to(backend).clone().requires_grad_()
    got = fastpo.linear_token_logprobs(h, w, labels.to(backend), outputs=ALL, chunk_size=4, logit_softcap=softcap,
                                       logit_scale=scale)
    (got.logp.sum() + got.entropy.sum()).backward()
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = reference.linear_token_logprobs(hr, wr, labels, None, 1.0, -100, False, ALL, softcap, scale)
    (want.logp.sum() + want.entropy.sum()).backward()
    for name in ("logp", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert_close(getattr(got, name), getattr(want, name), torch.float32)
    assert torch.equal(got.is_top1.cpu(), want.is_top1)
    assert_close(h.grad, hr.grad, torch.float32, grad=True)
    assert_close(w.grad, wr.grad, torch.float32, grad=True)


@pytest.mark.parametrize("kwargs, exc", [
    ({"logit_softcap": 0.0}, ValueError), ({"logit_softcap": -1.0}, ValueError),
    ({"logit_softcap": float("inf")}, ValueError), ({"logit_scale": 0.0}, ValueError),
    ({"logit_scale": True}, TypeError), ({"logit_softcap": "30"}, TypeError)])
def test_bad_transforms_raise(cpu_backend, kwargs, exc):
    logits, labels = torch.randn(2, 5), torch.tensor([1, 2])
    with pytest.raises(exc, match=next(iter(kwargs))):
        fastpo.token_logprobs(logits, labels, **kwargs)
    with pytest.raises(exc, match=next(iter(kwargs))):
        fastpo.linear_token_logprobs(logits, torch.randn(3, 5), labels, **kwargs)


@pytest.mark.parametrize("softcap, scale", [(5.0, 1.0), (None, 0.25), (4.0, 1.5)])
def test_transforms_match_trl(cpu_backend, monkeypatch, softcap, scale):
    trl_mod = pytest.importorskip("trl.kernels.chunked_logprob", reason="trl (the parity extra) is not installed")
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(10, 16, generator=g), torch.randn(200, 16, generator=g)
    labels = torch.randint(0, 200, (10,), generator=g)
    labels[::2] = (hidden @ weight.t())[::2].argmax(-1)
    ht, wt = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = trl_mod.ChunkedLogProbFunction.apply(ht, wt, None, labels, 0.9, 64, softcap, scale, trl_mod.OPTIONAL_OUTPUTS)
    (want[0].sum() + want[1].sum()).backward()
    calls = []  # fastpo must not delegate to TRL's folding code
    monkeypatch.setattr(trl_mod, "_forward_tile", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(trl_mod.ChunkedLogProbFunction, "forward", staticmethod(lambda *a, **k: calls.append(a)))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = fastpo.linear_token_logprobs(h, w, labels, temperature=0.9, outputs=ALL, logit_softcap=softcap,
                                       logit_scale=scale)
    (got.logp.sum() + got.entropy.sum()).backward()
    assert not calls
    logp, entropy, log_sum_sq, mean_logits, is_top1 = want
    for a, b in ((got.logp, logp), (got.entropy, entropy), (got.log_sum_sq_probs, log_sum_sq),
                 (got.mean_logits, mean_logits), (h.grad, ht.grad), (w.grad, wt.grad)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    assert is_top1.any() and torch.equal(got.is_top1, is_top1)
