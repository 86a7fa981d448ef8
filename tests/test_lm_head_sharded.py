"""Sharded lm_heads for the fused linear ops (fastpo.ops.lm_head): a ZeRO-3 style partitioned weight gathered
by a ``weight_gather`` context for the forward and again for the backward's recompute (a fake gather that
swaps a placeholder's data and counts entries: deepspeed is not installed), and an FSDP2 DTensor weight
gathered once per call whose gradient reaches the DTensor parameter, averaged over a 2-rank gloo mesh.

``gathered_linear_token_logprobs`` below is the call-site wiring proposed for linear_token_logprobs
(resolve the DTensor, gather around the forward, re-gather around the backward node)."""

from __future__ import annotations

import importlib
from contextlib import contextmanager

import pytest
import torch

import fastpo
from helpers import run_two_gloo_ranks
from fastpo.ops.lm_head import gather_in_backward, head_gather, resolve_head_weight

ltl = importlib.import_module("fastpo.ops.linear_token_logprobs")  # the module (fastpo.ops re-exports the function)


def gathered_linear_token_logprobs(hidden, weight, labels, *, bias=None, weight_gather=None, **kwargs):
    weight, bias = resolve_head_weight(weight, hidden.dtype), resolve_head_weight(bias, hidden.dtype)
    with head_gather(weight_gather, weight, bias):
        out = fastpo.linear_token_logprobs(hidden, weight, labels, bias=bias, **kwargs)
    gather_in_backward(out, weight_gather, weight, bias)
    return out


class FakeZero3:
    """Parameters partitioned to numel 0 outside ``gather(...)``; entering it restores their full data (as
    deepspeed.zero.GatheredParameters does), leaving it empties them again."""

    def __init__(self, *full):
        self.full = {}
        self.params = []
        for t in full:
            p = torch.nn.Parameter(torch.empty(0, dtype=t.dtype))
            self.full[id(p)] = t
            self.params.append(p)
        self.entries = []

    @contextmanager
    def gather(self, *params):
        params = [p for p in params if p is not None]
        self.entries.append(torch.is_grad_enabled())
        for p in params:
            p.data = self.full[id(p)]
        try:
            yield
        finally:
            for p in params:
                p.data = torch.empty(0, dtype=p.dtype)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("labels_2d", [False, True])
def test_zero3_gather_once_for_forward_and_once_for_backward(with_bias, labels_2d):
    g = torch.Generator().manual_seed(0)
    n, d, vocab = 12, 5, 9
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, d, generator=g, dtype=torch.float64)
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[3] = -100
    zero = FakeZero3(w, *([b] if with_bias else []))
    weight, bias = zero.params[0], (zero.params[1] if with_bias else None)
    wl, we = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    shaped = (lambda t: t.view(3, 4, *t.shape[1:])) if labels_2d else (lambda t: t)

    hs = h.clone().requires_grad_()
    logp, ent = gathered_linear_token_logprobs(shaped(hs), weight, shaped(labels), bias=bias, weight_gather=zero.gather,
                                               return_entropy=True, chunk_size=5)
    assert len(zero.entries) == 1 and weight.numel() == 0  # forward: one gather, partitioned again after
    (logp.reshape(-1) * wl + ent.reshape(-1) * we).sum().backward()
    assert len(zero.entries) == 2 and weight.numel() == 0  # backward: one more, for the whole recompute

    hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
    bf = b.clone().requires_grad_() if with_bias else None
    want = fastpo.linear_token_logprobs(hf, wf, labels, bias=bf, return_entropy=True)
    (want[0] * wl + want[1] * we).sum().backward()
    torch.testing.assert_close(logp.reshape(-1), want[0])
    torch.testing.assert_close(hs.grad, hf.grad)
    torch.testing.assert_close(weight.grad, wf.grad)
    if with_bias:
        torch.testing.assert_close(bias.grad, bf.grad)


def test_zero3_without_the_backward_gather_fails():
    """The recompute really reads the gathered weight: without re-entering the gather the backward sees
    the empty placeholder (so the test above can fail)."""
    g = torch.Generator().manual_seed(1)
    zero = FakeZero3(torch.randn(7, 4, generator=g))
    h = torch.randn(6, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 7, (6,), generator=g)
    with head_gather(zero.gather, zero.params[0], None):
        logp = fastpo.linear_token_logprobs(h, zero.params[0], labels)
    with pytest.raises(RuntimeError):
        logp.sum().backward()


def test_nested_gathers_enter_once():
    zero = FakeZero3(torch.randn(5, 3))
    p = zero.params[0]
    with head_gather(zero.gather, p, None):
        with head_gather(zero.gather, p, None):
            assert p.numel() == 15
        assert p.numel() == 15  # the inner exit did not partition the head under the outer gather
    assert p.numel() == 0 and len(zero.entries) == 1


def test_outputs_tuple_with_logp_not_asked():
    """gather_in_backward finds the fused node from a LogProbOutputs whose first field is None."""
    g = torch.Generator().manual_seed(2)
    zero = FakeZero3(torch.randn(6, 3, generator=g, dtype=torch.float64))
    h = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 5, 2, -100])
    out = gathered_linear_token_logprobs(h, zero.params[0], labels, weight_gather=zero.gather,
                                         outputs=("entropy", "is_top1"))
    out.entropy.sum().backward()
    assert len(zero.entries) == 2 and zero.params[0].grad.shape == (6, 3)


def test_weight_gather_must_be_callable_and_plain_weights_pass_through():
    w = torch.randn(3, 2)
    assert resolve_head_weight(w, torch.float64) is w and resolve_head_weight(None) is None
    with pytest.raises(TypeError, match="weight_gather must be a callable"):
        head_gather(3, w, None)
    with pytest.raises(ValueError, match="grad_reduce"):
        resolve_head_weight(w, grad_reduce="mean")


# --------------------------------------------------------------------------------------------- FSDP2
def _rank_data(rank, n, d, vocab):
    g = torch.Generator().manual_seed(10 + rank)
    h = torch.randn(n, d, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    return h, labels, torch.randn(n, generator=g)


def _fsdp_rank(rank, port, queue):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    failures = []
    try:
        mesh = init_device_mesh("cpu", (2,))
        n, d, vocab = 10, 4, 12
        w = torch.randn(vocab, d, generator=torch.Generator().manual_seed(3))
        b = torch.randn(vocab, generator=torch.Generator().manual_seed(4))
        for dtype in (torch.float32, torch.bfloat16):  # bfloat16: a float32 shard under mixed precision
            wd = torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)]))
            bd = torch.nn.Parameter(distribute_tensor(b, mesh, [Shard(0)]))
            h, labels, wl = _rank_data(rank, n, d, vocab)
            chunks = []
            real = ltl.chunk_logits

            def plain_chunks(hidden, weight, bias):
                chunks.append(isinstance(weight, DTensor) or isinstance(bias, DTensor))
                return real(hidden, weight, bias)

            ltl.chunk_logits = plain_chunks
            try:
                logp = gathered_linear_token_logprobs(h.to(dtype), wd, labels, bias=bd, chunk_size=3)
                (logp.double() * wl).sum().backward()
            finally:
                ltl.chunk_logits = real
            if len(chunks) != 8 or any(chunks):  # 4 chunks forward + 4 recomputed, all on the gathered tensor
                failures.append(f"{dtype}: chunks {chunks}")
            if not isinstance(wd.grad, DTensor) or wd.grad.placements != (Shard(0),) or wd.grad.dtype != torch.float32:
                failures.append(f"{dtype}: weight grad {type(wd.grad).__name__} {getattr(wd.grad, 'placements', '')}")
                continue
            # each rank's own loss; the sharded gradient is the mean over the two ranks (FSDP2's averaging)
            grads_w, grads_b = [], []
            for r in range(2):
                hr, lr, wlr = _rank_data(r, n, d, vocab)
                wf = w.to(dtype).clone().requires_grad_()
                bf = b.to(dtype).clone().requires_grad_()
                (fastpo.linear_token_logprobs(hr.to(dtype), wf, lr, bias=bf).double() * wlr).sum().backward()
                grads_w.append(wf.grad.float())
                grads_b.append(bf.grad.float())
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            for name, got, want in (("weight", wd.grad, grads_w), ("bias", bd.grad, grads_b)):
                full = got.full_tensor()
                if not torch.allclose(full, (want[0] + want[1]) / 2, atol=tol, rtol=tol):
                    failures.append(f"{dtype}: {name} grad is not the mean over ranks")
                if torch.allclose(full, want[rank], atol=tol, rtol=tol):
                    failures.append(f"{dtype}: {name} grad is this rank's alone")
    except Exception:
        import traceback
        failures.append(traceback.format_exc())
    finally:
        queue.put((rank, failures))
        dist.barrier()
        dist.destroy_process_group()


def test_fsdp2_dtensor_weight_two_ranks():
    run_two_gloo_ranks(_fsdp_rank, timeout=300)
