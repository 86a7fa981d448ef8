"""Every documented bad input: the right exception type, a message naming the argument and the
shapes seen, raised before any kernel runs, with the inputs left untouched."""

import pytest
import torch

import fastpo
from helpers import assert_raises_unmodified


def _logits_case():
    return torch.randn(2, 3, 5), torch.tensor([[0, 1, 2], [3, 4, -100]])


TOKEN_CASES = [
    # (description, kwargs override, exception, message fragment)
    ("integer logits", dict(logits=torch.ones(2, 3, 5, dtype=torch.long)), TypeError, "logits"),
    ("float labels", dict(labels=torch.zeros(2, 3)), TypeError, "labels"),
    ("logits not a tensor", dict(logits=[[0.0, 1.0]]), TypeError, "logits"),
    ("shape mismatch", dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "(2, 4)"),
    ("empty vocabulary", dict(logits=torch.randn(2, 3, 0)), ValueError, "vocabulary"),
    ("label >= V", dict(labels=torch.tensor([[0, 1, 5], [3, 4, -100]])), ValueError, "[0, 5)"),
    ("negative label", dict(labels=torch.tensor([[0, -1, 2], [3, 4, -100]])), ValueError, "labels"),
    ("temperature 0", dict(temperature=0.0), ValueError, "temperature"),
    ("negative temperature", dict(temperature=-1.0), ValueError, "temperature"),
    ("infinite temperature", dict(temperature=float("inf")), ValueError, "temperature"),
    ("string temperature", dict(temperature="1"), TypeError, "temperature"),
    ("float ignore_index", dict(ignore_index=-100.0), TypeError, "ignore_index"),
    ("non-bool return_entropy", dict(return_entropy=1), TypeError, "return_entropy"),
    ("non-bool inplace_backward", dict(inplace_backward="yes"), TypeError, "inplace_backward"),
]


@pytest.mark.parametrize("name,override,exc,fragment", TOKEN_CASES, ids=[c[0] for c in TOKEN_CASES])
@pytest.mark.parametrize("backend_name", ["cpu", "triton", "reference"])
def test_token_logprobs_errors(monkeypatch, backend_name, name, override, exc, fragment):
    monkeypatch.setenv("FASTPO_BACKEND", backend_name)
    logits, labels = _logits_case()
    kwargs = dict(logits=logits, labels=labels, inplace_backward=True)
    kwargs.update(override)
    assert_raises_unmodified(fastpo.token_logprobs, kwargs, exc, fragment=fragment)


def _linear_case():
    return torch.randn(2, 3, 4), torch.randn(7, 4), torch.tensor([[0, 1, 2], [3, 6, -100]])


LINEAR_CASES = [
    ("weight D mismatch", dict(weight=torch.randn(7, 5)), ValueError, "(7, 5)"),
    ("weight 1-D", dict(weight=torch.randn(7)), ValueError, "weight"),
    ("labels shape", dict(labels=torch.zeros(3, 2, dtype=torch.long)), ValueError, "(3, 2)"),
    ("dtype mismatch", dict(weight=torch.randn(7, 4, dtype=torch.float64)), TypeError, "weight"),
    ("bias shape", dict(bias=torch.randn(6)), ValueError, "bias"),
    ("bias dtype", dict(bias=torch.randn(7, dtype=torch.float64)), TypeError, "bias"),
    ("label >= V", dict(labels=torch.tensor([[0, 1, 2], [3, 7, -100]])), ValueError, "[0, 7)"),
    ("chunk_size 0", dict(chunk_size=0), ValueError, "chunk_size"),
    ("chunk_size float", dict(chunk_size=2.0), TypeError, "chunk_size"),
    ("temperature", dict(temperature=0), ValueError, "temperature"),
    ("integer hidden", dict(hidden=torch.ones(2, 3, 4, dtype=torch.int32)), TypeError, "hidden"),
]


@pytest.mark.parametrize("name,override,exc,fragment", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
def test_linear_token_logprobs_errors(monkeypatch, backend_name, name, override, exc, fragment):
    monkeypatch.setenv("FASTPO_BACKEND", backend_name)
    hidden, weight, labels = _linear_case()
    kwargs = dict(hidden=hidden, weight=weight, labels=labels)
    kwargs.update(override)
    assert_raises_unmodified(fastpo.linear_token_logprobs, kwargs, exc, fragment=fragment)


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("FASTPO_BACKEND", "cuda-magic")
    logits, labels = _logits_case()
    with pytest.raises(ValueError, match="FASTPO_BACKEND"):
        fastpo.token_logprobs(logits, labels)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("FASTPO_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, labels = _logits_case()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fastpo.token_logprobs(logits, labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_is_rejected():
    logits, labels = _logits_case()
    with pytest.raises(ValueError, match="device"):
        fastpo.token_logprobs(logits.cuda(), labels)
