"""fastpo.optimal_token_baseline (verl's OTB and multi-turn OTB) against the reference (loops over groups
and positions): right-padded and multi-turn masks, zero tail, IS weights, singletons, empty responses,
poisoned padding, errors, compile. verl parity: tests/test_parity_verl_advantages.py."""

import pytest
import torch

import fastpo
from helpers import assert_raises_unmodified


def _close(got, want, tol=2e-5):
    torch.testing.assert_close(got.cpu().to(want.dtype), want.cpu(), atol=tol, rtol=tol)


def _case(seed, b=8, t=7, multi_turn=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0], lengths[1] = t, 0  # a longest response, an empty one
    mask = torch.arange(t)[None, :] < lengths[:, None]
    if multi_turn:
        mask &= torch.rand(b, t, generator=g) > 0.25  # observation tokens between turns
    rewards = torch.randn(b, t, generator=g) * mask
    old_logp = -torch.rand(b, t, generator=g) * 3
    sum_pi2 = torch.rand(b, t, generator=g)
    is_w = torch.rand(b, t, generator=g) + 0.5
    return rewards, mask, old_logp, sum_pi2, is_w


@pytest.mark.parametrize("multi_turn", [False, True])
@pytest.mark.parametrize("zero_tail", [True, False])
@pytest.mark.parametrize("with_is", [False, True])
def test_matches_reference(backend, multi_turn, zero_tail, with_is):
    rewards, mask, lp, sp, w = _case(0, multi_turn=multi_turn)
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 0, 3])  # group 3 is a singleton
    kw = dict(group_ids=ids, handle_zero_tail=zero_tail, multi_turn=multi_turn,
              rollout_is_weights=w if with_is else None)
    want_a, want_r = fastpo.reference.optimal_token_baseline(rewards, mask, lp, sp, **kw)
    dev = lambda x: x.to(backend)  # noqa: E731
    got_a, got_r = fastpo.optimal_token_baseline(dev(rewards), dev(mask), dev(lp), dev(sp), group_ids=dev(ids),
                                                 handle_zero_tail=zero_tail, multi_turn=multi_turn,
                                                 rollout_is_weights=dev(w) if with_is else None)
    _close(got_a, want_a)
    _close(got_r, want_r)
    assert (got_a.cpu()[~mask] == 0).all() and (got_a.cpu()[7] == 0).all()  # masked; the singleton


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_poisoned_padding_is_ignored(backend, poison):
    rewards, mask, lp, sp, w = _case(1, multi_turn=True)
    clean = fastpo.optimal_token_baseline(rewards, mask, lp, sp, group_size=4, rollout_is_weights=w)
    p = lambda x: x.masked_fill(~mask, poison).to(backend)  # noqa: E731
    got = fastpo.optimal_token_baseline(p(rewards), mask.to(backend), p(lp), p(sp), group_size=4,
                                        rollout_is_weights=p(w))
    for a, b in zip(got, clean):
        assert torch.isfinite(a).all()
        _close(a, b)


def test_compile_dynamic(cpu_backend):
    from torch._dynamo.testing import CompileCounter

    def fn(r, m, lp, sp):
        return fastpo.optimal_token_baseline(r, m, lp, sp, group_size=2, multi_turn=True)

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    for b in (4, 6, 8, 10):
        args = _case(b, b=b)[:4]
        for x, y in zip(compiled(*args), fn(*args)):
            _close(x, y)
    assert counter.frame_count <= 2


ERRORS = [
    ("1-D rewards", dict(rewards=torch.zeros(4)), ValueError, "rewards"),
    ("old_logp shape", dict(old_logp=torch.zeros(4, 2)), ValueError, "old_logp"),
    ("int sum_pi_squared", dict(sum_pi_squared=torch.zeros(4, 3, dtype=torch.long)), TypeError, "sum_pi_squared"),
    ("is weights shape", dict(rollout_is_weights=torch.ones(4)), ValueError, "rollout_is_weights"),
    ("mask shape", dict(mask=torch.ones(4, 2)), ValueError, "mask"),
    ("no grouping", dict(group_size=None), ValueError, "group_size"),
    ("multi_turn not bool", dict(multi_turn=1), TypeError, "multi_turn"),
]


@pytest.mark.parametrize("name,override,exc,fragment", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(cpu_backend, name, override, exc, fragment):
    kwargs = dict(rewards=torch.randn(4, 3), mask=torch.ones(4, 3), old_logp=-torch.rand(4, 3),
                  sum_pi_squared=torch.rand(4, 3), group_size=2)
    kwargs.update(override)
    assert_raises_unmodified(fastpo.optimal_token_baseline, kwargs, exc, match=fragment)


def test_bfloat16_inputs(backend):
    rewards, mask, lp, sp, _ = _case(2)
    want = fastpo.optimal_token_baseline(*(x.bfloat16().float() if x.dtype != torch.bool else x
                                           for x in (rewards, mask, lp, sp)), group_size=4)
    got = fastpo.optimal_token_baseline(*(x.bfloat16().to(backend) if x.dtype != torch.bool else x.to(backend)
                                          for x in (rewards, mask, lp, sp)), group_size=4)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        _close(a, b)
