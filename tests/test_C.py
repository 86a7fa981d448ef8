"""Tests of the C++ row kernels ``fastpo._C.logprob_forward`` / ``logprob_backward``.

Everything is checked against a float64 PyTorch reference written here (log_softmax + entropy, with
the gradient from autograd): float32 / float64 / bfloat16 / float16 logits, vocabularies that are not
multiples of any block, temperatures, ignore_index rows, strided rows, optional entropy and
optional upstream gradients, the in-place backward (grad_logits is logits), extreme logits, and
every validation error (ValueError naming the argument, nothing written).
"""

import numpy as np
import pytest
import torch

from fastpo import _C

IGNORE = -100
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
NAME = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16", torch.float16: "float16"}
HALF = (torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def raw(t):
    """The numpy view the kernels take: 16-bit floats as their raw int16 bit patterns."""
    return t.view(torch.int16).numpy() if t.dtype in HALF else t.numpy()


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def randn(n, dtype, seed=11):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def make_inputs(dtype, n, v, *, seed=0, scale=3.0, ignore_rows=(1,), strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:
        big = (torch.randn(n, v + 13, generator=g, dtype=torch.float64) * scale).to(dtype)
        x = big[:, :v]
        assert not x.is_contiguous() or n <= 1
    else:
        x = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    for r in ignore_rows:
        if r < n:
            y[r] = IGNORE
    return x, y


def reference(x, y, temperature, g_logp=None, g_ent=None):
    """float64 logp, lse, entropy and dL/dlogits for L = sum(g_logp * logp) + sum(g_ent * entropy)."""
    xd = x.detach().double().requires_grad_(True)
    s = xd / temperature
    lsm = torch.log_softmax(s, dim=-1)
    valid = y != IGNORE
    idx = torch.where(valid, y, torch.zeros_like(y))
    zero = torch.zeros((), dtype=torch.float64)
    logp = torch.where(valid, lsm.gather(-1, idx[:, None])[:, 0], zero)
    entropy = torch.where(valid, -(lsm.exp() * lsm).sum(-1), zero)
    lse = torch.where(valid, torch.logsumexp(s, dim=-1), zero)
    n = x.shape[0]
    gl = torch.zeros(n, dtype=torch.float64) if g_logp is None else g_logp.double()
    gh = torch.zeros(n, dtype=torch.float64) if g_ent is None else g_ent.double()
    (grad,) = torch.autograd.grad((logp * gl).sum() + (entropy * gh).sum(), xd)
    return logp.detach(), lse.detach(), entropy.detach(), grad


def forward(x, y, temperature, *, with_entropy=True, out_dtype=None):
    """(logp, stats, entropy); stats [N, 2] holds the backward's (row_max, log_norm), written by the
    kernel through strided column views."""
    n = x.shape[0]
    od = out_dtype or acc_dtype(x.dtype)
    logp = torch.full((n,), 123.0, dtype=od)
    stats = torch.full((n, 2), 123.0, dtype=od)
    ent = torch.full((n,), 123.0, dtype=od) if with_entropy else None
    _C.logprob_forward(raw(x), y.numpy(), logp.numpy(), stats[:, 0].numpy(), stats[:, 1].numpy(),
                       None if ent is None else ent.numpy(), 1.0 / temperature, IGNORE, NAME[x.dtype])
    return logp, stats, ent


def lse_of(stats, temperature):
    """logsumexp(z / tau) = row_max / tau + log_norm, in float64."""
    return stats[:, 0].double() / temperature + stats[:, 1].double()


def backward(x, y, stats, ent, g_logp, g_ent, temperature, *, out=None):
    gx = torch.full_like(x, 7.0) if out is None else out
    _C.logprob_backward(raw(x), y.numpy(), stats[:, 0].numpy(), stats[:, 1].numpy(),
                        None if ent is None else ent.numpy(),
                        None if g_logp is None else g_logp.numpy(), None if g_ent is None else g_ent.numpy(),
                        raw(gx), 1.0 / temperature, IGNORE, NAME[x.dtype])
    return gx


def assert_rows_close(actual, expected, dtype):
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol)


def assert_grad_close(actual, expected, dtype, scale=1.0):
    """float32/64: 1e-5 relative, plus an absolute 1e-6 (1e-11 for float64) of ``scale``, the size of
    the upstream gradients (the float32 computation knows 1 - p_y for p_y ~ 1 only to ~1e-7
    absolute); 16-bit: within 1 ulp of the reference rounded to that dtype, with the same absolute
    float32-level slack (it matters only next to zero, where the 16-bit ulp is tiny)."""
    if dtype in HALF:
        ref = expected.to(dtype)
        inf = torch.tensor(float("inf"), dtype=dtype)
        ulp = torch.nextafter(ref.abs(), inf).double() - ref.abs().double()
        err = (actual.double() - ref.double()).abs()
        bad = ~(err <= ulp + 1e-6 * scale)
        assert not bad.any(), (
            f"{int(bad.sum())} entries off by more than 1 ulp; worst: actual {actual[bad][:5].tolist()} "
            f"vs reference {ref[bad][:5].tolist()}"
        )
    else:
        rtol, atol = (1e-9, 1e-11) if dtype == torch.float64 else (1e-5, 1e-6)
        torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale)


# ------------------------------------------------------------------------------------------------
# forward / backward against the reference
# ------------------------------------------------------------------------------------------------
SHAPES = [(6, 1), (6, 3), (9, 1000), (3, 50257)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NAME[d])
@pytest.mark.parametrize("n,v", SHAPES, ids=lambda s: str(s))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_matches_reference(dtype, n, v, temperature):
    x, y = make_inputs(dtype, n, v, seed=v)
    logp, stats, ent = forward(x, y, temperature)
    r_logp, r_lse, r_ent, _ = reference(x, y, temperature)
    assert logp.dtype == stats.dtype == ent.dtype == acc_dtype(dtype)
    assert_rows_close(logp, r_logp, dtype)
    assert_rows_close(lse_of(stats, temperature), r_lse, dtype)
    valid = y != IGNORE
    assert torch.equal(stats[valid, 0], x[valid].to(stats.dtype).amax(-1))  # row_max: the raw maximum
    assert_rows_close(ent, r_ent, dtype)
    ign = y == IGNORE
    assert ign.any() and (logp[ign] == 0).all() and (stats[ign] == 0).all() and (ent[ign] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NAME[d])
@pytest.mark.parametrize("n,v", SHAPES, ids=lambda s: str(s))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("grads", ["logp", "entropy", "both"])
def test_backward_matches_reference(dtype, n, v, temperature, grads):
    x, y = make_inputs(dtype, n, v, seed=v + 1)
    g = torch.Generator().manual_seed(5)
    od = acc_dtype(dtype)
    g_logp = torch.randn(n, generator=g, dtype=torch.float64).to(od) if grads != "entropy" else None
    g_ent = torch.randn(n, generator=g, dtype=torch.float64).to(od) if grads != "logp" else None
    _, stats, ent = forward(x, y, temperature, with_entropy=g_ent is not None)
    gx = backward(x, y, stats, ent, g_logp, g_ent, temperature)
    *_, r_grad = reference(x, y, temperature, g_logp, g_ent)
    assert gx.dtype == dtype and gx.shape == x.shape
    assert_grad_close(gx, r_grad, dtype)
    assert (gx[y == IGNORE] == 0).all()


def test_forward_without_entropy_matches_with_entropy():
    x, y = make_inputs(torch.float32, 5, 4099)
    a = forward(x, y, 0.7, with_entropy=True)
    b = forward(x, y, 0.7, with_entropy=False)
    assert b[2] is None
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NAME[d])
def test_parallel_rows(dtype):
    """Enough rows for the OpenMP path, several blocks per row, a ragged last block."""
    x, y = make_inputs(dtype, 64, 5000, ignore_rows=(0, 17, 63))
    g = torch.Generator().manual_seed(3)
    od = acc_dtype(dtype)
    g_logp, g_ent = torch.randn(64, generator=g).to(od), torch.randn(64, generator=g).to(od)
    logp, stats, ent = forward(x, y, 0.7)
    r_logp, r_lse, r_ent, r_grad = reference(x, y, 0.7, g_logp, g_ent)
    assert_rows_close(logp, r_logp, dtype)
    assert_rows_close(lse_of(stats, 0.7), r_lse, dtype)
    assert_rows_close(ent, r_ent, dtype)
    assert_grad_close(backward(x, y, stats, ent, g_logp, g_ent, 0.7), r_grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NAME[d])
@pytest.mark.parametrize("v", [3, 1000])
def test_strided_rows(dtype, v):
    n = 7
    x, y = make_inputs(dtype, n, v, strided=True)
    g_logp = randn(n, acc_dtype(dtype), seed=1)
    g_ent = randn(n, acc_dtype(dtype), seed=2)
    logp, stats, ent = forward(x, y, 0.7)
    r_logp, r_lse, r_ent, r_grad = reference(x, y, 0.7, g_logp, g_ent)
    assert_rows_close(logp, r_logp, dtype)
    assert_rows_close(ent, r_ent, dtype)
    # grad_logits strided too (a different row stride from the logits'); the padding stays untouched
    big = torch.full((n, v + 5), 9.0, dtype=dtype)
    gx = backward(x, y, stats, ent, g_logp, g_ent, 0.7, out=big[:, :v])
    assert_grad_close(gx, r_grad, dtype)
    assert (big[:, v:] == 9.0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NAME[d])
@pytest.mark.parametrize("same_object", [True, False])
@pytest.mark.parametrize("with_entropy_grad", [True, False])
def test_inplace_backward(dtype, same_object, with_entropy_grad):
    """grad_logits is the very memory of logits: each z_ij is read, then overwritten by its gradient."""
    n, v = 6, 1000
    x, y = make_inputs(dtype, n, v)
    od = acc_dtype(dtype)
    g_logp = randn(n, od, seed=1)
    g_ent = randn(n, od, seed=2) if with_entropy_grad else None
    logp, stats, ent = forward(x, y, 0.7)
    *_, r_grad = reference(x, y, 0.7, g_logp, g_ent)
    out_of_place = backward(x, y, stats, ent, g_logp, g_ent, 0.7)
    xn = raw(x)
    gn = xn if same_object else raw(x)
    _C.logprob_backward(xn, y.numpy(), stats[:, 0].numpy(), stats[:, 1].numpy(), ent.numpy(), g_logp.numpy(),
                        None if g_ent is None else g_ent.numpy(), gn, 1 / 0.7, IGNORE, NAME[dtype])
    assert torch.equal(x, out_of_place)  # x now holds the gradient, bit for bit the same
    assert_grad_close(x, r_grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_no_upstream_grads_gives_zeros(dtype):
    x, y = make_inputs(dtype, 4, 100)
    _, stats, ent = forward(x, y, 1.0)
    gx = backward(x, y, stats, ent, None, None, 1.0)
    assert (gx == 0).all()


def test_backward_accepts_no_entropy_when_no_entropy_grad():
    x, y = make_inputs(torch.float32, 4, 300)
    g_logp = randn(4, torch.float32)
    _, stats, _ = forward(x, y, 0.7, with_entropy=False)
    *_, r_grad = reference(x, y, 0.7, g_logp, None)
    assert_grad_close(backward(x, y, stats, None, g_logp, None, 0.7), r_grad, torch.float32)


# ------------------------------------------------------------------------------------------------
# extreme values
# ------------------------------------------------------------------------------------------------
def extreme_rows(v):
    """Rows of +-1e4, equal values, and a label on the low side."""
    x = torch.empty(6, v, dtype=torch.float64)
    x[0] = -1e4
    x[0, 3] = 1e4  # one-hot softmax at the label
    x[1] = 1e4  # all equal and large
    x[2] = -1e4  # all equal and very negative
    x[3] = 5.0  # all equal
    x[4] = torch.where(torch.arange(v) % 2 == 0, 1e4, -1e4)  # alternating
    x[5] = 1e4
    x[5, 3] = -1e4  # the label is the one small value: logp = -2e4 / tau
    y = torch.full((6,), 3, dtype=torch.int64)
    return x, y


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NAME[d])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_extreme_logits(dtype, temperature):
    v = 1000
    x64, y = extreme_rows(v)
    x = x64.to(dtype)
    n = x.shape[0]
    od = acc_dtype(dtype)
    g_logp, g_ent = randn(n, od), randn(n, od)
    r_logp, r_lse, r_ent, r_grad = reference(x, y, temperature, g_logp, g_ent)
    # float64 outputs are accepted for any input dtype; with either, the backward's
    # p_j = exp((z_j - row_max) / tau - log_norm) keeps its accuracy at |z| ~ 1e4 (from a float32
    # lse, exp(s_j - lse) would carry lse's rounding, ulp(1.4e4) / 2 ~ 5e-4, in the exponent).
    for out_dtype in (torch.float64, od):
        logp, stats, ent = forward(x, y, temperature, out_dtype=out_dtype)
        for a in (logp, stats, ent):
            assert torch.isfinite(a).all()
        torch.testing.assert_close(logp.double(), r_logp, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(lse_of(stats, temperature), r_lse, rtol=1e-7, atol=1e-5)
        torch.testing.assert_close(ent.double(), r_ent, rtol=1e-6, atol=1e-5)
        gx = backward(x, y, stats, ent, g_logp, g_ent, temperature)
        assert torch.isfinite(gx).all()
        assert_grad_close(gx, r_grad, dtype)


def test_infinite_and_nan_logits():
    v = 500
    x = torch.randn(4, v, generator=torch.Generator().manual_seed(4), dtype=torch.float64).float()
    x[0, 10:50] = -float("inf")  # masked-out vocabulary
    x[1, :] = -float("inf")
    x[1, 3] = 2.0  # a single finite entry: p = onehot
    x[2, 7] = float("nan")
    y = torch.tensor([3, 3, 3, 3])
    logp, stats, ent = forward(x, y, 0.7)
    g_logp, g_ent = randn(4, torch.float32, seed=1), randn(4, torch.float32, seed=2)
    gx = backward(x, y, stats, ent, g_logp, g_ent, 0.7)
    # row 0 equals the reference over its finite entries; the -inf entries get exactly 0 gradient
    keep = torch.ones(v, dtype=torch.bool)
    keep[10:50] = False
    r_logp, r_lse, r_ent, r_grad = reference(x[0:1, keep], y[0:1], 0.7, g_logp[0:1], g_ent[0:1])
    assert_rows_close(logp[0:1], r_logp, torch.float32)
    assert_rows_close(lse_of(stats[0:1], 0.7), r_lse, torch.float32)
    assert_rows_close(ent[0:1], r_ent, torch.float32)
    assert_grad_close(gx[0:1, keep], r_grad, torch.float32)
    assert (gx[0, 10:50] == 0).all()
    # row 1: one finite logit -> logp 0, entropy 0, zero gradient everywhere
    assert logp[1] == 0 and ent[1] == 0 and lse_of(stats, 0.7)[1] == pytest.approx(2.0 / 0.7)
    assert (gx[1] == 0).all()
    # row 2: NaN poisons its own outputs only
    assert torch.isnan(logp[2]) and torch.isnan(stats[2, 1]) and torch.isnan(ent[2])
    r3 = reference(x[3:4], y[3:4], 0.7)
    assert_rows_close(logp[3:4], r3[0], torch.float32)


# ------------------------------------------------------------------------------------------------
# validation: ValueError naming the argument, nothing written
# ------------------------------------------------------------------------------------------------
class Args:
    """A valid argument set for both kernels, with sentinel-filled outputs."""

    def __init__(self, n=4, v=10, dtype=torch.float32):
        self.x, self.y = make_inputs(dtype, n, v, ignore_rows=())
        od = acc_dtype(dtype)
        self.dtype = NAME[dtype]
        self.logp = torch.full((n,), 123.0, dtype=od)
        self.row_max = torch.full((n,), 123.0, dtype=od)
        self.log_norm = torch.full((n,), 123.0, dtype=od)
        self.ent = torch.full((n,), 123.0, dtype=od)
        self.g_logp = torch.ones(n, dtype=od)
        self.g_ent = torch.ones(n, dtype=od)
        self.gx = torch.full((n, v), 7.0, dtype=dtype)

    def fwd(self, **over):
        a = dict(logits=raw(self.x), labels=self.y.numpy(), logp=self.logp.numpy(),
                 row_max=self.row_max.numpy(), log_norm=self.log_norm.numpy(), entropy=self.ent.numpy(),
                 inv_temperature=1.0, ignore_index=IGNORE, dtype=self.dtype)
        a.update(over)
        return _C.logprob_forward(*a.values())

    def bwd(self, **over):
        a = dict(logits=raw(self.x), labels=self.y.numpy(), row_max=self.row_max.numpy(),
                 log_norm=self.log_norm.numpy(), entropy=self.ent.numpy(),
                 grad_logp=self.g_logp.numpy(), grad_entropy=self.g_ent.numpy(), grad_logits=raw(self.gx),
                 inv_temperature=1.0, ignore_index=IGNORE, dtype=self.dtype)
        a.update(over)
        return _C.logprob_backward(*a.values())

    def untouched(self):
        outputs = (self.logp, self.row_max, self.log_norm, self.ent)
        return all(bool((t == 123).all()) for t in outputs) and bool((self.gx == 7).all())


def bad_labels(v):
    return np.array([0, 1, v, 2], dtype=np.int64)


FORWARD_ERRORS = {
    "logits_1d": (lambda a: dict(logits=a.x.numpy()[0]), "logits"),
    "logits_3d": (lambda a: dict(logits=a.x.numpy()[None]), "logits"),
    "logits_wrong_dtype": (lambda a: dict(logits=a.x.double().numpy()), "logits"),
    "logits_int16_for_float32": (lambda a: dict(logits=a.x.to(torch.bfloat16).view(torch.int16).numpy()), "logits"),
    "logits_last_dim_strided": (lambda a: dict(logits=np.zeros((4, 20), np.float32)[:, ::2]), "logits"),
    "logits_transposed": (lambda a: dict(logits=np.zeros((10, 4), np.float32).T), "logits"),
    "empty_vocab": (lambda a: dict(logits=np.zeros((4, 0), np.float32)), "V"),
    "unknown_dtype": (lambda a: dict(dtype="float8"), "dtype"),
    "labels_wrong_n": (lambda a: dict(labels=np.zeros(5, np.int64)), "labels"),
    "labels_2d": (lambda a: dict(labels=np.zeros((4, 1), np.int64)), "labels"),
    "labels_int32": (lambda a: dict(labels=np.zeros(4, np.int32)), "labels"),
    "label_too_large": (lambda a: dict(labels=bad_labels(10)), "labels"),
    "label_negative": (lambda a: dict(labels=np.array([0, -1, 2, 3], np.int64)), "labels"),
    "logp_wrong_n": (lambda a: dict(logp=np.zeros(3, np.float32)), "logp"),
    "logp_wrong_dtype": (lambda a: dict(logp=np.zeros(4, np.int32)), "logp"),
    "logp_readonly": (lambda a: dict(logp=np.broadcast_to(np.float32(0), (4,))), "logp"),
    "logp_none": (lambda a: dict(logp=None), "logp"),
    "row_max_wrong_n": (lambda a: dict(row_max=np.zeros(5, np.float32)), "row_max"),
    "log_norm_wrong_n": (lambda a: dict(log_norm=np.zeros(3, np.float32)), "log_norm"),
    "log_norm_none": (lambda a: dict(log_norm=None), "log_norm"),
    "entropy_wrong_n": (lambda a: dict(entropy=np.zeros(2, np.float32)), "entropy"),
    "zero_temperature": (lambda a: dict(inv_temperature=0.0), "inv_temperature"),
    "negative_temperature": (lambda a: dict(inv_temperature=-1.0), "inv_temperature"),
    "nan_temperature": (lambda a: dict(inv_temperature=float("nan")), "inv_temperature"),
}


@pytest.mark.parametrize("case", list(FORWARD_ERRORS))
def test_forward_validation(case):
    a = Args()
    make, name = FORWARD_ERRORS[case]
    with pytest.raises(ValueError, match=name):
        a.fwd(**make(a))
    assert a.untouched()


def test_label_error_names_value_and_writes_nothing():
    a = Args(n=4, v=10)
    with pytest.raises(ValueError, match=r"labels.*10.*\[0, 10\)"):
        a.fwd(labels=bad_labels(10))  # rows 0, 1 are valid and come first: still nothing written
    with pytest.raises(ValueError, match=r"labels.*10"):
        a.bwd(labels=bad_labels(10))
    assert a.untouched()


def test_ignore_index_is_not_a_range_error():
    a = Args(n=4, v=10)
    a.fwd(labels=np.array([0, -100, 9, -100], np.int64))
    assert a.logp[1] == 0 and a.logp[3] == 0
    # a different ignore_index value: -100 is then out of range
    with pytest.raises(ValueError, match="labels"):
        a.fwd(labels=np.array([0, -100, 9, -1], np.int64), ignore_index=-1)


BACKWARD_ERRORS = {
    "grad_logits_wrong_shape": (lambda a: dict(grad_logits=np.zeros((4, 9), np.float32)), "grad_logits"),
    "grad_logits_wrong_dtype": (lambda a: dict(grad_logits=np.zeros((4, 10), np.float64)), "grad_logits"),
    "grad_logits_readonly": (lambda a: dict(grad_logits=np.broadcast_to(np.float32(0), (4, 10))), "grad_logits"),
    "grad_logits_partial_overlap": (None, "grad_logits"),
    "logits_1d": (lambda a: dict(logits=a.x.numpy()[0]), "logits"),
    "unknown_dtype": (lambda a: dict(dtype="half"), "dtype"),
    "labels_wrong_n": (lambda a: dict(labels=np.zeros(3, np.int64)), "labels"),
    "label_out_of_range": (lambda a: dict(labels=bad_labels(10)), "labels"),
    "row_max_wrong_n": (lambda a: dict(row_max=np.zeros(5, np.float32)), "row_max"),
    "row_max_none": (lambda a: dict(row_max=None), "row_max"),
    "log_norm_wrong_n": (lambda a: dict(log_norm=np.zeros(5, np.float32)), "log_norm"),
    "entropy_none_with_entropy_grad": (lambda a: dict(entropy=None), "entropy"),
    "grad_logp_wrong_n": (lambda a: dict(grad_logp=np.zeros(2, np.float32)), "grad_logp"),
    "grad_entropy_wrong_n": (lambda a: dict(grad_entropy=np.zeros(6, np.float32)), "grad_entropy"),
    "zero_temperature": (lambda a: dict(inv_temperature=0.0), "inv_temperature"),
}


@pytest.mark.parametrize("case", list(BACKWARD_ERRORS))
def test_backward_validation(case):
    a = Args()
    make, name = BACKWARD_ERRORS[case]
    if make is None:  # logits and grad_logits: two overlapping, different windows of one buffer
        big = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
        before = big.clone()
        with pytest.raises(ValueError, match=name):
            a.bwd(logits=big.numpy()[:, :10], grad_logits=big.numpy()[:, 1:])
        assert torch.equal(big, before)
    else:
        with pytest.raises(ValueError, match=name):
            a.bwd(**make(a))
    assert a.untouched()


def test_error_message_shows_shapes():
    a = Args(n=4, v=10)
    with pytest.raises(ValueError, match=r"logp.*\(4,\).*\(3,\)"):
        a.fwd(logp=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"grad_logits.*\(4, 10\).*\(4, 9\)"):
        a.bwd(grad_logits=np.zeros((4, 9), np.float32))


def test_non_array_argument_is_a_type_error():
    a = Args()
    with pytest.raises(TypeError, match="logits"):
        a.fwd(logits=[[1.0, 2.0]])
    assert a.untouched()


def test_half_dtypes_accept_int16_and_uint16_views():
    x, y = make_inputs(torch.bfloat16, 3, 50)
    logp_a, _, _ = forward(x, y, 1.0)
    logp_b = torch.empty(3)
    row_max_b, log_norm_b = torch.empty(3), torch.empty(3)
    _C.logprob_forward(raw(x).view(np.uint16), y.numpy(), logp_b.numpy(), row_max_b.numpy(), log_norm_b.numpy(), None,
                       1.0, IGNORE, "bfloat16")
    assert torch.equal(logp_a, logp_b)
