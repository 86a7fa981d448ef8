"""fastpo._C.gae directly: results against the reference, zero-copy outputs, and argument checking
(every violation raises before any output is written)."""

import numpy as np
import pytest
import torch

import fastpo
from fastpo import _C


def _case(n=12, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, v = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    m = torch.rand(n, generator=g) > 0.3
    cu = torch.tensor([0, 5, 5, n], dtype=torch.int64)
    return r, v, m, cu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, None])
def test_matches_reference(dtype, mask_dtype):
    r, v, m, cu = _case(dtype=dtype)
    adv, ret = torch.full_like(r, 7.0), torch.full_like(r, 7.0)
    mask = None if mask_dtype is None else m.to(mask_dtype)
    _C.gae(r.numpy(), v.numpy(), None if mask is None else mask.numpy(), cu.numpy(), adv.numpy(), ret.numpy(), 0.9, 0.8)
    want = fastpo.reference.gae(r, v, None if mask is None else m, gamma=0.9, lam=0.8, cu_seqlens=cu)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(adv, want[0], atol=tol, rtol=tol)
    torch.testing.assert_close(ret, want[1], atol=tol, rtol=tol)


def test_parallel_path_matches_serial():
    """Enough tokens to wake the OpenMP team (uneven sequence lengths, dynamic schedule)."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 200_000, (48,), generator=g)  # > 2^22 tokens: the parallel path
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(cu[-1])
    r, v, m = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64), \
        torch.rand(n, generator=g) > 0.2
    adv, ret = torch.empty_like(r), torch.empty_like(r)
    _C.gae(r.numpy(), v.numpy(), m.numpy(), cu.numpy(), adv.numpy(), ret.numpy(), 0.99, 0.95)
    for i in range(0, 48, 7):  # one sequence at a time (serial path)
        s, e = int(cu[i]), int(cu[i + 1])
        a1, r1 = torch.empty(e - s, dtype=torch.float64), torch.empty(e - s, dtype=torch.float64)
        _C.gae(r[s:e].numpy(), v[s:e].numpy(), m[s:e].numpy(), np.array([0, e - s], dtype=np.int64), a1.numpy(),
               r1.numpy(), 0.99, 0.95)
        assert torch.equal(a1, adv[s:e]) and torch.equal(r1, ret[s:e])


def _args():
    r, v, m, cu = _case()
    return dict(rewards=r.numpy(), values=v.numpy(), mask=m.numpy(), cu_seqlens=cu.numpy(),
                advantages=np.zeros(12, np.float32), returns=np.zeros(12, np.float32), gamma=0.9, lam=0.9)


def _readonly(a):
    a = a.copy()
    a.setflags(write=False)
    return a


BAD = [
    ("rewards 2-D", dict(rewards=np.zeros((3, 4), np.float32)), "rewards"),
    ("rewards int", dict(rewards=np.zeros(12, np.int32)), "rewards"),
    ("values length", dict(values=np.zeros(11, np.float32)), "values"),
    ("values float64", dict(values=np.zeros(12, np.float64)), "values"),
    ("values strided", dict(values=np.zeros(24, np.float32)[::2]), "contiguous"),
    ("mask float", dict(mask=np.ones(12, np.float32)), "mask"),
    ("mask length", dict(mask=np.ones(10, np.bool_)), "mask"),
    ("cu int32", dict(cu_seqlens=np.array([0, 12], np.int32)), "cu_seqlens"),
    ("cu decreasing", dict(cu_seqlens=np.array([0, 8, 4, 12], np.int64)), "cu_seqlens"),
    ("cu end", dict(cu_seqlens=np.array([0, 4, 11], np.int64)), "cu_seqlens"),
    ("cu start", dict(cu_seqlens=np.array([1, 4, 12], np.int64)), "cu_seqlens"),
    ("cu empty", dict(cu_seqlens=np.zeros(0, np.int64)), "cu_seqlens"),
    ("read-only output", dict(advantages=_readonly(np.zeros(12, np.float32))), "advantages"),
    ("output dtype", dict(returns=np.zeros(12, np.float64)), "returns"),
    ("gamma nan", dict(gamma=float("nan")), "gamma"),
]


@pytest.mark.parametrize("name,override,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_raise_before_writing(name, override, fragment):
    args = _args()
    args.update(override)
    outs = [args["advantages"].copy(), args["returns"].copy()]
    with pytest.raises(ValueError, match=fragment):
        _C.gae(**args)
    np.testing.assert_array_equal(args["advantages"], outs[0])
    np.testing.assert_array_equal(args["returns"], outs[1])


def test_overlapping_outputs_rejected():
    args = _args()
    buf = np.zeros(13, np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        _C.gae(**{**args, "advantages": buf[:12], "returns": buf[1:]})
    with pytest.raises(ValueError, match="overlaps an input"):
        _C.gae(**{**args, "advantages": args["rewards"]})


def test_not_a_buffer_is_type_error():
    with pytest.raises(TypeError, match="rewards"):
        _C.gae(**{**_args(), "rewards": [0.0] * 12})
