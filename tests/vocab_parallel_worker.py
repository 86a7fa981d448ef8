"""One gloo rank of tests/test_vocab_parallel.py: every case compares the vocab-parallel ops on this rank's
shard against the single-process op on the whole vocabulary (computed here from the same seeded tensors),
forward and backward. Returns a list of failure messages (empty: all passed) through the queue."""

from __future__ import annotations

import os
import traceback

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the Triton kernels on CPU tensors

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fastpo  # noqa: E402
from fastpo.ops import vocab_parallel as vp  # noqa: E402
from fastpo.reference.logprobs import transform_logits  # noqa: E402

ALL = ("logp", "entropy", "log_sum_sq_probs", "is_top1", "mean_logits")
TRUNC_OUT = ALL[:4]  # mean_logits is refused under truncation
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _close(name, got, want, tol, failures):
    if got.dtype == torch.bool or want.dtype == torch.bool:
        if not torch.equal(got, want):
            failures.append(f"{name}: {got.tolist()} != {want.tolist()}")
        return
    if not torch.allclose(got.double(), want.double(), atol=tol, rtol=tol):
        err = (got.double() - want.double()).abs().max().item()
        failures.append(f"{name}: max error {err:.3g} > {tol}")


def _logits(n, vocab, dtype, seed, special=True, ignore_index=-100, masked=True):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(n, vocab, generator=g, dtype=torch.float64)).round(decimals=1)  # rounding makes ties
    labels = torch.randint(0, vocab, (n,), generator=g)
    if special and n >= 6 and vocab >= 4:
        half = vocab // 2
        x[0, 1] = x[0, half + 1] = x[0].max() + 1   # tie across shards, label in the first: top1
        labels[0] = 1
        x[1, 0] = x[1, half] = x[1].max() + 1       # tie across shards, label in the second: not top1
        labels[1] = half
        if masked:
            x[2, :half] = float("-inf")             # a shard without mass (whose kernel max reads 0)
        x[2, half:] -= 60                           # ... above every logit of the row
        labels[2] = half + int(x[2, half:].argmax())
        labels[3] = ignore_index
        labels[4] = half - 1
        labels[5] = half
    return x.to(dtype), labels


def _grad_weights(n, seed):
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def _loss(res, wl, we):
    loss = (res.logp.double() * wl).sum()
    if res.entropy is not None:
        loss = loss + (res.entropy.double() * we).sum()
    return loss


def _token_case(rank, tag, failures, n, vocab, dtype, seed, **kw):
    ties = kw.pop("label_ties", False)
    x, labels = _logits(n, vocab, dtype, seed, ignore_index=kw.get("ignore_index", -100),
                        masked=kw.get("logit_scale", 1.0) > 0)  # a negative scale turns −inf into +inf
    if ties:  # labels on the first maximum (is_top1) of even rows, on the last one (not, when tied) of odd rows
        z = transform_logits(x, kw.get("logit_softcap"), kw.get("logit_scale", 1.0))
        at_max = (z == z.max(-1, keepdim=True).values).to(torch.int64)
        first = at_max.argmax(-1)
        last = vocab - 1 - at_max.flip(-1).argmax(-1)
        labels = torch.where(torch.arange(n) % 2 == 0, first, last)
    shard_size = vocab // 2
    cols = slice(rank * shard_size, (rank + 1) * shard_size)
    full = x.clone().requires_grad_()
    shard = x[:, cols].clone().requires_grad_()
    outputs = kw.pop("outputs", ALL)
    want = fastpo.token_logprobs(full, labels, outputs=outputs, **kw)
    got = vp.vocab_parallel_token_logprobs(shard, labels, dist.group.WORLD, outputs=outputs, **kw)
    tol = TOL[dtype]
    for name in outputs:
        _close(f"{tag} {name}", getattr(got, name), getattr(want, name), tol, failures)
    wl, we = _grad_weights(n, seed)
    _loss(want, wl, we).backward()
    _loss(got, wl, we).backward()
    _close(f"{tag} grad", shard.grad, full.grad[:, cols], tol, failures)


def _linear_case(rank, tag, failures, n, vocab, dim, dtype, seed, with_bias=False, chunk_size=None, outputs=ALL,
                 **kw):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, dim, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::5] = -100
    shard_size = vocab // 2
    rows = slice(rank * shard_size, (rank + 1) * shard_size)
    hf, wf = h.to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_()
    bf = b.to(dtype).clone().requires_grad_() if with_bias else None
    hs, ws = h.to(dtype).clone().requires_grad_(), w[rows].to(dtype).clone().requires_grad_()
    bs = b[rows].to(dtype).clone().requires_grad_() if with_bias else None
    want = fastpo.linear_token_logprobs(hf, wf, labels, bias=bf, outputs=outputs, chunk_size=chunk_size, **kw)
    seen = []
    real = vp.chunk_logits

    def counting(hidden, weight, bias):
        seen.append(hidden.shape[0])
        return real(hidden, weight, bias)

    vp.chunk_logits = counting
    try:
        got = vp.vocab_parallel_linear_token_logprobs(hs, ws, labels, dist.group.WORLD, bias=bs, outputs=outputs,
                                                      chunk_size=chunk_size, **kw)
        wl, we = _grad_weights(n, seed)
        _loss(want, wl, we).backward()
        _loss(got, wl, we).backward()
    finally:
        vp.chunk_logits = real
    tol = TOL[dtype]
    for name in outputs:
        _close(f"{tag} {name}", getattr(got, name), getattr(want, name), tol, failures)
    _close(f"{tag} grad hidden", hs.grad, hf.grad, tol, failures)
    _close(f"{tag} grad weight", ws.grad, wf.grad[rows], tol, failures)
    if with_bias:
        _close(f"{tag} grad bias", bs.grad, bf.grad[rows], tol, failures)
    if chunk_size is not None and max(seen) > chunk_size:
        failures.append(f"{tag}: a chunk of {max(seen)} rows > chunk_size {chunk_size}")


def _linear_unreduced_and_frozen(rank, failures):
    """reduce_grad_hidden=False leaves this shard's part of ∂hidden (the parts sum to the whole); a frozen
    shard gets no gradient and hidden still gets the full one."""
    g = torch.Generator().manual_seed(21)
    h, w = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(10, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (7,), generator=g)
    rows = slice(rank * 5, (rank + 1) * 5)
    hf = h.clone().requires_grad_()
    fastpo.linear_token_logprobs(hf, w, labels, return_entropy=True)[1].sum().backward()
    hs = h.clone().requires_grad_()
    _, ent = vp.vocab_parallel_linear_token_logprobs(hs, w[rows].clone(), labels, dist.group.WORLD,
                                                     return_entropy=True, reduce_grad_hidden=False)
    ent.sum().backward()
    part = hs.grad.clone()
    dist.all_reduce(part)
    _close("unreduced grad hidden (summed by the test)", part, hf.grad, 1e-10, failures)
    if torch.allclose(hs.grad, hf.grad):
        failures.append("unreduced grad hidden is already the whole")
    hs2 = h.clone().requires_grad_()
    ws = w[rows].clone()
    vp.vocab_parallel_linear_token_logprobs(hs2, ws, labels, dist.group.WORLD, return_entropy=True)[1].sum().backward()
    _close("frozen shard: grad hidden", hs2.grad, hf.grad, 1e-10, failures)
    if ws.grad is not None:
        failures.append("a frozen shard got a gradient")


def _truncation_checks(rank, failures):
    """Dropped labels: logp −inf on both ranks, finite gradients; mean_logits refused; the same thresholds on both
    ranks (the forward results gathered)."""
    x, labels = _logits(9, 14, torch.float32, 18)
    labels = x.argmin(-1)  # the row minimum: dropped by top-k 3 in every row
    shard = x[:, rank * 7:(rank + 1) * 7].clone().requires_grad_()
    logp, ent = vp.vocab_parallel_token_logprobs(shard, labels, dist.group.WORLD, top_k=3, top_p=0.9,
                                                 return_entropy=True)
    if not bool((logp == float("-inf")).all()):
        failures.append(f"dropped labels: logp {logp.tolist()}")
    (torch.where(torch.isfinite(logp), logp, 0).sum() + ent.sum()).backward()
    if not bool(torch.isfinite(shard.grad).all()):
        failures.append("dropped labels: a non-finite gradient")
    mine = torch.stack([logp, ent]).detach()
    parts = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(parts, mine)
    if not torch.equal(parts[0], parts[1]):
        failures.append("truncated results differ between ranks")
    try:
        vp.vocab_parallel_token_logprobs(shard, labels, dist.group.WORLD, top_p=0.9, outputs=ALL)
        failures.append("mean_logits under top_p did not raise")
    except ValueError as e:
        if "mean_logits" not in str(e):
            failures.append(f"mean_logits: wrong message {e}")


def _error_cases(rank, failures):
    x, labels = _logits(4, 6 if rank == 0 else 4, torch.float32, 1, special=False)
    try:  # unequal shards: both ranks raise after the one gather
        vp.vocab_parallel_token_logprobs(x, labels.clamp(max=3), dist.group.WORLD)
        failures.append("unequal shards did not raise")
    except ValueError as e:
        if "equal vocabulary shards" not in str(e):
            failures.append(f"unequal shards: wrong message {e}")
    x, labels = _logits(4, 4, torch.float32, 1, special=False)
    labels[0] = 8  # global V is 8
    try:
        vp.vocab_parallel_token_logprobs(x, labels, dist.group.WORLD)
        failures.append("label >= V did not raise")
    except ValueError as e:
        if "[0, 8)" not in str(e):
            failures.append(f"label range: wrong message {e}")


def _cases(rank, failures):
    for backend in ("cpu", "triton", "reference"):
        os.environ["FASTPO_BACKEND"] = backend
        dtypes = (torch.float32, torch.float64) if backend != "triton" else (torch.float32,)
        for dtype in dtypes:
            tag = f"[{backend} {dtype}]"
            _token_case(rank, f"{tag} token plain", failures, 9, 14, dtype, 1)
            _token_case(rank, f"{tag} token transforms", failures, 9, 14, dtype, 2, temperature=0.7,
                        logit_softcap=4.0, logit_scale=1.3)
            _token_case(rank, f"{tag} token negative scale", failures, 7, 10, dtype, 3, logit_scale=-0.5)
            temps = 0.5 + 1.5 * torch.rand(9, generator=torch.Generator().manual_seed(13), dtype=dtype)
            _token_case(rank, f"{tag} token per-token temperature", failures, 9, 14, dtype, 13, temperature=temps,
                        logit_softcap=6.0)
            # a tiny cap saturates most logits to exactly ±c: ties everywhere, across the shard boundary too
            _token_case(rank, f"{tag} token saturated softcap", failures, 9, 14, dtype, 12, logit_softcap=0.02,
                        outputs=("logp", "is_top1"), label_ties=True)
            _token_case(rank, f"{tag} token ignore_index=5", failures, 8, 12, dtype, 4, ignore_index=5,
                        outputs=("logp", "entropy", "is_top1"))
            _token_case(rank, f"{tag} token V_r=1", failures, 5, 2, dtype, 5, outputs=("logp", "entropy"))
            _token_case(rank, f"{tag} token logp only", failures, 6, 8, dtype, 6, outputs=("logp",))
            _linear_case(rank, f"{tag} linear", failures, 11, 14, 5, dtype, 7, with_bias=True, chunk_size=4,
                         temperature=1.5, logit_softcap=3.0)
            _linear_case(rank, f"{tag} linear default chunk", failures, 6, 6, 3, dtype, 8, logit_scale=0.8)
            _linear_case(rank, f"{tag} linear per-token temperature", failures, 11, 8, 3, dtype, 14, chunk_size=4,
                         temperature=0.3 + torch.rand(11, generator=torch.Generator().manual_seed(14), dtype=dtype))
            for trunc in ({"top_k": 3}, {"top_p": 0.9}, {"top_k": 3, "top_p": 0.9}):
                # the special rows: ties across the shard boundary, a shard without mass, dropped labels
                _token_case(rank, f"{tag} token {trunc}", failures, 9, 14, dtype, 15, outputs=TRUNC_OUT, **trunc)
                _linear_case(rank, f"{tag} linear {trunc}", failures, 11, 14, 5, dtype, 16, with_bias=True,
                             chunk_size=4, temperature=0.8, outputs=TRUNC_OUT, **trunc)
            # ties at the k-th value and at the top-p threshold, across the shard boundary (saturated softcap;
            # is_top1 is the kept set's first argmax in every backend)
            _token_case(rank, f"{tag} token top-k/top-p ties", failures, 9, 14, dtype, 12, logit_softcap=0.02,
                        top_k=3, top_p=0.5, outputs=TRUNC_OUT, label_ties=True)
            _token_case(rank, f"{tag} token top-p per-token temperature", failures, 9, 14, dtype, 17, top_p=0.7,
                        temperature=temps, logit_softcap=6.0, outputs=TRUNC_OUT)
        if backend == "cpu":
            _token_case(rank, f"[{backend}] token bf16", failures, 9, 14, torch.bfloat16, 9)
            _token_case(rank, f"[{backend}] token fp16", failures, 9, 14, torch.float16, 9, logit_softcap=5.0)
            _linear_case(rank, f"[{backend}] linear bf16", failures, 10, 12, 4, torch.bfloat16, 10, with_bias=True,
                         chunk_size=3)
            x = torch.randn(2, 3, 8, dtype=torch.float32, generator=torch.Generator().manual_seed(3))
            labels = torch.tensor([[1, 6, -100], [7, 0, 3]])
            cols = slice(rank * 4, (rank + 1) * 4)
            per_seq = torch.tensor([[0.7], [1.6]])  # one temperature per sequence, broadcast over its tokens
            got = vp.vocab_parallel_token_logprobs(x[..., cols], labels, dist.group.WORLD, return_entropy=True,
                                                   temperature=per_seq)
            want = fastpo.token_logprobs(x, labels, return_entropy=True, temperature=per_seq)
            _close("[cpu] 3-D layout logp", got[0], want[0], 2e-5, failures)
            _close("[cpu] 3-D layout entropy", got[1], want[1], 2e-5, failures)
            empty = vp.vocab_parallel_token_logprobs(x[:0, :, cols], labels[:0], dist.group.WORLD)
            if empty.shape != (0, 3):
                failures.append(f"empty batch: shape {tuple(empty.shape)}")
    os.environ.pop("FASTPO_BACKEND", None)
    import sys
    if "fastpo.kernels.logprobs" not in sys.modules:
        failures.append("the Triton kernels never ran")
    # equal on every rank: the forward results, gathered
    x, labels = _logits(9, 14, torch.float32, 11)
    got = vp.vocab_parallel_token_logprobs(x[:, rank * 7:(rank + 1) * 7], labels, dist.group.WORLD, outputs=ALL)
    mine = torch.stack([got.logp, got.entropy, got.log_sum_sq_probs, got.is_top1.float(), got.mean_logits])
    parts = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(parts, mine)
    if not torch.equal(parts[0], parts[1]):
        failures.append("forward results differ between ranks")
    _linear_unreduced_and_frozen(rank, failures)
    _truncation_checks(rank, failures)
    _error_cases(rank, failures)


def run(rank, port, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    failures = []
    try:
        _cases(rank, failures)
    except Exception:  # a crash is a failure to report, not a hang of the other rank
        failures.append(traceback.format_exc())
    finally:
        queue.put((rank, failures))
        dist.destroy_process_group()
