"""fastpo.group_advantages: every method against the reference (a loop over groups) and against
hand-computed values; contiguous and shuffled ids, uneven groups, singletons, zero variance, token
rewards, errors and torch.compile. NaN/inf semantics and strided inputs: test_advantages_nan.py."""

import pytest
import torch

import fastpo
from fastpo.reference.advantages import GROUP_METHODS
from helpers import assert_raises_unmodified

GROUPED = [m for m in GROUP_METHODS if m not in ("remax", "opo")]  # methods of [B] scores with groups
TOKEN_ONLY = ("opo",)  # needs response lengths: [B, T] token rewards only


def _close(got, want, dtype=torch.float32):
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=tol, rtol=tol)


def _scores(b, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, generator=g)


@pytest.mark.parametrize("method", GROUPED)
def test_contiguous_groups_match_reference(backend, method):
    scores = _scores(12, 1)
    want = fastpo.reference.group_advantages(scores, group_size=4, method=method)
    got = fastpo.group_advantages(scores.to(backend), group_size=4, method=method)
    assert got.shape == (12,) and got.dtype == torch.float32
    _close(got, want)
    # group_size as the equivalent ids
    ids = torch.arange(12) // 4
    _close(fastpo.group_advantages(scores.to(backend), group_ids=ids.to(backend), method=method), want)


@pytest.mark.parametrize("method", GROUPED)
def test_shuffled_uneven_ids_with_singleton_and_flat_group(backend, method):
    # groups: 7 → 4 members, -3 → 3 members, 100 → singleton, 5 → 3 equal scores (zero variance)
    ids = torch.tensor([7, -3, 100, 7, 5, -3, 7, 5, 7, -3, 5])
    scores = _scores(11, 2)
    scores[ids == 5] = 0.5
    want = fastpo.reference.group_advantages(scores, group_ids=ids, method=method)
    got = fastpo.group_advantages(scores.to(backend), group_ids=ids.to(backend), method=method)
    _close(got, want)
    assert got[2] == 0  # the singleton
    if method != "reinforce_pp":  # whitening shifts a flat group by the batch mean
        assert (got[ids == 5] == 0).all()
    # Permuting the batch permutes the advantages.
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    got_perm = fastpo.group_advantages(scores[perm].to(backend), group_ids=ids[perm].to(backend), method=method)
    _close(got_perm, got[perm].cpu())


def test_hand_computed_values(backend):
    s = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 9.0], device=backend)
    # group 0: mean 2, std 1; group 1: mean 19/3, std sqrt(16/3 ≈ 5.3333)
    grpo = fastpo.group_advantages(s, group_size=3, eps=0.0)
    _close(grpo[:3], torch.tensor([-1.0, 0.0, 1.0]))
    _close(fastpo.group_advantages(s, group_size=3, method="dr_grpo")[:3], torch.tensor([-1.0, 0.0, 1.0]))
    _close(fastpo.group_advantages(s, group_size=3, method="rloo")[:3], torch.tensor([-1.5, 0.0, 1.5]))
    # batch std of the six scores
    batch_std = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 9.0]).std()
    _close(fastpo.group_advantages(s, group_size=3, method="grpo_batch_std", eps=0.0)[:3],
           torch.tensor([-1.0, 0.0, 1.0]) / batch_std)
    base = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], device=backend)
    _close(fastpo.group_advantages(s, method="remax", baseline=base), torch.tensor([1.0, 1.0, 1.0, 2.0, 1.0, 4.0]))


def test_hand_computed_opo_gpg_passk(backend):
    s = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 9.0], device=backend)
    _close(fastpo.group_advantages(s, group_size=3, method="dr_grpo_passk"), torch.tensor([0, 0, 1.0, 0, 0, 4.0]))
    std1 = torch.tensor([5.0, 5.0, 9.0]).std()
    _close(fastpo.group_advantages(s, group_size=3, method="grpo_passk", eps=0.0),
           torch.tensor([0, 0, 1.0, 0, 0, 4.0 / float(std1)]))
    tie = torch.tensor([3.0, 1.0, 3.0], device=backend)  # a tie for the best: nobody gets an advantage
    assert (fastpo.group_advantages(tie, group_size=3, method="grpo_passk") == 0).all()
    z = torch.tensor([0.0, 2.0, 4.0, 0.0, 0.0, 6.0], device=backend)  # α = 6 / 3 non-zero = 2
    _close(fastpo.group_advantages(z, group_size=3, method="gpg"), torch.tensor([-4.0, 0.0, 4.0, -4.0, -4.0, 8.0]))
    # opo: lengths 1 and 3, scores 1 and 3 → baseline (1·1 + 3·3)/4 = 2.5
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]], device=backend)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], device=backend)
    _close(fastpo.group_advantages(rewards, mask, group_size=2, method="opo"),
           torch.tensor([[-1.5, 0.0, 0.0], [0.5, 0.5, 0.5]]))


@pytest.mark.parametrize("method", GROUP_METHODS)
def test_token_rewards_with_mask(backend, method):
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.3
    mask[4] = False
    extra = dict(baseline=torch.randn(6, generator=g)) if method == "remax" else dict(group_size=3)
    want = fastpo.reference.group_advantages(rewards, mask, method=method, **extra)
    dev_extra = {k: (v.to(backend) if isinstance(v, torch.Tensor) else v) for k, v in extra.items()}
    got = fastpo.group_advantages(rewards.to(backend), mask.to(backend), method=method, **dev_extra)
    assert got.shape == (6, 5)
    _close(got, want)
    assert (got.cpu()[~mask] == 0).all()
    if method not in ("reinforce_pp",) + TOKEN_ONLY:  # broadcast of the [B] advantage of the summed rewards
        seq = fastpo.group_advantages((rewards * mask).sum(-1).to(backend), method=method, **dev_extra)
        _close(got, seq.cpu()[:, None] * mask)


def test_reinforce_pp_whitens_over_counted_tokens_like_verl(backend):
    """verl: scores − group mean, broadcast over the response mask, masked_whiten over the tokens."""
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(4, 6, generator=g)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 2, 4, 3])[:, None]
    s = (rewards * mask).sum(-1)
    centred = s - s.view(2, 2).mean(1).repeat_interleave(2)
    tokens = centred[:, None] * mask
    mean = tokens[mask].mean()
    var = tokens[mask].var()  # Bessel
    want = (tokens - mean) * torch.rsqrt(var + 1e-8) * mask
    got = fastpo.group_advantages(rewards.to(backend), mask.to(backend), group_size=2, method="reinforce_pp")
    _close(got, want)


def test_float64_and_never_nan(backend):
    s = torch.tensor([3.0, 3.0, 3.0, 1e30, -1e30, 7.0], dtype=torch.float64, device=backend)
    for method in GROUPED:
        out = fastpo.group_advantages(s, group_ids=torch.tensor([0, 0, 0, 1, 1, 2], device=backend), method=method)
        assert out.dtype == torch.float64 and torch.isfinite(out).all(), method
        assert (out[:3] == 0).all() or method == "reinforce_pp"
    one = fastpo.group_advantages(torch.tensor([2.0], device=backend), group_size=1, method="grpo_batch_std")
    assert one.item() == 0
    flat = torch.full((4,), 3.0, device=backend)
    for method in GROUPED:  # zero variance with eps = 0: 0/0 must give 0
        out = fastpo.group_advantages(flat, group_size=2, method=method, eps=0.0)
        assert (out == 0).all(), method
    out = fastpo.group_advantages(flat[:, None].expand(4, 3), group_size=2, method="opo", eps=0.0)
    assert (out == 0).all()


ERROR_CASES = [
    ("integer scores", dict(scores=torch.ones(4, dtype=torch.long)), TypeError, "scores"),
    ("3-D scores", dict(scores=torch.zeros(4, 2, 1)), ValueError, "scores"),
    ("unknown method", dict(method="ppo"), ValueError, "method"),
    ("no grouping", dict(group_size=None), ValueError, "group_size"),
    ("both groupings", dict(group_ids=torch.zeros(4, dtype=torch.long)), ValueError, "group_ids"),
    ("group_size not dividing", dict(group_size=3), ValueError, "group_size"),
    ("group_size zero", dict(group_size=0), ValueError, "group_size"),
    ("float group_size", dict(group_size=2.0), TypeError, "group_size"),
    ("float group_ids", dict(group_size=None, group_ids=torch.zeros(4)), TypeError, "group_ids"),
    ("group_ids shape", dict(group_size=None, group_ids=torch.zeros(3, dtype=torch.long)), ValueError, "group_ids"),
    ("mask with [B] scores", dict(mask=torch.ones(4)), ValueError, "mask"),
    ("mask shape", dict(scores=torch.zeros(4, 3), mask=torch.ones(4, 2)), ValueError, "mask"),
    ("remax without baseline", dict(method="remax", group_size=None), ValueError, "baseline"),
    ("baseline shape", dict(method="remax", baseline=torch.zeros(3)), ValueError, "baseline"),
    ("baseline without remax", dict(baseline=torch.zeros(4)), ValueError, "baseline"),
    ("negative eps", dict(eps=-1.0), ValueError, "eps"),
    ("opo with [B] scores", dict(method="opo"), ValueError, "opo"),
]


@pytest.mark.parametrize("name,override,exc,fragment", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
def test_errors(monkeypatch, backend_name, name, override, exc, fragment):
    monkeypatch.setenv("FASTPO_BACKEND", backend_name)
    kwargs = dict(scores=torch.randn(4), group_size=2)
    kwargs.update(override)
    assert_raises_unmodified(fastpo.group_advantages, kwargs, exc, match=fragment)


def test_compile_fullgraph(cpu_backend):
    g = torch.Generator().manual_seed(5)
    rewards, mask = torch.randn(6, 4, generator=g), torch.rand(6, 4, generator=g) > 0.2
    ids = torch.tensor([3, 1, 3, 1, 9, 9])

    def fn(r, m):
        a = fastpo.group_advantages(r, m, group_ids=ids)
        b = fastpo.group_advantages(r.sum(-1), group_size=2, method="reinforce_pp")
        return a, b, fastpo.whiten(a, m)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    for got, want in zip(compiled(rewards, mask), fn(rewards, mask)):
        _close(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_scores_are_upcast(backend, dtype):
    rewards = _scores(12, 8).reshape(4, 3).to(dtype)
    want = fastpo.reference.group_advantages(rewards.float(), group_size=2, method="grpo")
    got = fastpo.group_advantages(rewards.to(backend), group_size=2)
    assert got.dtype == torch.float32
    _close(got, want)
