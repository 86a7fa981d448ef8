"""The public fused linear ops with sharded heads (the lead's wiring of fastpo.ops.lm_head / vocab_parallel):
a fake ZeRO-3 weight_gather through linear_token_logprobs, linear_policy_loss (one-pass and composed paths)
and linear_distill_loss (reduced and per-token), and process_group= on the two log-prob ops (one-rank group)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastpo
from test_lm_head_sharded import FakeZero3


def _head(seed, n=10, d=4, vocab=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=dtype), torch.randn(vocab, d, generator=g, dtype=dtype),
            torch.randint(0, vocab, (n,), generator=g))


@pytest.mark.parametrize("config", ["grpo", "kl_cov"])
def test_linear_policy_loss_weight_gather(config):
    h, w, labels = _head(0)
    cfg = fastpo.GRPO if config == "grpo" else fastpo.KL_COV  # one-pass path / composed (pre-pass) path
    cfg = dataclasses.replace(cfg, kl_coef=0.0)
    n = labels.numel()
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(n, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, 4, 10])
    zero = FakeZero3(w)
    hs = h.clone().requires_grad_()
    out = fastpo.linear_policy_loss(hs, zero.params[0], labels, old, adv, cu_seqlens=cu, config=cfg, chunk_size=3,
                                    weight_gather=zero.gather)
    assert len(zero.entries) == 1 and zero.params[0].numel() == 0
    out.loss.backward()
    # one more gather: for the recompute (composed path) or the accumulation (gradients formed in the forward)
    assert len(zero.entries) == 2 and zero.params[0].numel() == 0
    hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = fastpo.linear_policy_loss(hf, wf, labels, old, adv, cu_seqlens=cu, config=cfg, chunk_size=3)
    want.loss.backward()
    torch.testing.assert_close(out.loss, want.loss)
    torch.testing.assert_close(hs.grad, hf.grad)
    torch.testing.assert_close(zero.params[0].grad, wf.grad)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_linear_distill_weight_gather(reduction):
    hs_, ws_, labels = _head(2)
    ht, wt, _ = _head(3)
    zero = FakeZero3(ws_, wt)
    sw, tw = zero.params
    tw.requires_grad_(False)
    hs = hs_.clone().requires_grad_()
    loss = fastpo.linear_distill_loss(hs, sw, ht, tw, labels, reduction=reduction, chunk_size=4,
                                      weight_gather=zero.gather)
    assert len(zero.entries) == 2  # one per head
    loss.sum().backward()
    assert len(zero.entries) == (3 if reduction == "batchmean" else 4)  # the per-token backward recomputes both
    assert sw.numel() == 0 and tw.numel() == 0
    hf, wf = hs_.clone().requires_grad_(), ws_.clone().requires_grad_()
    want = fastpo.linear_distill_loss(hf, wf, ht, wt, labels, reduction=reduction, chunk_size=4)
    want.sum().backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(hs.grad, hf.grad)
    torch.testing.assert_close(sw.grad, wf.grad)


def test_process_group_on_the_public_ops(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        h, w, labels = _head(4)
        got = fastpo.linear_token_logprobs(h, w, labels, outputs=("logp", "is_top1"), process_group=dist.group.WORLD)
        want = fastpo.linear_token_logprobs(h, w, labels, outputs=("logp", "is_top1"))
        torch.testing.assert_close(got.logp, want.logp)
        assert torch.equal(got.is_top1, want.is_top1)
        x = h @ w.T
        got = fastpo.token_logprobs(x, labels, return_entropy=True, process_group=dist.group.WORLD)
        want = fastpo.token_logprobs(x, labels, return_entropy=True)
        torch.testing.assert_close(got, want)
        with pytest.raises(ValueError, match="inplace_backward"):
            fastpo.token_logprobs(x, labels, inplace_backward=True, process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()
