"""Issue 20 §1 for policy_loss, value_loss, gae and sequence_logprobs: ``torch.compile`` with dynamic
shapes and changing scalars.

* ``dynamic=True, fullgraph=True`` traces each op, padded and packed, and compiles once for four batch
  shapes and four values of its scalars (γ and λ of gae, the clip of value_loss, a 0-d tensor or an
  int ``num_tokens`` of policy_loss);
* automatic dynamic shapes (no ``dynamic`` argument) compile at most twice for four shapes;
* a new ``PolicyLossConfig`` object (a frozen constant) recompiles, as documented.

The functions are compiled with ``aot_eager`` (so the fake implementations and autograd formulas of
the custom ops are traced too) and gradients are compared with eager ones. Compilations are counted as
dynamo's cache entries of the compiled function (one per compiled variant; an analysis that dynamo
restarts within one compilation, to specialise a float read from a global config, is not a variant).
"""

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

import fastpo

SHAPES = [(2, 3), (3, 5), (4, 2), (5, 7)]  # (B, T) of four steps


def _batch(b, t, seed, packed):
    g = torch.Generator().manual_seed(seed)
    shape = (b * t,) if packed else (b, t)
    x = [torch.randn(shape, generator=g) * 0.3 for _ in range(4)]
    mask = torch.rand(shape, generator=g) > 0.25
    cu = None
    if packed:  # ragged: sequence i has i + 1 ... tokens (one may be empty)
        cuts = torch.sort(torch.randint(0, b * t + 1, (b - 1,), generator=g)).values
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([b * t])])
    return x, mask, cu


def _policy(logp, old, adv, ref, mask, cu, num_tokens):
    cfg = fastpo.PolicyLossConfig(kl_coef=0.05, dual_clip=3.0)
    out = fastpo.policy_loss(logp, old, adv, mask, cu_seqlens=cu, ref_logp=ref, num_tokens=num_tokens, config=cfg)
    return out.loss, out.metrics["clip_frac"], out.metrics["ref_kl"]


def _value(values, old, returns, mask, cu, clip):
    out = fastpo.value_loss(values, old, returns, mask, cu_seqlens=cu, clip=clip)
    return out.loss, out.metrics["vf_clip_frac"]


def _gae(rewards, values, mask, cu, gamma, lam):
    return fastpo.gae(rewards, values, mask, gamma=gamma, lam=lam, cu_seqlens=cu)


def _sequence(token_logp, mask, cu):
    return (fastpo.sequence_logprobs(token_logp, mask, cu_seqlens=cu, average=True),)


def _steps(op, packed, int_num_tokens=False):
    """(function, [(differentiable input, args)] for the four steps)."""
    steps = []
    for i, (b, t) in enumerate(SHAPES):
        (x, y, z, w), mask, cu = _batch(b, t, i, packed)
        x = x.requires_grad_()
        if op == "policy_loss":
            n = 7 + 3 * i if int_num_tokens else torch.tensor(7.0 + 3 * i)
            steps.append((x, (x, y, z, w, mask, cu, n)))
        elif op == "value_loss":
            steps.append((x, (x, y, z, mask, cu, 0.1 + 0.05 * i)))
        elif op == "gae":
            steps.append((None, (x.detach(), y, mask, cu, 0.9 + 0.02 * i, 0.8 + 0.05 * i)))
        else:
            steps.append((x, (x, mask, cu)))
    fn = {"policy_loss": _policy, "value_loss": _value, "gae": _gae, "sequence_logprobs": _sequence}[op]
    return fn, steps


def _run(fn, steps):
    results = []
    for x, args in steps:
        outs = fn(*args)
        grad = None
        if x is not None:
            (grad,) = torch.autograd.grad(outs[0].sum(), x)
        results.append(([o.detach() for o in outs], grad))
    return results


def _check_against_eager(compiled, fn, steps):
    for (got, got_grad), (want, want_grad) in zip(_run(compiled, steps), _run(fn, steps)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        if want_grad is not None:
            torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-5)


OPS = ["policy_loss", "value_loss", "gae", "sequence_logprobs"]


def _compile_and_count(fn, steps, dynamic):
    """Compilations of ``fn`` over ``steps`` (checked against eager)."""
    torch._dynamo.reset()
    _check_against_eager(torch.compile(fn, backend="aot_eager", dynamic=dynamic, fullgraph=True), fn, steps)
    return len(_debug_get_cache_entry_list(fn.__code__))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("op", OPS)
def test_dynamic_fullgraph_compiles_once(backend, op, packed):
    fn, steps = _steps(op, packed)
    assert _compile_and_count(fn, steps, True) == 1


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("op", OPS)
def test_automatic_dynamic_compiles_at_most_twice(cpu_backend, op, packed):
    # the backend is a constant of the graph: the Triton path traces alike (test above)
    fn, steps = _steps(op, packed)
    assert _compile_and_count(fn, steps, None) <= 2


@pytest.mark.parametrize("dynamic, most", [(True, 1), (None, 2)], ids=["dynamic", "automatic"])
def test_int_num_tokens_does_not_recompile_per_value(cpu_backend, dynamic, most):
    """Four token counts as plain ints, at one shape: an int becomes a SymInt, not a constant."""
    fn, steps = _steps("policy_loss", False, int_num_tokens=True)
    x0, args0 = steps[0]
    steps = [(x0, args0[:-1] + (n,)) for n in (7, 10, 13, 16)]
    assert _compile_and_count(fn, steps, dynamic) <= most


def test_a_new_config_recompiles(cpu_backend):
    """A PolicyLossConfig is a frozen constant of the graph: a different one recompiles (expected)."""
    (logp, old, adv, _), mask, _ = _batch(3, 4, 0, False)

    def fn(cfg):
        return fastpo.policy_loss(logp, old, adv, mask, config=cfg).loss

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", dynamic=True, fullgraph=True)
    for cfg in (fastpo.DAPO, fastpo.PPO, fastpo.DAPO):
        torch.testing.assert_close(compiled(cfg), fn(cfg))
    assert len(_debug_get_cache_entry_list(fn.__code__)) == 2
