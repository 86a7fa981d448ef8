"""Issue 20 §1–2 for the advantage ops: a NaN/±inf at a masked position reaches no counted output (every
backend, the reference included); NaN *scores* follow TRL 1.16 (not scored: left out of the statistics,
advantage 0); strided, expanded and transposed inputs; torch.compile(dynamic=True, fullgraph=True)
with at most 2 compilations for 4 batch sizes and none when eps changes."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import fastpo
from fastpo.reference.advantages import GROUP_METHODS

POISONS = [float("nan"), float("inf"), float("-inf")]


def _close(got, want, tol=2e-5):
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=tol, rtol=tol, equal_nan=False)


@pytest.fixture(params=["cpu", "triton", "reference"])
def any_backend(request, monkeypatch):
    monkeypatch.setenv("FASTPO_BACKEND", request.param)
    return "cpu"


def _token_case(seed=0, b=8, t=5):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.35
    mask[:, 0] = True
    mask[5] = False  # an empty response
    return rewards, mask


@pytest.mark.parametrize("poison", POISONS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("method", GROUP_METHODS)
def test_group_advantages_ignores_poisoned_padding(any_backend, method, poison):
    rewards, mask = _token_case()
    extra = dict(baseline=torch.randn(8)) if method == "remax" else dict(group_size=4)
    clean = fastpo.group_advantages(rewards, mask, method=method, **extra)
    dirty = rewards.masked_fill(~mask, poison)
    got = fastpo.group_advantages(dirty, mask, method=method, **extra)
    assert torch.isfinite(got).all()
    _close(got, clean)


@pytest.mark.parametrize("poison", POISONS, ids=["nan", "inf", "-inf"])
def test_process_advantages_ignores_poisoned_masked_step(any_backend, poison):
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(4, 3, generator=g)
    ends = torch.randint(0, 6, (4, 3), generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0]])
    clean = fastpo.process_advantages(rewards, ends, mask, group_size=2, num_tokens=6)
    got = fastpo.process_advantages(rewards.masked_fill(mask == 0, poison), ends, mask, group_size=2, num_tokens=6)
    assert torch.isfinite(got).all()
    _close(got, clean)


@pytest.mark.parametrize("poison", POISONS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_ignores_poisoned_masked_positions(poison, shift_mean):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 6, generator=g) > 0.4
    clean = fastpo.whiten(x, mask, shift_mean=shift_mean)
    dirty = x.masked_fill(~mask, poison).requires_grad_()
    for fn in (fastpo.whiten, fastpo.reference.whiten):
        got = fn(dirty, mask, shift_mean=shift_mean)
        _close(got[mask], clean[mask], 1e-12)
        assert torch.equal(got.detach()[~mask].isnan(), torch.isnan(torch.tensor(poison)).expand((~mask).sum()))
    # the gradient of a masked loss is finite too (a NaN in padding must not poison the statistics' grads)
    (fastpo.whiten(dirty, mask, shift_mean=shift_mean) * mask).sum().backward()
    assert torch.isfinite(dirty.grad[mask]).all()
    ref = x.clone().requires_grad_()
    (fastpo.whiten(ref, mask, shift_mean=shift_mean) * mask).sum().backward()
    _close(dirty.grad[mask], ref.grad[mask], 1e-10)


# --- NaN scores: TRL 1.16 semantics (grpo_trainer.py: nanmean / nanstd, unscorable → advantage 0) ---


def _trl_group_norm(s, group_size, eps, scale=True):
    """TRL's sum_then_normalize with scale_rewards='group' (or 'none'), then nan_to_num(nan=0)."""
    grouped = s.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    count = (~torch.isnan(grouped)).sum(1, keepdim=True)
    var = torch.nanmean((grouped - torch.nanmean(grouped, 1, keepdim=True)) ** 2, 1, keepdim=True)
    var = var * torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    std = var.sqrt().flatten().repeat_interleave(group_size)
    adv = s - mean
    if scale:
        adv = adv / (std + eps)
    return torch.nan_to_num(adv, nan=0.0)


def test_nan_scores_follow_trl(any_backend):
    nan = float("nan")
    s = torch.tensor([1.0, nan, 3.0, 6.0,   nan, nan, nan, nan,   2.0, nan, nan, nan,   1.0, 1.0, 4.0, nan])
    for method, scale in (("grpo", True), ("dr_grpo", False)):
        got = fastpo.group_advantages(s, group_size=4, method=method, eps=1e-4)
        _close(got, _trl_group_norm(s, 4, 1e-4, scale))
    assert (fastpo.group_advantages(s, group_size=4, method="rloo")[4:12] == 0).all()


@pytest.mark.parametrize("method", [m for m in GROUP_METHODS if m != "remax"])
def test_nan_score_is_left_out_of_its_group(any_backend, method):
    """A NaN member gets 0 and the others get what they would get if it were not in the batch."""
    rewards, mask = _token_case(3, b=8)
    mask[5] = True
    with_nan = rewards.clone()
    with_nan[2, 0] = float("nan")  # a counted token: sequence 2 is not scored
    got = fastpo.group_advantages(with_nan, mask, group_ids=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), method=method)
    keep = torch.tensor([0, 1, 3, 4, 5, 6, 7])
    alone = fastpo.group_advantages(rewards[keep], mask[keep], group_ids=torch.tensor([0, 0, 0, 1, 1, 1, 1]),
                                    method=method)
    assert (got[2] == 0).all() and torch.isfinite(got).all()
    _close(got[keep], alone)  # batch statistics too (batch std, GPG's α, REINFORCE++'s whitening)


def test_nan_remax_and_process_step(any_backend):
    s = torch.tensor([1.0, float("nan"), 3.0])
    b = torch.tensor([0.5, 0.5, float("nan")])
    _close(fastpo.group_advantages(s, method="remax", baseline=b), torch.tensor([0.5, 0.0, 0.0]))
    rewards = torch.tensor([[1.0, float("nan")], [3.0, 5.0]])
    ends = torch.tensor([[0, 1], [1, 2]])
    got = fastpo.process_advantages(rewards, ends, torch.ones(2, 2), group_size=2, num_tokens=3, eps=0.0)
    want = fastpo.process_advantages(rewards, ends, torch.tensor([[1, 0], [1, 1]]), group_size=2, num_tokens=3, eps=0.0)
    _close(got, want)


# --- strided, expanded and transposed inputs ---


@pytest.mark.parametrize("method", ["grpo", "reinforce_pp", "opo", "grpo_passk"])
def test_strided_views(backend, method):
    rewards, mask = _token_case(4, b=8, t=6)
    want = fastpo.group_advantages(rewards, mask, group_size=4, method=method)
    big = torch.zeros(6, 8 * 3)
    big[:, ::3] = rewards.t()
    view = big[:, ::3].t()  # transposed and strided
    mview = mask.t().contiguous().t()  # column-major mask
    _close(fastpo.group_advantages(view.to(backend), mview.to(backend), group_size=4, method=method), want)
    ids = torch.arange(8).repeat_interleave(2)[::2] // 4  # a strided group_ids view
    _close(fastpo.group_advantages(view.to(backend), mview.to(backend), group_ids=ids.to(backend), method=method), want)
    # expanded: every sequence has the same rewards
    row = rewards[:1].expand(8, 6)
    _close(fastpo.group_advantages(row.to(backend), mask.to(backend), group_size=4, method=method),
           fastpo.group_advantages(row.contiguous(), mask, group_size=4, method=method))
    s = rewards[:, 0].contiguous()
    flat = torch.zeros(24)
    flat[::3] = s
    _close(fastpo.group_advantages(flat[::3].to(backend), group_size=4, method=method if method != "opo" else "grpo"),
           fastpo.group_advantages(s, group_size=4, method=method if method != "opo" else "grpo"))


def test_strided_process_and_whiten(backend):
    g = torch.Generator().manual_seed(5)
    rewards = torch.randn(3, 4, generator=g)
    ends = torch.randint(0, 5, (3, 4), generator=g)
    mask = torch.rand(3, 4, generator=g) > 0.3
    want = fastpo.process_advantages(rewards.t().contiguous(), ends.t().contiguous(), mask.t().contiguous(),
                                     group_size=2, num_tokens=5)
    got = fastpo.process_advantages(rewards.t().to(backend), ends.t().to(backend), mask.t().to(backend),
                                    group_size=2, num_tokens=5)
    _close(got, want)
    x = torch.randn(4, 6, generator=g)
    _close(fastpo.whiten(x.t(), mask.new_ones(6, 4)), fastpo.whiten(x.t().contiguous()))
    _close(fastpo.whiten(x[:, :1].expand(4, 6)), fastpo.whiten(x[:, :1].expand(4, 6).contiguous()))


# --- torch.compile(dynamic=True, fullgraph=True): ≤ 2 compilations for 4 sizes, eps does not specialise ---

COMPILE_CASES = {
    "group_advantages[B]": (lambda s, eps: fastpo.group_advantages(s, group_size=2, eps=eps),
                            lambda b: (torch.randn(b),)),
    "group_advantages[B,T]": (lambda s, m, ids, eps: fastpo.group_advantages(s, m, group_ids=ids, eps=eps),
                              lambda b: (torch.randn(b, 5), torch.rand(b, 5) > 0.3, torch.arange(b) % 3)),
    "reinforce_pp": (lambda s, m, eps: fastpo.group_advantages(s, m, group_size=2, method="reinforce_pp", eps=eps),
                     lambda b: (torch.randn(b, 5), torch.rand(b, 5) > 0.3)),
    "grpo_passk": (lambda s, eps: fastpo.group_advantages(s, group_size=2, method="grpo_passk", eps=eps),
                   lambda b: (torch.randn(b),)),
    "process_advantages": (lambda r, e, m, eps: fastpo.process_advantages(r, e, m, group_size=2, num_tokens=7, eps=eps),
                           lambda b: (torch.randn(b, 3), torch.randint(0, 7, (b, 3)), torch.rand(b, 3) > 0.3)),
    "whiten": (lambda x, m, eps: fastpo.whiten(x, m, eps=eps), lambda b: (torch.randn(b, 5), torch.rand(b, 5) > 0.3)),
}


@pytest.mark.parametrize("name", list(COMPILE_CASES))
@pytest.mark.parametrize("dynamic", [True, None])
def test_compile_counts(cpu_backend, name, dynamic):
    fn, make = COMPILE_CASES[name]
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, dynamic=dynamic, fullgraph=True)
    for i, b in enumerate((4, 6, 8, 10)):
        args = make(b)
        eps = 1e-6 * (i + 1)
        _close(compiled(*args, eps), fn(*args, eps))
    assert counter.frame_count <= 2, (name, counter.frame_count)
