"""fastpo.multi_reward_advantages (TRL's scale_rewards / multi_objective_aggregation, verl's gdpo) against
the reference and against TRL 1.16's own advantage block (executed from the installed grpo_trainer.py),
and fastpo.overlong_penalty against TRL's get_soft_overlong_punishment and verl's DAPO formula."""

import ast
import textwrap

import pytest
import torch

import fastpo
from helpers import assert_raises_unmodified

NAN = float("nan")


def _close(got, want, tol=2e-5):
    torch.testing.assert_close(got.cpu().to(want.dtype), want.cpu(), atol=tol, rtol=tol)


def _case(seed, b=12, k=3, nan_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 3, (b, k), generator=g).float()  # ties and flat groups
    s[:4, 1] = 1.0
    s[torch.rand(b, k, generator=g) < nan_frac] = NAN
    s[5] = NAN  # an unscorable sequence
    return s


OPTIONS = [("sum_then_normalize", "group"), ("sum_then_normalize", "batch"), ("sum_then_normalize", "none"),
           ("normalize_then_sum", "group"), ("gdpo", "group"), ("gdpo", "none")]


@pytest.mark.parametrize("aggregation,scale", OPTIONS)
def test_matches_reference(backend, aggregation, scale):
    s = _case(0)
    w = torch.tensor([1.0, 0.5, 2.0])
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(12, 4, generator=g) > 0.3
    for kwargs in (dict(group_size=4), dict(group_ids=torch.tensor([3, 1, 3, 1, 0, 0, 0, 2, 2, 2, 2, 9]))):
        for m in (None, mask):
            want = fastpo.reference.multi_reward_advantages(s, m, reward_weights=w, aggregation=aggregation,
                                                            scale_rewards=scale,
                                                            eps=1e-6 if aggregation == "gdpo" else 1e-4, **kwargs)
            dev = {k: (v.to(backend) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            got = fastpo.multi_reward_advantages(s.to(backend), None if m is None else m.to(backend), reward_weights=w,
                                                 aggregation=aggregation, scale_rewards=scale, **dev)
            assert torch.isfinite(got).all()
            _close(got, want)
            assert (got[5] == 0).all()  # unscorable


def test_single_reward_is_group_advantages(backend):
    s = torch.randn(8, generator=torch.Generator().manual_seed(2)).to(backend)
    for scale, method in (("group", "grpo"), ("batch", "grpo_batch_std"), ("none", "dr_grpo")):
        _close(fastpo.multi_reward_advantages(s, group_size=4, scale_rewards=scale),
               fastpo.group_advantages(s, group_size=4, method=method, eps=1e-4))


def _trl_source(relative: str) -> str:
    """The text of an installed TRL module, read without importing it (importing grpo_trainer takes ~20 s)."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("trl")
    if spec is None or spec.origin is None:
        pytest.skip("TRL is not installed: the parity test runs TRL's own code")
    return (pathlib.Path(spec.origin).parent / relative).read_text()


def _trl_advantages(rewards_per_func, weights, num_generations, aggregation, scale_rewards):
    """TRL 1.16's own code, executed: the advantage block of GRPOTrainer._generate_and_score_completions
    (from ``unscorable_mask = ...`` to ``advantages = torch.nan_to_num(...)``) and ``trl.trainer.utils.nanstd``."""
    lines = _trl_source("trainer/grpo_trainer.py").splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("unscorable_mask = "))
    end = next(i for i, ln in enumerate(lines) if "advantages = torch.nan_to_num(advantages" in ln)
    block = textwrap.dedent("\n".join(lines[start:end + 1]))
    utils = ast.parse(_trl_source("trainer/utils.py"))
    nanstd_def = next(n for n in utils.body if isinstance(n, ast.FunctionDef) and n.name == "nanstd")
    scope = dict(torch=torch)
    exec(compile(ast.Module([nanstd_def], type_ignores=[]), "trl_nanstd", "exec"), scope)

    class Self:
        pass

    me = Self()
    me.multi_objective_aggregation, me.scale_rewards = aggregation, scale_rewards
    me.reward_weights, me.reward_funcs = weights, [None] * weights.numel()
    scope.update(self=me, rewards_per_func=rewards_per_func, num_generations=num_generations, device="cpu")
    exec(compile(block, "trl_grpo_advantages", "exec"), scope)
    return scope["advantages"]


@pytest.mark.parametrize("aggregation,scale", [o for o in OPTIONS if o[0] != "gdpo"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parity_with_trl(backend, aggregation, scale, seed):
    s = _case(seed, b=16)
    if seed == 2:
        s[8:12] = 3.0  # a zero-variance group
    w = torch.tensor([1.0, 0.5, 2.0])
    want = _trl_advantages(s.clone(), w, 4, aggregation, scale)
    got = fastpo.multi_reward_advantages(s.to(backend), group_size=4, reward_weights=w, aggregation=aggregation,
                                         scale_rewards=scale)
    _close(got, want, 1e-5)


ERRORS = [
    ("3-D scores", dict(scores=torch.zeros(4, 2, 1)), ValueError, "scores"),
    ("int scores", dict(scores=torch.zeros(4, 2, dtype=torch.long)), TypeError, "scores"),
    ("bad aggregation", dict(aggregation="mean"), ValueError, "aggregation"),
    ("bad scale", dict(scale_rewards="global"), ValueError, "scale_rewards"),
    ("normalize_then_sum with batch", dict(aggregation="normalize_then_sum", scale_rewards="batch"), ValueError,
     "scale_rewards"),
    ("gdpo with batch", dict(aggregation="gdpo", scale_rewards="batch"), ValueError, "gdpo"),
    ("weights shape", dict(reward_weights=torch.ones(3)), ValueError, "reward_weights"),
    ("weights type", dict(reward_weights=["a", "b"]), TypeError, "reward_weights"),
    ("mask batch", dict(mask=torch.ones(3, 5)), ValueError, "mask"),
    ("no grouping", dict(group_size=None), ValueError, "group_size"),
    ("negative eps", dict(eps=-1.0), ValueError, "eps"),
]


@pytest.mark.parametrize("name,override,exc,fragment", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(cpu_backend, name, override, exc, fragment):
    kwargs = dict(scores=torch.randn(4, 2), group_size=2)
    kwargs.update(override)
    assert_raises_unmodified(fastpo.multi_reward_advantages, kwargs, exc, match=fragment)


def test_compile_dynamic(cpu_backend):
    from torch._dynamo.testing import CompileCounter

    def fn(s, eps):
        return fastpo.multi_reward_advantages(s, group_size=2, aggregation="normalize_then_sum", eps=eps)

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    for i, b in enumerate((4, 6, 8, 10)):
        s = torch.randn(b, 3)
        _close(compiled(s, 1e-4 * (i + 1)), fn(s, 1e-4 * (i + 1)))
    assert counter.frame_count <= 2


# --- overlong_penalty ---


@pytest.mark.parametrize("max_len,buffer", [(100, 20), (16, 16), (10, 0), (7, 3)])
def test_overlong_matches_trl(max_len, buffer):
    rewards = pytest.importorskip("trl.rewards", reason="TRL is not installed")
    lengths = torch.arange(0, max_len + 5)
    want = rewards.get_soft_overlong_punishment(max_len, buffer)([[1] * int(n) for n in lengths])
    got = fastpo.overlong_penalty(lengths, max_len, buffer)
    assert got.dtype == torch.float32
    _close(got, torch.tensor(want, dtype=torch.float32), 1e-6)


def test_overlong_matches_verl_formula():
    # verl/workers/reward_manager/dapo.py: exceed = L − (max − buf); min(−exceed/buf·factor, 0), for L ≤ max
    max_len, buf, factor = 64, 16, 0.7
    lengths = torch.arange(0, max_len + 1)
    want = [min(-(n - (max_len - buf)) / buf * factor, 0) for n in lengths.tolist()]
    _close(fastpo.overlong_penalty(lengths.float(), max_len, buf, factor), torch.tensor(want), 1e-6)
    assert float(fastpo.overlong_penalty(torch.tensor([200]), max_len, buf, factor)) == pytest.approx(-factor)


@pytest.mark.parametrize("kwargs,exc", [
    (dict(lengths=[1, 2]), TypeError), (dict(lengths=torch.ones(2, dtype=torch.bool)), TypeError),
    (dict(max_len=0), ValueError), (dict(buffer=-1), ValueError), (dict(buffer=11), ValueError),
    (dict(factor=-1.0), ValueError), (dict(factor=float("nan")), ValueError), (dict(max_len=10.0), TypeError),
])
def test_overlong_errors(kwargs, exc):
    args = dict(lengths=torch.tensor([3, 9]), max_len=10, buffer=4)
    args.update(kwargs)
    assert_raises_unmodified(fastpo.overlong_penalty, args, exc)


def test_bfloat16_scores_are_upcast(backend):
    s = _case(4).bfloat16()
    got = fastpo.multi_reward_advantages(s.to(backend), group_size=4, aggregation="normalize_then_sum")
    assert got.dtype == torch.float32
    _close(got, fastpo.reference.multi_reward_advantages(s.float(), group_size=4, aggregation="normalize_then_sum"))
