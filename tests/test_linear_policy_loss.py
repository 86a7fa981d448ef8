"""fastpo.linear_policy_loss: equal to policy_loss(linear_token_logprobs(...)) for every config and backend,
three lm_head GEMMs on its one-pass path (four on the two-phase one), never [N, V], compile, errors."""

import dataclasses

import pytest
import torch

import fastpo
from fastpo import reference
from helpers import assert_raises_unmodified, make_labels
from test_linear_token_logprobs import _LargestAllocation

R = dataclasses.replace
TOKEN_LOCAL = {
    "grpo": fastpo.GRPO, "dapo": fastpo.DAPO, "dr_grpo": fastpo.DR_GRPO, "ppo": fastpo.PPO, "bnpo": fastpo.BNPO,
    "cispo": fastpo.CISPO, "cispo_trl": fastpo.CISPO_TRL, "sapo": fastpo.SAPO,
    "gpg": fastpo.GPG, "dppo_tv": fastpo.DPPO_TV, "dppo_kl": fastpo.DPPO_KL, "dro": fastpo.DRO,
    "delta": R(fastpo.DAPO, delta=1.5), "token_sum": R(fastpo.DAPO, aggregation="token_sum"),
    "seq_sum_count_empty": R(fastpo.GRPO, aggregation="seq_mean_token_sum", count_empty_sequences=True),
    "entropy_seq_is": R(fastpo.GRPO, entropy_coef=0.01, rollout_is="sequence_truncate", rollout_is_cap=1.2),
    "token_is_mask": R(fastpo.DAPO, rollout_is="token_mask", rollout_is_cap=1.05),
    "k2plus_bias": R(fastpo.GRPO, kl_estimator="k2+", kl_bias_correction=True),
}
# Configs with policy_loss's pre-pass (token selection, batch-level rollout correction): served by the composition.
PREPASS = {"clip_cov": fastpo.CLIP_COV, "kl_cov": fastpo.KL_COV,
           "entropy_quantile": R(fastpo.DAPO, top_entropy_quantile=0.5),
           "rejection": R(fastpo.GRPO, rollout_is="sequence_truncate", rollout_rejection="token_k3,seq_mean_k2",
                          rollout_rejection_threshold=0.05),
           "product_floor": R(fastpo.DAPO, rollout_is="sequence_truncate", rollout_is_sequence_ratio="product",
                              rollout_is_floor=0.5, rollout_is_batch_normalize=True)}
NON_LOCAL = {"gspo": fastpo.GSPO, "luspo": fastpo.LUSPO, "gmpo": fastpo.GMPO, "vespo": fastpo.VESPO,
             "gspo_entropy_is": R(fastpo.GSPO, entropy_coef=-0.02, rollout_is="sequence_mask", rollout_is_cap=1.3)}
ALL = {**TOKEN_LOCAL, **NON_LOCAL, **PREPASS}


def _batch(packed, dtype=torch.float32, *, n_seqs=4, T=9, D=6, V=40, seed=0, bias=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shape = (n_seqs * T,) if packed else (n_seqs, T)
    lengths = [T] * n_seqs  # ragged: an empty sequence, a short one and a long one
    if n_seqs >= 3:
        lengths[1], lengths[-1] = 0, 2 * T
    if n_seqs >= 4:
        lengths[2], lengths[-1] = T - 3, 2 * T + 3
    lengths = torch.tensor(lengths) if packed else None
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]) if packed else None
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    t = dict(hidden=rnd(*shape, D), weight=rnd(V, D) * 0.7, bias=rnd(V) if bias else None,
             labels=make_labels(shape, V, generator=g, ignore_fraction=0.1),
             old_logp=rnd(*shape) * 0.4 - 3.5, advantages=rnd(*shape), ref_logp=rnd(*shape) * 0.4 - 3.5,
             mask=torch.rand(shape, generator=g) > 0.2, rollout_logp=None, cu_seqlens=cu)
    t["rollout_logp"] = t["old_logp"] + 0.1 * rnd(*shape)
    t["mask"] &= t["labels"] != -100
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}


def _kwargs(t, config, **extra):
    kw = dict(cu_seqlens=t["cu_seqlens"], ref_logp=t["ref_logp"], config=config, bias=t["bias"],
              rollout_logp=t["rollout_logp"] if config.rollout_is != "none" else None)
    kw.update(extra)
    return kw


def _leaves(t):
    return [x.detach().clone().requires_grad_() if x is not None else None for x in (t["hidden"], t["weight"],
                                                                                    t["bias"])]


def fused(t, config, chunk_size=None, **extra):
    torch.manual_seed(1234)  # Clip-Cov's random pick: the same draw in every implementation
    h, w, b = _leaves(t)
    kw = _kwargs(t, config, bias=b, **extra)
    out = fastpo.linear_policy_loss(h, w, t["labels"], t["old_logp"], t["advantages"], t["mask"],
                                    chunk_size=chunk_size, **kw)
    out.loss.backward()
    return out, [x.grad if x is not None else None for x in (h, w, b)]


def composed(t, config, impl=fastpo, **extra):
    """policy_loss(linear_token_logprobs(...)) of ``impl`` (fastpo's fused ops, or fastpo.reference)."""
    torch.manual_seed(1234)
    h, w, b = _leaves(t)
    ent = config.entropy_coef != 0 or config.top_entropy_quantile < 1 or extra.pop("compute_entropy", False)
    kw = _kwargs(t, config, **extra)
    kw.pop("bias")
    if impl is fastpo:
        scored = fastpo.linear_token_logprobs(h, w, t["labels"], bias=b, return_entropy=ent)
    else:
        scored = reference.linear_token_logprobs(h, w, t["labels"], b, 1.0, -100, ent)
    logp, entropy = scored if ent else (scored, None)
    out = impl.policy_loss(logp, t["old_logp"], t["advantages"], t["mask"], entropy=entropy, **kw)
    out.loss.backward()
    return out, [x.grad if x is not None else None for x in (h, w, b)]


def _assert_same(got, want, atol, rtol=1e-5):
    (o1, g1), (o2, g2) = got, want
    torch.testing.assert_close(o1.loss.detach(), o2.loss.detach().to(o1.loss.dtype), atol=atol, rtol=rtol)
    assert o1.metrics.keys() == o2.metrics.keys()
    for k in o1.metrics:
        torch.testing.assert_close(o1.metrics[k], o2.metrics[k].to(o1.metrics[k].dtype), atol=atol, rtol=rtol,
                                   msg=lambda m: f"metric {k}: {m}")
    for name, a, b in zip(("hidden", "weight", "bias"), g1, g2):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b.to(a.dtype), atol=atol, rtol=rtol, msg=lambda m: f"grad {name}: {m}")


def test_token_local_flags():
    assert all(c.token_local for c in TOKEN_LOCAL.values())
    assert not any(c.token_local for c in NON_LOCAL.values())
    assert not PREPASS["clip_cov"].token_local and PREPASS["rejection"].token_local


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cpu_equals_composition_float64(cpu_backend, name, packed):
    """Equal to fastpo's own policy_loss(linear_token_logprobs(...)) to float64 rounding, and to the reference
    (whose exp differs from the C++ kernels' in the last bits of float32-level accuracy for IS weights)."""
    t = _batch(packed, torch.float64)
    want, spec = composed(t, ALL[name]), composed(t, ALL[name], reference)
    for chunk in (1, 7, None):  # one row, ragged chunks crossing sequences, one chunk
        got = fused(t, ALL[name], chunk)
        _assert_same(got, want, atol=1e-12, rtol=1e-10)
        _assert_same(got, spec, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", ["grpo", "cispo", "entropy_seq_is", "gspo_entropy_is"])
def test_backends_equal_fused_composition(backend, name):
    """Every backend: equal to policy_loss(linear_token_logprobs(...)) of the same backend, to fp32 rounding."""
    t = _batch(True, torch.float32, device=backend)
    _assert_same(fused(t, ALL[name], chunk_size=8), composed(t, ALL[name]), atol=2e-6, rtol=2e-5)


def test_is_weights_entropy_metric_and_num_tokens(cpu_backend):
    t = _batch(False, torch.float64)
    w = torch.rand(t["labels"].shape, dtype=torch.float64) + 0.5
    cfg = fastpo.DAPO
    extra = dict(is_weights=w, num_tokens=torch.tensor(50.0, dtype=torch.float64), compute_entropy=True)
    got = fused(t, cfg, 5, **extra)
    assert float(got[0].metrics["entropy"]) > 0
    _assert_same(got, composed(t, cfg, reference, **extra), atol=1e-10, rtol=1e-9)


class _GemmFlops:
    """Counts the FLOPs of the matrix products the lm_head ops issue (F.linear, torch.mm, Tensor.addmm_):
    FlopCounterMode does not see inside a custom op."""

    def __init__(self, monkeypatch):
        self.flops = 0
        linear, mm, addmm_ = torch.nn.functional.linear, torch.mm, torch.Tensor.addmm_

        def count(a, b_cols):
            self.flops += 2 * a.shape[0] * a.shape[1] * b_cols

        def counted_linear(x, w, b=None):
            count(x.reshape(-1, x.shape[-1]), w.shape[0])
            return linear(x, w, b)

        def counted_mm(a, b, **kw):
            count(a, b.shape[1])
            return mm(a, b, **kw)

        def counted_addmm_(self_, a, b, **kw):
            count(a, b.shape[1])
            return addmm_(self_, a, b, **kw)

        monkeypatch.setattr(torch.nn.functional, "linear", counted_linear)
        monkeypatch.setattr(torch, "mm", counted_mm)
        monkeypatch.setattr(torch.Tensor, "addmm_", counted_addmm_)


@pytest.mark.parametrize("name,gemms", [("dapo", 3), ("cispo", 3), ("gspo", 4), ("gmpo", 4)])
def test_gemm_count(cpu_backend, monkeypatch, name, gemms):
    """One-pass configs cost three N·V·D GEMMs (logits, ∂h, ∂W), two-phase ones four (+ the recompute);
    a frozen lm_head skips ∂W, and no gradient at all leaves the forward's one."""
    t = _batch(True, torch.float32, bias=False)
    n, d = t["hidden"].shape
    gemm = 2 * n * d * t["weight"].shape[0]
    counter = _GemmFlops(monkeypatch)
    h, w = t["hidden"].clone().requires_grad_(), t["weight"].clone().requires_grad_()
    args = (t["labels"], t["old_logp"], t["advantages"], t["mask"])
    kw = dict(cu_seqlens=t["cu_seqlens"], ref_logp=t["ref_logp"], config=ALL[name], chunk_size=8)
    for weight, want in ((w, gemms), (t["weight"], gemms - 1)):  # trainable, then frozen
        counter.flops = 0
        fastpo.linear_policy_loss(h, weight, *args, **kw).loss.backward()
        assert counter.flops == want * gemm
    counter.flops = 0
    with torch.no_grad():
        fastpo.linear_policy_loss(h, w, *args, **kw)
    assert counter.flops == gemm
    counter.flops = 0  # the composition it replaces: four
    logp = fastpo.linear_token_logprobs(h, w, t["labels"], chunk_size=8)
    fastpo.policy_loss(logp, *args[1:], cu_seqlens=t["cu_seqlens"], ref_logp=t["ref_logp"],
                       config=ALL[name]).loss.backward()
    assert counter.flops == 4 * gemm


def test_frozen_weight_gradients_unchanged(cpu_backend):
    t = _batch(True, torch.float64)
    h = t["hidden"].clone().requires_grad_()
    out = fastpo.linear_policy_loss(h, t["weight"], t["labels"], t["old_logp"], t["advantages"], t["mask"],
                                    **_kwargs(t, fastpo.GRPO), chunk_size=4)
    out.loss.backward()
    _, want = composed(t, fastpo.GRPO, reference)
    torch.testing.assert_close(h.grad, want[0])


@pytest.mark.parametrize("name", ["dapo", "gspo"])
def test_never_materialises_full_logits(cpu_backend, name):
    n_seqs, T, D, V, chunk = 8, 64, 16, 3000, 32
    t = _batch(False, torch.float32, n_seqs=n_seqs, T=T, D=D, V=V, bias=False)
    with _LargestAllocation() as seen:
        fused(t, ALL[name], chunk_size=chunk)
    assert seen.largest <= max(chunk * V, V * D)
    assert seen.largest < n_seqs * T * V // 8


def test_gradcheck_float64(cpu_backend):
    t = _batch(True, torch.float64, n_seqs=3, T=4, D=3, V=7)
    # Configs whose gradient is the true derivative (GSPO-token, CISPO, geo_mean, ... use stop-gradients).
    for cfg in (fastpo.GRPO, R(fastpo.DR_GRPO, entropy_coef=0.1, rollout_is="sequence_truncate")):
        def f(h, w, b):
            return fastpo.linear_policy_loss(h, w, t["labels"], t["old_logp"], t["advantages"], t["mask"],
                                             chunk_size=3, **_kwargs(t, cfg, bias=b)).loss
        assert torch.autograd.gradcheck(f, _leaves(t))


def test_upstream_gradient_and_16bit(cpu_backend):
    t = _batch(False, torch.float32)
    h, w, b = _leaves(t)
    out = fastpo.linear_policy_loss(h, w, t["labels"], t["old_logp"], t["advantages"], t["mask"],
                                    **_kwargs(t, fastpo.DAPO, bias=b))
    (3.0 * out.loss).backward()
    _, want = composed(t, fastpo.DAPO, reference)
    torch.testing.assert_close(h.grad, 3.0 * want[0], atol=1e-6, rtol=1e-5)
    t16 = {k: (v.to(torch.bfloat16) if k in ("hidden", "weight", "bias") else v) for k, v in t.items()}
    got, grads = fused(t16, fastpo.DAPO)
    assert grads[0].dtype == grads[1].dtype == torch.bfloat16 and got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, out.loss.detach(), atol=5e-2, rtol=5e-2)
    _, want16 = composed(t16, fastpo.DAPO)  # the same bf16 GEMMs; only the order of the final scaling differs
    for a, b in zip(grads, want16):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=2e-2)


def test_masked_garbage_and_empty(cpu_backend):
    t = _batch(True, torch.float64)
    off = ~t["mask"]
    dirty = dict(t, old_logp=t["old_logp"].masked_fill(off, float("nan")),
                 advantages=t["advantages"].masked_fill(off, float("inf")))
    got, want = fused(dirty, fastpo.GRPO, 5), composed(t, fastpo.GRPO, reference)
    assert all(torch.isfinite(g).all() for g in got[1])
    _assert_same(got, want, atol=1e-10, rtol=1e-9)
    empty = _batch(True, torch.float64, n_seqs=1, T=0)
    out, grads = fused(empty, fastpo.GRPO)
    assert float(out.loss.detach()) == 0 and grads[1].abs().sum() == 0


def test_double_backward_raises(cpu_backend):
    t = _batch(True, torch.float64)
    h, w, b = _leaves(t)
    loss = fastpo.linear_policy_loss(h, w, t["labels"], t["old_logp"], t["advantages"], t["mask"],
                                     **_kwargs(t, fastpo.GRPO, bias=b)).loss
    with pytest.raises(NotImplementedError, match="double backward"):
        (gh,) = torch.autograd.grad(loss, h, create_graph=True)
        gh.sum().backward()
    loss = fastpo.linear_policy_loss(h, w, t["labels"], t["old_logp"], t["advantages"], t["mask"],
                                     **_kwargs(t, fastpo.GRPO, bias=b)).loss
    loss.backward(retain_graph=True)  # a retained graph: later backwards rescale out of place
    first = [g.clone() for g in (h.grad, w.grad)]
    h.grad = w.grad = None
    (2.5 * loss).backward(retain_graph=True)
    torch.testing.assert_close(h.grad, 2.5 * first[0])
    torch.testing.assert_close(w.grad, 2.5 * first[1])


def test_backward_allocates_no_second_weight_gradient(cpu_backend):
    t = _batch(True, torch.float32, D=16, V=3000, bias=False)
    h, w, _ = _leaves(t)
    loss = fastpo.linear_policy_loss(h, w, t["labels"], t["old_logp"], t["advantages"], t["mask"],
                                     **_kwargs(t, fastpo.DAPO, bias=None)).loss
    with _LargestAllocation() as seen:
        loss.backward()
    assert seen.largest < w.numel()  # the forward's float32 buffer, scaled in place, is the gradient


def test_compile_dynamic_fullgraph(cpu_backend):
    torch._dynamo.reset()
    fn = torch.compile(fastpo.linear_policy_loss, fullgraph=True, dynamic=True)
    for n_seqs in (3, 4):
        t = _batch(True, torch.float32, n_seqs=n_seqs)
        h, w, b = _leaves(t)
        out = fn(h, w, t["labels"], t["old_logp"], t["advantages"], t["mask"], **_kwargs(t, fastpo.DAPO, bias=b))
        out.loss.backward()
        want, grads = composed(t, fastpo.DAPO)
        torch.testing.assert_close(out.loss.detach(), want.loss.detach(), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(w.grad, grads[1], atol=2e-6, rtol=1e-5)


def test_errors(cpu_backend):
    t = _batch(True, torch.float32)
    base = dict(hidden=t["hidden"], weight=t["weight"], labels=t["labels"], old_logp=t["old_logp"],
                advantages=t["advantages"], mask=t["mask"], cu_seqlens=t["cu_seqlens"], ref_logp=t["ref_logp"])
    call = fastpo.linear_policy_loss
    assert_raises_unmodified(call, dict(base, labels=t["labels"][:-1]), ValueError, fragment="labels")
    assert_raises_unmodified(call, dict(base, labels=t["labels"].float()), TypeError, fragment="labels")
    assert_raises_unmodified(call, dict(base, weight=t["weight"][:, :-1]), ValueError, fragment="weight")
    assert_raises_unmodified(call, dict(base, weight=t["weight"].double()), TypeError, fragment="weight")
    assert_raises_unmodified(call, dict(base, advantages=t["advantages"][:-1]), ValueError, fragment="advantages")
    assert_raises_unmodified(call, dict(base, ref_logp=None), ValueError, fragment="ref_logp")
    assert_raises_unmodified(call, dict(base, config=R(fastpo.DAPO, entropy_coef=0.1), compute_entropy=False),
                             ValueError, fragment="compute_entropy")
    assert_raises_unmodified(call, dict(base, num_tokens=10), ValueError, fragment="num_tokens")
    assert_raises_unmodified(call, dict(base, chunk_size=0), ValueError, fragment="chunk_size")
    assert_raises_unmodified(call, dict(base, labels=t["labels"].clamp(min=0) + 40), ValueError, fragment="label")
    assert_raises_unmodified(call, dict(base, config="grpo"), TypeError, fragment="config")
    assert_raises_unmodified(call, dict(base, temperature=0.0), ValueError, fragment="temperature")
    assert_raises_unmodified(call, dict(base, generator=torch.Generator()), ValueError, fragment="generator")
