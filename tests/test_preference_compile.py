"""Issue 20 §1 for the preference losses: torch.compile with dynamic shapes and changing scalars.

Counts compilations with ``torch._dynamo.testing.CompileCounter`` (which also runs each captured
graph, so the compiled values are checked against eager ones). Before the fix, ``dynamic=True``
with ``fullgraph=True`` failed with "torch.* op returned non-Tensor" (``math.isfinite`` on a
SymFloat scalar) and the shape check hashed symbolic sizes.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import fastpo

SIZES = (3, 5, 8, 13)


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed + n)
    c, r = -20 * torch.rand(n, generator=g) - 0.1, -20 * torch.rand(n, generator=g) - 0.1
    return [c, r, c + torch.randn(n, generator=g), r + torch.randn(n, generator=g),
            torch.randint(1, 9, (n,), generator=g), torch.rand(n, generator=g) + 0.5]


# name -> (loss of the six inputs and two scalars a, b; the scalar values tried)
LOSSES = {
    "dpo_robust": (lambda c, r, rc, rr, n, w, a, b: fastpo.dpo_loss(
        c, r, rc, rr, beta=a, loss_type="robust", label_smoothing=b), [(0.1, 0.1), (0.2, 0.05), (0.3, 0.2)]),
    "dpo_mpo": (lambda c, r, rc, rr, n, w, a, b: fastpo.dpo_loss(
        c, r, rc, rr, beta=a, loss_type=["exo_pair", "aot", "discopop", "ipo", "sigmoid_norm"],
        loss_weights=[1.0, 0.5, 0.2, b, 1.0], label_smoothing=0.01, discopop_tau=b, chosen_lengths=n,
        rejected_lengths=n + 1), [(0.1, 0.3), (0.2, 0.5), (0.4, 0.7)]),
    "dpo_fdiv_wpo_rpo": (lambda c, r, rc, rr, n, w, a, b: fastpo.dpo_loss(
        c / n, r / n, rc / n, rr / n, beta=a, f_divergence="alpha_divergence", f_alpha=b, weights=w,
        nll=-(c / n).mean(), rpo_alpha=a + b), [(0.1, 0.3), (0.2, 0.5), (0.3, 1.0)]),
    "simpo": (lambda c, r, rc, rr, n, w, a, b: fastpo.simpo_loss(c / n, r / n, beta=a, gamma=b),
              [(2.0, 1.0), (2.5, 0.5), (3.0, 0.0)]),
    "orpo": (lambda c, r, rc, rr, n, w, a, b: fastpo.orpo_loss(c / 20, r / 20, beta=a),
             [(0.1, 0.0), (0.2, 0.0), (0.5, 0.0)]),
    "kto": (lambda c, r, rc, rr, n, w, a, b: fastpo.kto_loss(
        c, rc, n > 4, beta=a, desirable_weight=b, undesirable_weight=2 * b, kl_ref_point=b),
        [(0.1, 0.3), (0.2, 0.5), (0.3, 1.5)]),
    "kto_apo_zero_unpaired": (lambda c, r, rc, rr, n, w, a, b: fastpo.kto_loss(
        c, rc, n > 4, beta=a, desirable_weight=b, loss_type="apo_zero_unpaired"), [(0.1, 0.3), (0.2, 0.5)]),
    "cpo_simpo": (lambda c, r, rc, rr, n, w, a, b: fastpo.cpo_loss(
        c / n, r / n, beta=a, loss_type="simpo", simpo_gamma=b, label_smoothing=0.1, nll=-(c / n).mean(),
        cpo_alpha=b), [(0.1, 0.3), (0.2, 0.5), (0.3, 0.0)]),
    "alphapo": (lambda c, r, rc, rr, n, w, a, b: fastpo.cpo_loss(
        c / n, r / n, beta=a, loss_type="alphapo", alpha=b, simpo_gamma=a), [(0.1, 0.3), (0.2, 0.5)]),
}


def _value(out):
    return torch.stack([out.loss] + [out.metrics[k] for k in sorted(out.metrics)])


def _check_calls(fn, compiled, sizes, scalars):
    for n in sizes:
        xs = _inputs(n)
        for a, b in scalars:
            torch.testing.assert_close(_value(compiled(*xs, a, b)), _value(fn(*xs, a, b)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
def test_dynamic_fullgraph_compiles_once(name):
    """dynamic=True, fullgraph=True: 4 batch sizes x changing scalars, one graph."""
    fn, scalars = LOSSES[name]
    torch._dynamo.reset()
    counter = CompileCounter()
    _check_calls(fn, torch.compile(fn, backend=counter, dynamic=True, fullgraph=True), SIZES, scalars)
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", list(LOSSES))
def test_automatic_dynamic_shapes_and_scalars(name):
    """Default (automatic) dynamic: ≤ 2 compilations for 4 batch sizes, ≤ 2 for changing scalars."""
    fn, scalars = LOSSES[name]
    torch._dynamo.reset()
    counter = CompileCounter()
    _check_calls(fn, torch.compile(fn, backend=counter, fullgraph=True), SIZES, scalars[:1])
    assert counter.frame_count <= 2
    torch._dynamo.reset()
    counter = CompileCounter()
    _check_calls(fn, torch.compile(fn, backend=counter, fullgraph=True), SIZES[:1], scalars * 2)
    assert counter.frame_count <= 2


@pytest.mark.parametrize("name", list(LOSSES))
def test_mark_dynamic_batch_dim(name):
    """mark_dynamic(dim 0) on every input: no ConstraintViolationError, one graph for two sizes."""
    fn, scalars = LOSSES[name]
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for n in SIZES[:2]:
        xs = _inputs(n)
        for x in xs:
            torch._dynamo.mark_dynamic(x, 0)
        a, b = scalars[0]
        torch.testing.assert_close(_value(compiled(*xs, a, b)), _value(fn(*xs, a, b)), rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1


def test_token_helpers_compile_dynamic(cpu_backend):
    """nll_loss, ld_sequence_logprobs and wpo_weights trace with dynamic B and T (through the fused op)."""
    def fn(tc, tr, mc, mr, lssp, alpha):
        c, r = fastpo.ld_sequence_logprobs(tc, tr, mc, mr, ld_alpha=alpha)
        w = fastpo.wpo_weights(tc, lssp, mc) * fastpo.wpo_weights(tr, lssp, mr)
        return fastpo.dpo_loss(c, r, weights=w, nll=fastpo.nll_loss(tc, mc), rpo_alpha=alpha).loss

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    for b, t, alpha in ((3, 4, 0.5), (5, 7, 0.2), (4, 6, 1.0)):
        g = torch.Generator().manual_seed(b * t)
        tc, tr = -3 * torch.rand(b, t, generator=g), -3 * torch.rand(b, t, generator=g)
        mc, mr = torch.rand(b, t, generator=g) < 0.7, torch.rand(b, t, generator=g) < 0.7
        lssp = 2 * tc - 0.2
        torch.testing.assert_close(compiled(tc, tr, mc, mr, lssp, alpha), fn(tc, tr, mc, mr, lssp, alpha))
    assert counter.frame_count == 1


def test_aot_autograd_dynamic_gradients_without_recompiles(monkeypatch):
    """Through AOT autograd (the inductor path's front end), with backward: gradients match eager for
    changing sizes and scalars, and no call recompiles (error_on_recompile)."""
    def fn(c, r, rc, rr, n, w, a, b):
        dpo = fastpo.dpo_loss(c, r, rc, rr, beta=a, loss_type=["exo_pair", "discopop"], loss_weights=[1.0, b],
                              label_smoothing=0.01, discopop_tau=b, weights=w)
        return dpo.loss + fastpo.kto_loss(c, rc, n > 4, beta=a, kl_ref_point=b).loss

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", dynamic=True, fullgraph=True)
    for i, (n, a, b) in enumerate(((3, 0.1, 0.3), (6, 0.2, 0.5))):
        results = []
        for f in (compiled, fn):
            xs = _inputs(n)
            xs[0].requires_grad_()
            xs[1].requires_grad_()
            loss = f(*xs, a, b)
            loss.backward()
            results.append((loss.detach(), xs[0].grad, xs[1].grad))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if i == 0:
            monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
