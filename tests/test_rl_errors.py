"""Issue 20 §4 and the double-backward item for the sequence ops:

* ``policy_loss(num_tokens=...)`` rejects non-positive and non-finite counts, as an int or a tensor, in
  every backend and under torch.compile, and leaves its inputs untouched;
* double backward raises a clear ``NotImplementedError`` through policy_loss and value_loss, and is
  supported (the op is linear) through sequence_logprobs; gae has no gradient at all.
"""

import pytest
import torch

import fastpo
from helpers import assert_raises_unmodified
from rl_cases import BACKENDS

BAD_COUNTS = [-1, 0, torch.tensor(-1.0), torch.tensor(0), torch.tensor(float("nan")), torch.tensor(float("inf")),
              torch.tensor(-float("inf")), torch.tensor([-3])]


def _batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(3, 4, generator=g) * 0.3 - 1).to(dtype)
    return dict(logp=logp, old_logp=logp + 0.1 * torch.randn(3, 4, generator=g).to(dtype),
                advantages=torch.randn(3, 4, generator=g).to(dtype), mask=torch.rand(3, 4, generator=g) > 0.3)


@pytest.mark.parametrize("count", BAD_COUNTS, ids=lambda c: repr(c.tolist() if isinstance(c, torch.Tensor) else c))
@pytest.mark.parametrize("name", BACKENDS)
def test_bad_num_tokens_is_rejected(monkeypatch, name, count):
    monkeypatch.setenv("FASTPO_BACKEND", name)
    before = count.clone() if isinstance(count, torch.Tensor) else count

    def call(**inputs):
        return fastpo.policy_loss(**inputs, num_tokens=count, config=fastpo.DAPO)

    assert_raises_unmodified(call, _batch(), ValueError, match="num_tokens")
    if isinstance(count, torch.Tensor):  # NaN != NaN: compared apart
        torch.testing.assert_close(count, before, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("name", BACKENDS)
def test_good_num_tokens_int_and_tensor_agree(monkeypatch, name):
    monkeypatch.setenv("FASTPO_BACKEND", name)
    b = _batch()
    as_int = fastpo.policy_loss(**b, num_tokens=13, config=fastpo.DAPO).loss
    as_tensor = fastpo.policy_loss(**b, num_tokens=torch.tensor(13.0), config=fastpo.DAPO).loss
    unnormalised = fastpo.policy_loss(**b, num_tokens=1, config=fastpo.DAPO).loss
    torch.testing.assert_close(as_int, as_tensor)
    torch.testing.assert_close(as_int * 13, unnormalised)


def test_bad_num_tokens_tensor_is_rejected_under_compile(cpu_backend):
    b = _batch()

    def fn(n):
        return fastpo.policy_loss(**b, num_tokens=n, config=fastpo.DAPO).loss

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(torch.tensor(9.0)), fn(torch.tensor(9.0)))
    for bad in (torch.tensor(0.0), torch.tensor(float("nan"))):
        with pytest.raises(ValueError, match="num_tokens"):
            compiled(bad)


def _double_backward(loss_fn, x):
    (grad,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
    (grad * torch.linspace(0.5, 1.5, grad.numel()).reshape(grad.shape)).sum().backward()


def test_double_backward_of_the_losses_is_not_implemented(backend):
    b = {k: v.to(backend) for k, v in _batch().items()}
    losses = {
        "policy_loss": lambda x: fastpo.policy_loss(x, b["old_logp"], b["advantages"], b["mask"],
                                                    config=fastpo.DAPO).loss,
        "value_loss": lambda x: fastpo.value_loss(x, b["old_logp"], b["advantages"], b["mask"]).loss,
    }
    for name, fn in losses.items():
        x = b["logp"].clone().requires_grad_()
        with pytest.raises(NotImplementedError, match="double backward"):
            _double_backward(fn, x)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_double_backward(backend, average, packed):
    g = torch.Generator().manual_seed(4)
    if packed:
        x = torch.randn(9, generator=g, dtype=torch.float64)
        mask, cu = torch.rand(9, generator=g) > 0.3, torch.tensor([0, 3, 3, 9])
    else:
        x = torch.randn(3, 4, generator=g, dtype=torch.float64)
        mask, cu = torch.rand(3, 4, generator=g) > 0.3, None
    x, mask = x.to(backend), mask.to(backend)
    cu = None if cu is None else cu.to(backend)

    def fn(t):
        return fastpo.sequence_logprobs(t, mask, cu_seqlens=cu, average=average)

    assert torch.autograd.gradgradcheck(fn, (x.clone().requires_grad_(),))


def test_gae_has_no_gradient(backend):
    r = torch.randn(2, 5, device=backend, requires_grad=True)
    v = torch.randn(2, 5, device=backend, requires_grad=True)
    adv, ret = fastpo.gae(r, v, gamma=0.9, lam=0.9)
    assert not adv.requires_grad and not ret.requires_grad
