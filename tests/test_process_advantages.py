"""fastpo.process_advantages (DeepSeekMath process supervision): a hand-worked example, the reference
(loops over groups and steps), shuffled ids, degenerate groups, errors, opcheck."""

import pytest
import torch

import fastpo
from helpers import assert_raises_unmodified


def _close(got, want, dtype=torch.float32):
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=tol, rtol=tol)


def test_hand_worked_example(backend):
    # Group A = sequences 0, 1. Counted steps: 1, 5 (seq 0, ending at tokens 1 and 3) and 3 (seq 1, at
    # token 2); seq 1's second step is masked (its end 99 is ignored). mean 3, Bessel std 2 → −1, 1, 0.
    # Group B = sequences 2, 3: every counted step rewarded 2 → zero variance → 0 everywhere.
    rewards = torch.tensor([[1.0, 5.0], [3.0, -7.0], [2.0, 2.0], [2.0, 0.0]], device=backend)
    ends = torch.tensor([[1, 3], [2, 99], [0, 4], [2, 0]], device=backend)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]], device=backend)
    got = fastpo.process_advantages(rewards, ends, mask, group_size=2, num_tokens=5, eps=0.0)
    want = torch.tensor([
        [0.0, 0.0, 1.0, 1.0, 0.0],   # t ≤ 1: −1 + 1; t = 2, 3: only the step ending at 3; t = 4: none
        [0.0, 0.0, 0.0, 0.0, 0.0],   # its one counted step normalises to 0
        [0.0] * 5,
        [0.0] * 5,
    ])
    _close(got, want)
    # Same groups as shuffled ids.
    ids = torch.tensor([4, 4, -1, -1], device=backend)
    _close(fastpo.process_advantages(rewards, ends, mask, group_ids=ids, num_tokens=5, eps=0.0), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend, dtype):
    g = torch.Generator().manual_seed(0)
    b, s, t = 6, 4, 9
    rewards = torch.randn(b, s, generator=g).to(dtype)
    ends = torch.randint(0, t, (b, s), generator=g)
    mask = torch.rand(b, s, generator=g) > 0.3
    mask[5] = False
    ids = torch.tensor([1, 0, 1, 2, 0, 2])
    want = fastpo.reference.process_advantages(rewards, ends, mask, group_ids=ids, num_tokens=t)
    got = fastpo.process_advantages(rewards.to(backend), ends.to(backend), mask.to(backend),
                                    group_ids=ids.to(backend), num_tokens=t)
    assert got.shape == (b, t) and got.dtype == dtype
    _close(got, want, dtype)
    assert (got[5] == 0).all()


def test_group_with_one_counted_step_is_zero(backend):
    rewards = torch.tensor([[4.0], [1.0]], device=backend)
    got = fastpo.process_advantages(rewards, torch.tensor([[1], [0]], device=backend),
                                    torch.tensor([[1], [0]], device=backend), group_size=2, num_tokens=3)
    assert torch.isfinite(got).all() and (got == 0).all()


ERROR_CASES = [
    ("integer rewards", dict(step_rewards=torch.ones(2, 2, dtype=torch.long)), TypeError, "step_rewards"),
    ("1-D rewards", dict(step_rewards=torch.ones(2)), ValueError, "step_rewards"),
    ("float ends", dict(step_ends=torch.zeros(2, 2)), TypeError, "step_ends"),
    ("ends shape", dict(step_ends=torch.zeros(2, 3, dtype=torch.long)), ValueError, "step_ends"),
    ("mask shape", dict(step_mask=torch.ones(2, 1)), ValueError, "step_mask"),
    ("end out of range", dict(step_ends=torch.tensor([[0, 4], [1, 2]])), ValueError, "step_ends"),
    ("negative end", dict(step_ends=torch.tensor([[0, -1], [1, 2]])), ValueError, "step_ends"),
    ("num_tokens 0", dict(num_tokens=0), ValueError, "num_tokens"),
    ("float num_tokens", dict(num_tokens=4.0), TypeError, "num_tokens"),
    ("no grouping", dict(group_size=None), ValueError, "group_size"),
    ("group_size not dividing", dict(group_size=3), ValueError, "group_size"),
]


@pytest.mark.parametrize("name,override,exc,fragment", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
def test_errors(monkeypatch, backend_name, name, override, exc, fragment):
    monkeypatch.setenv("FASTPO_BACKEND", backend_name)
    kwargs = dict(step_rewards=torch.randn(2, 2), step_ends=torch.tensor([[0, 3], [1, 2]]),
                  step_mask=torch.ones(2, 2), group_size=2, num_tokens=4)
    kwargs.update(override)
    assert_raises_unmodified(fastpo.process_advantages, kwargs, exc, match=fragment)


def test_masked_step_end_out_of_range_is_ignored(cpu_backend):
    got = fastpo.process_advantages(torch.tensor([[1.0, 9.0], [3.0, 0.0]]), torch.tensor([[0, 1], [1, -5]]),
                                    torch.tensor([[1, 1], [1, 0]]), group_size=2, num_tokens=2)
    assert torch.isfinite(got).all()


def test_compile_and_opcheck(cpu_backend):
    g = torch.Generator().manual_seed(1)
    rewards, ends = torch.randn(4, 3, generator=g), torch.randint(0, 6, (4, 3), generator=g)
    mask = torch.rand(4, 3, generator=g) > 0.2

    def fn(r):
        return fastpo.process_advantages(r, ends, mask, group_size=2, num_tokens=6)

    torch._dynamo.reset()
    _close(torch.compile(fn, fullgraph=True)(rewards), fn(rewards))
    torch.library.opcheck(torch.ops.fastpo.process_step_ends.default, (ends, mask, 6))
    torch.library.opcheck(torch.ops.fastpo.process_step_ends.default, (ends.int(), torch.zeros_like(mask), 1))


def test_bfloat16_step_rewards(backend):
    rewards = torch.tensor([[1.0, 5.0], [3.0, 2.0]], dtype=torch.bfloat16, device=backend)
    ends = torch.tensor([[0, 2], [1, 2]], device=backend)
    got = fastpo.process_advantages(rewards, ends, torch.ones(2, 2, device=backend), group_size=2, num_tokens=3)
    want = fastpo.reference.process_advantages(rewards.float(), ends, torch.ones(2, 2), group_size=2, num_tokens=3)
    assert got.dtype == torch.float32
    _close(got, want)
