"""The rollout_corr/* row table: the C++ pass (csrc/rollout_stats.h) against the torch reference on ragged
batches whose lengths straddle the pass's 256-token blocks and 64-lane reductions, for every IS mode and
rejection statistic, with NaN / inf padding, empty rows and clamped ±40 log-ratios."""

import pytest
import torch

from fastpo.ops.rollout_row_stats import COLUMNS, OPTION_COLUMNS, ISBounds, RejectionStat, row_table

pytest.importorskip("fastpo._C")

OPTIONS = [RejectionStat(1, -0.4, 0.4, True, True), RejectionStat(2, 0.0, 0.05, False, True),
           RejectionStat(3, 0.0, 0.02, False, True), RejectionStat(1, -1.0, 0.3, True, False),
           RejectionStat(3, 0.0, 0.5, False, False)]
def _option_cols(kinds, names):
    return [len(COLUMNS) + len(OPTION_COLUMNS) * j + OPTION_COLUMNS.index(c)
            for j, o in enumerate(OPTIONS) if o.kind in kinds for c in names]


# counts of comparisons without an exp are exact on both paths; those of e^dc may differ by its last bit
# (torch's exp and fastpo's exp_fast are both within 1 ulp) at a bound, so by a token or so
EXACT = [COLUMNS.index("n")] + _option_cols((1, 2), ("above", "below", "rejected"))
NEAR = [COLUMNS.index(c) for c in ("high", "low", "oob", "any_rejected")] + _option_cols((3,), ("above", "below",
                                                                                               "rejected"))


def batch(B, T, dtype, seed, mask_dtype=torch.bool):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[-1] = T, 0
    mask = (torch.arange(T)[None] < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.15)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4.0
    rollout = logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    wild = torch.rand(B, T, generator=g) < 0.02
    rollout = torch.where(wild, rollout + torch.where(torch.rand(B, T, generator=g) > 0.5, 40.0, -40.0), rollout)
    logp, rollout = logp.to(dtype), rollout.to(dtype)
    logp[~mask], rollout[~mask] = float("nan"), float("inf")
    return logp, rollout, mask.to(mask_dtype)


@pytest.mark.parametrize("T", [1, 63, 256, 300, 777])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bounds", [ISBounds(2.0, 0.0, 0.5, False), ISBounds(1.5, 0.6, 0.6, True)])
def test_cpp_table_equals_torch(T, dtype, bounds):
    logp, rollout, mask = batch(6, T, dtype, seed=T)
    cpp = row_table(logp, rollout, mask, bounds, OPTIONS, backend="cpp")
    ref = row_table(logp, rollout, mask, bounds, OPTIONS, backend="torch")
    assert cpp.shape == ref.shape == (6, len(COLUMNS) + len(OPTION_COLUMNS) * len(OPTIONS))
    assert cpp.dtype == ref.dtype == torch.float64
    assert torch.equal(cpp[:, EXACT], ref[:, EXACT])
    assert (cpp[:, NEAR] - ref[:, NEAR]).abs().max() <= 1
    rest = [k for k in range(cpp.shape[1]) if k not in EXACT + NEAR]
    rtol = 2e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(cpp[:, rest], ref[:, rest], rtol=rtol, atol=rtol)
    counted = cpp[:, COLUMNS.index("n")] > 0
    assert counted[0] and not counted[-1]
    assert torch.isfinite(cpp[counted]).all()  # NaN / inf padding reaches nothing
    empty = cpp[~counted]  # an empty row: every sum 0, max / min −inf / +inf
    extrema = [COLUMNS.index("max_w"), COLUMNS.index("min_w")] + _option_cols((1, 2, 3), ("max_s", "min_s"))
    assert (empty[:, [k for k in range(cpp.shape[1]) if k not in extrema]] == 0).all()
    assert (empty[:, extrema[0::2]] == float("-inf")).all() and (empty[:, extrema[1::2]] == float("inf")).all()


def test_mask_dtypes_and_default_backend():
    logp, rollout, mask = batch(4, 40, torch.float32, seed=1)
    bounds = ISBounds(2.0, 0.0, 0.5, False)
    want = row_table(logp, rollout, mask, bounds, OPTIONS[:2], backend="torch")
    for m in (mask, mask.to(torch.uint8), mask.float()):
        torch.testing.assert_close(row_table(logp, rollout, m, bounds, OPTIONS[:2]), want, rtol=2e-5, atol=2e-5)
    # a non-contiguous view is copied, not misread
    wide = torch.stack([logp, logp], -1)[..., 0]
    assert not wide.is_contiguous()
    torch.testing.assert_close(row_table(wide, rollout, mask, bounds, [], backend="cpp"),
                               row_table(logp, rollout, mask, bounds, [], backend="cpp"))


def test_backend_errors():
    logp, rollout, mask = batch(2, 5, torch.float32, seed=2)
    bounds = ISBounds(2.0, 0.0, 0.5, False)
    with pytest.raises(ValueError, match="backend"):
        row_table(logp, rollout, mask, bounds, [], backend="cuda")
    with pytest.raises(ValueError, match="backend='cpp'"):
        row_table(logp.half(), rollout.half(), mask, bounds, [], backend="cpp")
    with pytest.raises(ValueError, match="backend='cpp'"):
        row_table(logp, rollout.double(), mask, bounds, [], backend="cpp")
    # float16 runs on the torch path (promoted to float32, as verl's arithmetic would)
    half = row_table(logp.half(), rollout.half(), mask, bounds, [])
    assert half.dtype == torch.float64 and torch.isfinite(half[:, 0]).all()
