"""The log-prob ops under torch.compile with changing shapes and temperatures (issue 20 §1).

Real training changes the number of tokens every step and may anneal the temperature. Both ops
must trace with ``fullgraph=True`` under ``dynamic=True`` and under automatic dynamic shapes,
compile at most twice for four batch sizes, and not recompile per temperature value. Compilations
are counted with a ``torch._dynamo`` counter backend over ``aot_eager``: dynamo and AOT autograd
decide what specialises (inductor specialises exactly what aot_eager does, at ~20x the compile
time; tests/test_compile.py runs inductor).
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fastpo

V, D = 11, 4
STEPS = [(3, 1.0), (5, 0.7), (8, 0.9), (13, 1.3)]  # (tokens, temperature) per training step


def _token_loss(logits, labels, temperature):
    logp, entropy = fastpo.token_logprobs(logits, labels, temperature=temperature, return_entropy=True)
    return -(logp.sum() + 0.1 * entropy.sum())


def _token_inplace_loss(hidden, weight, labels, temperature):
    """The in-place backward writes into the lm_head output (a non-leaf, as in a model)."""
    logp, entropy = fastpo.token_logprobs(hidden @ weight.t(), labels, temperature=temperature,
                                          return_entropy=True, inplace_backward=True)
    return -(logp.sum() + 0.1 * entropy.sum())


def _shifted_loss(logits, ids, temperature):
    """A model's [B, T, V] logits shifted against its ids: read in place as [B, T - 1, V] blocks."""
    logp, entropy = fastpo.token_logprobs(logits[:, :-1], ids[:, 1:], temperature=temperature,
                                          return_entropy=True, inplace_backward=True)
    return -(logp.sum() + 0.1 * entropy.sum())


def _shifted_inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, V, generator=g),), torch.randint(0, V, (n, 4), generator=g)


def _linear_loss(hidden, weight, labels, temperature):
    logp, entropy = fastpo.linear_token_logprobs(hidden, weight, labels, temperature=temperature,
                                                 return_entropy=True)
    return -(logp.sum() + 0.1 * entropy.sum())


def _token_inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[0] = -100
    return (torch.randn(n, V, generator=g),), labels


def _linear_inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (n,), generator=g)
    return (torch.randn(n, D, generator=g), torch.randn(V, D, generator=g)), labels


OPS = {
    "token_logprobs": (_token_loss, _token_inputs),
    "token_logprobs_inplace": (_token_inplace_loss, _linear_inputs),
    "token_logprobs_shifted_batch": (_shifted_loss, _shifted_inputs),
    "linear_token_logprobs": (_linear_loss, _linear_inputs),
}


def _loss_and_grads(fn, tensors, labels, temperature):
    leaves = [t.clone().requires_grad_() for t in tensors]
    loss = fn(*leaves, labels, temperature)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def _run_steps(fn, make, dynamic, steps=STEPS):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=dynamic)
    for seed, (n, temperature) in enumerate(steps):
        tensors, labels = make(n, seed)
        got = _loss_and_grads(compiled, tensors, labels, temperature)
        want = _loss_and_grads(fn, tensors, labels, temperature)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    return counter.frame_count


@pytest.mark.parametrize("op", list(OPS))
def test_dynamic_true_fullgraph_compiles_once(backend, op):
    """dynamic=True: one graph for every batch size and temperature (was "torch.* op returned
    non-Tensor" at the temperature check)."""
    assert _run_steps(*OPS[op], dynamic=True) == 1


@pytest.mark.parametrize("op", list(OPS))
def test_automatic_dynamic_compiles_at_most_twice(backend, op):
    """dynamic=None (the default): the first call specialises, the second goes dynamic in the
    token count and the temperature, the rest reuse it."""
    assert _run_steps(*OPS[op], dynamic=None) <= 2


@pytest.mark.parametrize("op", list(OPS))
def test_temperature_change_does_not_recompile_per_value(cpu_backend, op):
    steps = [(6, t) for t in (1.0, 0.5, 0.8, 1.7, 0.3)]
    assert _run_steps(*OPS[op], dynamic=None, steps=steps) <= 2


def test_bad_temperature_still_raises_under_compile(cpu_backend):
    """The value check moved into the op runs at run time, so a compiled graph still rejects it."""
    torch._dynamo.reset()
    compiled = torch.compile(_token_loss, backend="aot_eager", fullgraph=True, dynamic=True)
    (logits,), labels = _token_inputs(4, 0)
    compiled(logits, labels, 0.5)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            compiled(logits, labels, bad)


def test_label_range_still_checked_under_compile(cpu_backend):
    torch._dynamo.reset()
    compiled = torch.compile(_token_loss, backend="aot_eager", fullgraph=True, dynamic=True)
    (logits,), labels = _token_inputs(4, 0)
    labels[1] = V
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\)"):
        compiled(logits, labels, 1.0)
