"""torch.compile(fullgraph=True) traces through the custom ops and matches eager."""

import pytest
import torch

import fastpo


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_compiled_loss_matches_eager(cpu_backend, inplace_backward):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=g)
    weight = torch.randn(300, 16, generator=g) / 4
    labels = torch.randint(0, 300, (2, 9), generator=g)
    labels[0, :3] = -100

    def loss_fn(h, w):
        logp, entropy = fastpo.linear_token_logprobs(h, w, labels, temperature=0.9, return_entropy=True, chunk_size=7)
        direct = fastpo.token_logprobs(h @ w.t(), labels, return_entropy=True, inplace_backward=inplace_backward)
        return -(logp.sum() + 0.1 * entropy.sum()) + direct[0].square().mean() + direct[1].mean()

    def run(fn):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    for got, want in zip(run(compiled), run(loss_fn)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
