"""Vocab-parallel log-probs (fastpo.ops.vocab_parallel) on two gloo ranks against the single-process ops:
one spawn runs every case (tests/vocab_parallel_worker.py): both ops, forward (all five outputs, ties of
is_top1 across the shard boundary, a shard without mass, ignore_index, softcap / scale / temperature,
V_r = 1) and backward (the shard's gradient; the linear op's summed ∂hidden, shard ∂weight and ∂bias,
chunks never above chunk_size), top_k / top_p truncation (top-k 3, top-p 0.9, both; ties at the thresholds across the boundary; dropped
labels: logp −inf, finite gradients), on the C++, Triton-interpreter and reference backends, results equal on
both ranks, and the errors (unequal shards, labels beyond the global vocabulary)."""

from __future__ import annotations


import pytest
import torch

import fastpo
from helpers import run_two_gloo_ranks
from fastpo.ops import vocab_parallel as vp


def test_two_gloo_ranks_match_one_process():
    import vocab_parallel_worker

    run_two_gloo_ranks(vocab_parallel_worker.run, timeout=600)


def test_single_rank_group_is_the_plain_op(tmp_path):
    """A one-rank group (every process its own shard) gives the plain op's results and gradients."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(6, 9, generator=g, requires_grad=True)
        labels = torch.tensor([0, 8, -100, 4, 4, 1])
        got = vp.vocab_parallel_token_logprobs(x, labels, outputs=("logp", "entropy", "is_top1"))
        want = fastpo.token_logprobs(x.detach().requires_grad_(), labels, outputs=("logp", "entropy", "is_top1"))
        torch.testing.assert_close(got.logp, want.logp)
        torch.testing.assert_close(got.entropy, want.entropy)
        assert torch.equal(got.is_top1, want.is_top1)
        with pytest.raises(ValueError, match="per-token temperature must have the labels' shape"):
            vp.vocab_parallel_token_logprobs(x, labels, temperature=torch.ones(5))
        with pytest.raises(ValueError, match="finite and > 0 at every token"):
            vp.vocab_parallel_token_logprobs(x, labels, temperature=torch.tensor([1.0, 0, 1, 1, 1, 1]))
        with pytest.raises(ValueError, match="labels must lie in"):
            vp.vocab_parallel_token_logprobs(x, torch.full((6,), 9))
    finally:
        dist.destroy_process_group()


def test_compiled_caller_gets_a_graph_break(tmp_path):
    """Under torch.compile (not fullgraph) the op runs eagerly inside the compiled function, gradients included."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        x = torch.randn(4, 6, requires_grad=True)
        labels = torch.tensor([0, 5, -100, 2])

        def loss(x):
            return (vp.vocab_parallel_token_logprobs(x * 2, labels, return_entropy=True)[0] ** 2).sum()

        got = torch.compile(loss, backend="eager")(x)
        (grad,) = torch.autograd.grad(got, x)
        xw = x.detach().requires_grad_()
        want = (fastpo.token_logprobs(xw * 2, labels) ** 2).sum()
        want.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(grad, xw.grad)
    finally:
        dist.destroy_process_group()


def test_needs_an_initialised_process_group():
    x, labels = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        vp.vocab_parallel_token_logprobs(x, labels)
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        vp.vocab_parallel_linear_token_logprobs(torch.randn(3, 2), torch.randn(4, 2), labels)
