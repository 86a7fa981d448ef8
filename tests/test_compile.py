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


def _opcheck_cases():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 40, generator=g)
    labels = torch.tensor([0, 39, -100, 7, 3, 1])
    row_max = logits.amax(-1)
    log_norm = torch.logsumexp(logits - row_max[:, None], -1)
    entropy = row_max + log_norm - (torch.softmax(logits, -1) * logits).sum(-1)
    grad = torch.randn(6, generator=g)
    hidden, weight, bias = torch.randn(6, 8, generator=g), torch.randn(40, 8, generator=g), torch.randn(40, generator=g)
    tau, tau_09 = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64)
    stats = (row_max, log_norm, entropy)
    ops = torch.ops.fastpo
    return [
        ("token_fwd", ops.token_logprobs_fwd.default,
         (logits.clone().requires_grad_(), labels, tau_09, -100, True, 7, 30.0, 0.5, False, "cpu")),
        ("token_bwd", ops.token_logprobs_bwd.default, (logits, labels, *stats, grad, grad, tau, -100, 30.0, 0.5, "cpu")),
        ("token_bwd_inplace", ops.token_logprobs_bwd_inplace.default,
         (logits.clone(), labels, *stats, grad, None, tau, -100, 0.0, 1.0, "cpu")),
        ("linear_fwd", ops.linear_token_logprobs_fwd.default,
         (hidden.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_(), labels,
          tau, -100, True, 7, 0.0, 1.0, 4, "cpu")),
        ("linear_fwd_default_chunk", ops.linear_token_logprobs_fwd.default,
         (hidden.clone().requires_grad_(), weight, None, labels, tau_09, -100, False, 0, 0.0, 1.0, 0, "cpu")),
        ("linear_bwd", ops.linear_token_logprobs_bwd.default,
         (hidden, weight, None, labels, *stats, grad, None, tau, -100, 30.0, 2.0, 4, "cpu", True, True, False)),
        ("linear_bwd_frozen_weight", ops.linear_token_logprobs_bwd.default,
         (hidden, weight, bias, labels, *stats, grad, grad, tau, -100, 0.0, 1.0, 4, "cpu", True, False, True)),
    ]


@pytest.mark.parametrize("case", _opcheck_cases(), ids=lambda c: c[0])
def test_custom_op_registration(case):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of every op."""
    _, op, args = case
    torch.library.opcheck(op, args)
