"""fastpo.gae: reference vs C++ vs Triton (interpreter on CPU), padded and packed, masked holes,
long sequences in several blocks, edge cases, torch.compile and opcheck."""

import itertools

import pytest
import torch

import fastpo
from fastpo.kernels import gae as triton_gae
from fastpo.ops import cpu_advantages
from helpers import assert_raises_unmodified

GRID = list(itertools.product([0.0, 0.9, 0.95, 1.0], [0.0, 0.9, 0.95, 1.0]))


def _batch(b, t, *, seed=0, hole_fraction=0.3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, t, generator=g).to(dtype)
    values = torch.randn(b, t, generator=g).to(dtype)
    mask = torch.rand(b, t, generator=g) > hole_fraction
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    mask &= torch.arange(t)[None, :] < lengths[:, None]  # ragged ends plus holes inside
    return rewards, values, mask


def _close(got, want, dtype=torch.float32):
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=tol, rtol=tol)


def test_hand_worked_example(backend):
    # t=2: δ = 3 − 1.5 = 1.5, A = 1.5, R = 3;  t=1 masked: 0, 0 (skipped);
    # t=0: δ = 1 + 0.9·1.5 − 0.5 = 1.85, A = 1.85 + 0.9·0.5·1.5 = 2.525, R = 3.025.
    rewards = torch.tensor([[1.0, 2.0, 3.0]], device=backend)
    values = torch.tensor([[0.5, 1.0, 1.5]], device=backend)
    mask = torch.tensor([[1, 0, 1]], device=backend)
    adv, ret = fastpo.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    _close(adv, torch.tensor([[2.525, 0.0, 1.5]]))
    _close(ret, torch.tensor([[3.025, 0.0, 3.0]]))


@pytest.mark.parametrize("gamma,lam", GRID)
def test_matches_reference_padded(backend, gamma, lam):
    rewards, values, mask = _batch(4, 13, seed=int(gamma * 100 + lam * 10))
    want = fastpo.reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
    got = fastpo.gae(rewards.to(backend), values.to(backend), mask.to(backend), gamma=gamma, lam=lam)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == (4, 13)
        _close(g, w)


def test_matches_verl_loop_without_mask(backend):
    """With every token counted, GAE is the textbook reversed loop (verl's compute_gae_advantage_return)."""
    rewards, values, _ = _batch(3, 9, seed=3)
    gamma, lam = 0.99, 0.95
    last, rev = torch.zeros(3), []
    for t in reversed(range(9)):
        nxt = values[:, t + 1] if t < 8 else torch.zeros(3)
        last = rewards[:, t] + gamma * nxt - values[:, t] + gamma * lam * last
        rev.append(last)
    want = torch.stack(rev[::-1], 1)
    adv, ret = fastpo.gae(rewards.to(backend), values.to(backend), gamma=gamma, lam=lam)
    _close(adv, want)
    _close(ret, want + values)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(backend, dtype):
    rewards, values, mask = _batch(3, 10, seed=5, dtype=dtype)
    want = fastpo.reference.gae(rewards, values, mask, gamma=0.95, lam=0.9)
    got = fastpo.gae(rewards.to(backend), values.to(backend), mask.to(backend), gamma=0.95, lam=0.9)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for g, w in zip(got, want):
        assert g.dtype == expected_dtype
        _close(g, w, dtype)


def test_packed_equals_padded(backend):
    rewards, values, mask = _batch(4, 7, seed=7)
    mask[2] = False  # a fully masked sequence
    padded = fastpo.gae(rewards.to(backend), values.to(backend), mask.to(backend), gamma=0.9, lam=0.95)
    # The same tokens packed: sequence i keeps its first `len_i` positions (ragged lengths, empty ones too).
    lengths = [7, 3, 0, 5]
    keep = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    cu = torch.tensor([0, 7, 10, 10, 15])
    packed = fastpo.gae(rewards[keep].to(backend), values[keep].to(backend), mask[keep].to(backend),
                        gamma=0.9, lam=0.95, cu_seqlens=cu.to(backend))
    truncated = fastpo.reference.gae(rewards, values, mask & keep, gamma=0.9, lam=0.95)
    for p, t in zip(packed, truncated):
        _close(p, t[keep])
    # A packed batch of full-length sequences is the padded batch.
    full = fastpo.gae(rewards.reshape(-1).to(backend), values.reshape(-1).to(backend), mask.reshape(-1).to(backend),
                      gamma=0.9, lam=0.95, cu_seqlens=torch.arange(0, 29, 7).to(backend))
    for f, p in zip(full, padded):
        _close(f, p.reshape(-1))


def test_single_token_and_empty(backend):
    r, v = torch.tensor([[2.0], [1.0]], device=backend), torch.tensor([[0.5], [4.0]], device=backend)
    adv, ret = fastpo.gae(r, v, torch.tensor([[True], [False]], device=backend), gamma=0.9, lam=0.9)
    _close(adv, torch.tensor([[1.5], [0.0]]))
    _close(ret, torch.tensor([[2.0], [0.0]]))
    adv, ret = fastpo.gae(torch.zeros(0, 5, device=backend), torch.zeros(0, 5, device=backend))
    assert adv.shape == ret.shape == (0, 5)
    empty = torch.zeros(0, device=backend)
    adv, ret = fastpo.gae(empty, empty, cu_seqlens=torch.zeros(3, dtype=torch.int64, device=backend))
    assert adv.shape == (0,)


def test_masked_padding_never_leaks(backend):
    """inf/NaN in masked positions (garbage padding) must not reach any output."""
    rewards, values, mask = _batch(3, 8, seed=11)
    want = fastpo.reference.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    rewards = rewards.masked_fill(~mask, float("nan"))
    values = values.masked_fill(~mask, float("inf"))
    got = fastpo.gae(rewards.to(backend), values.to(backend), mask.to(backend), gamma=1.0, lam=1.0)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        _close(g, w)


@pytest.mark.parametrize("launcher", [triton_gae.gae_scan, cpu_advantages.gae_scan], ids=["triton", "cpu"])
@pytest.mark.parametrize("with_mask", [True, False])
def test_long_sequences_span_several_blocks(launcher, with_mask):
    """Blocks of 4 tokens: sequences of 0..23 tokens cross up to six block boundaries (carried state)."""
    g = torch.Generator().manual_seed(13)
    cu = torch.tensor([0, 23, 23, 24, 32, 37, 50])
    n = int(cu[-1])
    rewards, values = torch.randn(n, generator=g), torch.randn(n, generator=g)
    mask = (torch.rand(n, generator=g) > 0.35) if with_mask else None
    mask_arg = mask if mask is None else mask.contiguous()
    for gamma, lam in [(0.95, 0.9), (1.0, 1.0), (0.9, 0.0)]:
        want = fastpo.reference.gae(rewards, values, mask, gamma=gamma, lam=lam, cu_seqlens=cu)
        got = launcher(rewards, values, mask_arg, cu, gamma, lam, block=4)
        for a, b in zip(got, want):
            _close(a, b)


def test_no_gradient_and_inputs_untouched(backend):
    rewards, values, mask = _batch(2, 6, seed=17)
    rewards, values = rewards.to(backend).requires_grad_(), values.to(backend).requires_grad_()
    before = (rewards.detach().clone(), values.detach().clone())
    adv, ret = fastpo.gae(rewards, values, mask.to(backend))
    assert not adv.requires_grad and not ret.requires_grad
    assert torch.equal(rewards.detach(), before[0]) and torch.equal(values.detach(), before[1])


ERROR_CASES = [
    ("integer rewards", dict(rewards=torch.ones(2, 3, dtype=torch.long)), TypeError, "rewards"),
    ("values shape", dict(values=torch.zeros(2, 4)), ValueError, "values"),
    ("3-D rewards", dict(rewards=torch.zeros(2, 3, 1), values=torch.zeros(2, 3, 1)), ValueError, "rewards"),
    ("mask shape", dict(mask=torch.ones(3, 2)), ValueError, "mask"),
    ("gamma > 1", dict(gamma=1.5), ValueError, "gamma"),
    ("negative lam", dict(lam=-0.1), ValueError, "lam"),
    ("nan gamma", dict(gamma=float("nan")), ValueError, "gamma"),
    ("string lam", dict(lam="0.9"), TypeError, "lam"),
    ("packed rewards 2-D", dict(cu_seqlens=torch.tensor([0, 6])), ValueError, "rewards"),
    ("cu_seqlens short", dict(rewards=torch.zeros(6), values=torch.zeros(6), mask=None,
                              cu_seqlens=torch.tensor([0, 4])), ValueError, "cu_seqlens"),
    ("cu_seqlens decreasing", dict(rewards=torch.zeros(6), values=torch.zeros(6), mask=None,
                                   cu_seqlens=torch.tensor([0, 4, 2, 6])), ValueError, "cu_seqlens"),
    ("float cu_seqlens", dict(rewards=torch.zeros(6), values=torch.zeros(6), mask=None,
                              cu_seqlens=torch.tensor([0.0, 6.0])), TypeError, "cu_seqlens"),
]


@pytest.mark.parametrize("name,override,exc,fragment", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
@pytest.mark.parametrize("backend_name", ["cpu", "triton", "reference"])
def test_errors(monkeypatch, backend_name, name, override, exc, fragment):
    monkeypatch.setenv("FASTPO_BACKEND", backend_name)
    kwargs = dict(rewards=torch.randn(2, 3), values=torch.randn(2, 3), mask=torch.ones(2, 3))
    kwargs.update(override)
    assert_raises_unmodified(fastpo.gae, kwargs, exc, match=fragment)


def test_compile_fullgraph(cpu_backend):
    rewards, values, mask = _batch(3, 8, seed=19)
    cu = torch.tensor([0, 5, 5, 24])

    def fn(r, v, m):
        adv, ret = fastpo.gae(r, v, m, gamma=0.99, lam=0.95)
        adv_p, _ = fastpo.gae(r.reshape(-1), v.reshape(-1), m.reshape(-1), cu_seqlens=cu)
        return adv * 2 + ret, adv_p

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    for got, want in zip(compiled(rewards, values, mask), fn(rewards, values, mask)):
        _close(got, want)


def test_opcheck():
    rewards, values, mask = _batch(3, 5, seed=23)
    cu = torch.tensor([0, 5, 10, 15])
    torch.library.opcheck(torch.ops.fastpo.gae.default,
                          (rewards.reshape(-1), values.reshape(-1), mask.reshape(-1), cu,
                           torch.tensor([0.9, 0.95], dtype=torch.float64), 5, "cpu"))
    torch.library.opcheck(torch.ops.fastpo.gae.default,
                          (rewards.reshape(-1).double(), values.reshape(-1).double(), None, cu,
                           torch.tensor([1.0, 1.0], dtype=torch.float64), 15, "cpu"))
