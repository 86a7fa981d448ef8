"""The C++ Clip-Cov / KL-Cov selection pass (csrc/selection.h) against the torch path of
fastpo.ops.token_selection, bit for bit (same candidates, same draw, same top-k)."""

import pytest
import torch

from fastpo import _C
from fastpo.ops import token_selection as ts


def _inputs(B, T, dtype, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = -torch.rand(B, T, generator=g, dtype=torch.float64).to(dtype) * 3
    old = x + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).to(dtype).expand(B, T).contiguous()
    if ties:  # GRPO-like: one advantage per row and a few distinct log-probs, so many cov values tie
        x = (x * 4).round() / 4
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return x, old, adv, mask


def _torch_path(monkeypatch, fn, *args, **kw):
    with monkeypatch.context() as mp:
        mp.setattr(ts, "_fused", lambda *t: False)
        return fn(*args, **kw)


class _Count:
    def __init__(self, monkeypatch, name):
        self.n, real = 0, getattr(_C, name)

        def wrapped(*a, **k):
            self.n += 1
            return real(*a, **k)
        monkeypatch.setattr(ts, "_C", type("C", (), {"clip_cov_candidates": staticmethod(wrapped),
                                                     "cov_topk": staticmethod(wrapped),
                                                     "masked_sums": staticmethod(_C.masked_sums)}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_cov_equals_torch_path(dtype, seed, monkeypatch):
    x, old, adv, mask = _inputs(7, 300, dtype, seed, ties=seed == 2)
    kw = dict(clip_low=0.2, clip_high=0.28, clip_cov_ratio=0.05, clip_cov_lb=-0.5, clip_cov_ub=1.5)
    want = _torch_path(monkeypatch, ts.clip_cov_weights, x, old, adv, mask,
                       generator=torch.Generator().manual_seed(5), **kw)
    calls = _Count(monkeypatch, "clip_cov_candidates")
    got = ts.clip_cov_weights(x, old, adv, mask, generator=torch.Generator().manual_seed(5), **kw)
    assert calls.n == 1
    assert (want == 0).sum() > 0 and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_clip_cov_candidates_equal_torch(dtype, seed):
    """The candidate set itself (not only the draw from it), incl. ratios on the clip bounds."""
    x, old, adv, mask = _inputs(5, 400, dtype, seed)
    old[0, :50] = x[0, :50] - torch.log(torch.tensor(1.2, dtype=dtype))  # r on/near 1 + clip_high
    m = mask.clone()
    mean_a, mean_x, _ = ts._means_and_count(adv, x, m, None)
    ratio = torch.exp(x - old)
    clipped = (-adv * torch.clamp(ratio, 0.8, 1.2) > -adv * ratio) & m
    cov = torch.where(m & ~clipped, (adv - mean_a) * (x - mean_x), torch.tensor(-float("inf"), dtype=dtype))
    want = torch.nonzero(((cov < 0.7) & (cov > -0.3) & m).reshape(-1), as_tuple=True)[0]
    got = _C.clip_cov_candidates(ts._np(x), ts._np(old), ts._np(adv), ts._np(m), float(mean_a), float(mean_x),
                                 ts._as(0.8, x), ts._as(1.2, x), ts._as(-0.3, x), ts._as(0.7, x))
    assert want.numel() > 0 and torch.equal(torch.from_numpy(got), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ratio", [0.01, 0.1, 1.0])
def test_kl_cov_equals_torch_path(dtype, ratio, monkeypatch):
    x, old, adv, mask = _inputs(6, 257, dtype, 3)
    want = _torch_path(monkeypatch, ts.kl_cov_tokens, x, adv, mask, kl_cov_ratio=ratio)
    calls = _Count(monkeypatch, "cov_topk")
    got = ts.kl_cov_tokens(x, adv, mask, kl_cov_ratio=ratio)
    assert calls.n == 1 and want.sum() > 0 and torch.equal(got, want)


def test_kl_cov_ties_take_the_lower_index(monkeypatch):
    """With ties at the k-th value the same values are selected as torch.topk's, the lowest indices
    among the tied ones (torch.topk leaves that order unspecified)."""
    x, old, adv, mask = _inputs(8, 64, torch.float32, 4, ties=True)
    m = mask.reshape(-1)
    mean_a, mean_x, count = ts._means_and_count(adv, x, mask, None)
    cov = ((adv - mean_a) * (x - mean_x)).reshape(-1)
    c = cov[torch.nonzero(m, as_tuple=True)[0]]
    v, n = torch.unique(c, return_counts=True)
    tie = v[n >= 3][-1]  # the largest value held by 3+ tokens: k cuts through it
    k = int((c > tie).sum()) + 1
    vals, idx = (torch.from_numpy(t) for t in _C.cov_topk(ts._np(x), ts._np(adv), ts._np(mask), float(mean_a),
                                                          float(mean_x), k))
    flat = torch.nonzero(m, as_tuple=True)[0]
    ref = torch.topk(cov[flat], k).values
    assert torch.equal(vals, ref) and torch.equal(cov[idx], vals)
    kth = vals[-1]
    tied = flat[cov[flat] == kth]
    assert (cov[flat] > kth).sum() < k < (cov[flat] >= kth).sum()  # the boundary is a tie
    assert torch.equal(idx[vals == kth].sort().values, tied[:int((vals == kth).sum())])


def test_kl_cov_nan_counts_as_largest():
    x = torch.tensor([0.0, float("nan"), 1.0, 2.0])
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    mask = torch.tensor([True, True, True, False])
    vals, idx = _C.cov_topk(x.numpy(), adv.numpy(), mask.numpy(), 0.0, 0.0, 2)
    assert list(idx) == [1, 0]


def test_empty_and_all_masked():
    x = torch.zeros(0)
    assert len(_C.clip_cov_candidates(x.numpy(), x.numpy(), x.numpy(), torch.zeros(0, dtype=torch.bool).numpy(),
                                      0.0, 0.0, 0.8, 1.2, 1.0, 5.0)) == 0
    x, old, adv, mask = _inputs(3, 10, torch.float32, 0)
    none = torch.zeros_like(mask)
    assert ts.kl_cov_tokens(x, adv, none, kl_cov_ratio=0.5).sum() == 0
    assert torch.equal(ts.clip_cov_weights(x, old, adv, none, clip_cov_ratio=0.5), torch.ones_like(x))


def test_kernel_argument_errors():
    f, d = torch.zeros(4), torch.zeros(4, dtype=torch.float64)
    m = torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="advantages"):
        _C.cov_topk(f.numpy(), d.numpy(), m.numpy(), 0.0, 0.0, 1)
    with pytest.raises(ValueError, match="mask"):
        _C.cov_topk(f.numpy(), f.numpy(), torch.ones(3, dtype=torch.bool).numpy(), 0.0, 0.0, 1)
    with pytest.raises(ValueError, match="k"):
        _C.cov_topk(f.numpy(), f.numpy(), m.numpy(), 0.0, 0.0, -1)
    with pytest.raises(ValueError, match="old_logp"):
        _C.clip_cov_candidates(f.numpy(), torch.zeros(5).numpy(), f.numpy(), m.numpy(), 0.0, 0.0, 0.8, 1.2, 1.0, 5.0)


def test_non_contiguous_and_mixed_dtypes_take_the_torch_path(monkeypatch):
    x, old, adv, mask = _inputs(4, 50, torch.float32, 1)
    want = ts.kl_cov_tokens(x, adv, mask, kl_cov_ratio=0.2)
    calls = _Count(monkeypatch, "cov_topk")
    assert torch.equal(ts.kl_cov_tokens(x, adv[:, :1].expand(4, 50), mask, kl_cov_ratio=0.2), want)
    assert torch.equal(ts.kl_cov_tokens(x, adv.double(), mask, kl_cov_ratio=0.2),
                       _torch_path(monkeypatch, ts.kl_cov_tokens, x, adv.double(), mask, kl_cov_ratio=0.2))
    assert calls.n == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_test_edges_equal_torch(dtype):
    """Log-ratios on and around log(1 ± clip) (inside and outside the kernel's no-exp margins), ±inf /
    NaN log-ratios, and zero, subnormal, huge, infinite and NaN advantages: the same candidates."""
    lo, hi = 0.8, 1.28
    ds = []
    for b in (torch.tensor(lo, dtype=torch.float64).log(), torch.tensor(hi, dtype=torch.float64).log()):
        for e in (0.0, 1e-7, 3e-6, 1e-5, 2e-5, 1e-3):
            ds += [b + e, b - e]
    ds = torch.tensor(ds + [0.0, 1e3, -1e3, float("inf"), -float("inf"), float("nan")], dtype=torch.float64)
    advs = torch.tensor([1.0, -1.0, 0.0, 1e-40, -1e-40, 1e-31, -1e31, float("inf"), -float("inf"), float("nan"),
                         0.5, -2.0], dtype=torch.float64)
    d, a = (t.reshape(-1).to(dtype) for t in torch.meshgrid(ds, advs, indexing="ij"))
    x = torch.full_like(d, -1.0)
    old = x - d
    m = torch.ones_like(d, dtype=torch.bool)
    ratio = torch.exp(x - old)
    clipped = (-a * torch.clamp(ratio, ts._as(lo, x), ts._as(hi, x)) > -a * ratio) & m
    want = torch.nonzero(~clipped, as_tuple=True)[0]
    # lb/ub wide open and means 0, 0 with x = -1: cov = -a, so only the clip test and NaN / inf cov decide
    got = torch.from_numpy(_C.clip_cov_candidates(ts._np(x), ts._np(old), ts._np(a), ts._np(m), 0.0, 0.0,
                                                  ts._as(lo, x), ts._as(hi, x), -float("inf"), float("inf")))
    cov = -a
    want = want[((cov[want] < float("inf")) & (cov[want] > -float("inf")))]
    assert torch.equal(got, want)


@pytest.mark.parametrize("fused", [True, False])
def test_kl_cov_index_is_the_selection(fused, monkeypatch):
    x, old, adv, mask = _inputs(5, 120, torch.float32, 7)
    if not fused:
        monkeypatch.setattr(ts, "_fused", lambda *t: False)
    index, count = ts.kl_cov_index(x, adv, mask.float(), kl_cov_ratio=0.05)
    sel = ts.kl_cov_tokens(x, adv, mask, kl_cov_ratio=0.05)
    assert count == int(mask.sum()) and index.dtype == torch.int64
    assert index.numel() == max(1, int(count * 0.05)) and torch.equal(index, torch.nonzero(sel.view(-1))[:, 0])
    empty, n = ts.kl_cov_index(x, adv, torch.zeros_like(mask), kl_cov_ratio=0.05)
    assert n == 0 and empty.numel() == 0
