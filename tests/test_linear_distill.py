"""fastpo.linear_distill_loss and sampled_distill_loss: parity with TRL 1.16 (ChunkedDivergenceFunction through
the DistillationTrainer's loss, GKD's generalized_jsd_loss, the SDPO sampled-token loss) and verl's estimators,
reference vs CPU vs Triton, gradcheck, memory, extreme logits, compile, errors."""

import contextlib
import os

import pytest
import torch

import fastpo
from fastpo import reference
from test_linear_token_logprobs import _LargestAllocation

BETAS = [0.0, 0.5, 1.0]


def _inputs(lead=(3, 5), ds=8, dt=6, vocab=37, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(*lead, ds, generator=g).to(dtype)
    ws = (torch.randn(vocab, ds, generator=g) * 0.8).to(dtype)
    ht = torch.randn(*lead, dt, generator=g).to(dtype)
    wt = (torch.randn(vocab, dt, generator=g) * 0.8).to(dtype)
    bs = (0.3 * torch.randn(vocab, generator=g)).to(dtype) if bias else None
    bt = (0.3 * torch.randn(vocab, generator=g)).to(dtype) if bias else None
    mask = torch.rand(lead, generator=g) < 0.7
    mask.view(-1)[0] = False
    return hs, ws, bs, ht, wt, bt, mask


def _run(fn, hs, ws, bs, ht, wt, bt, upstream=None, **kw):
    """(loss, grad_hidden, grad_weight, grad_bias) of (loss·upstream).sum()."""
    params = [t.detach().clone().requires_grad_() if t is not None else None for t in (hs, ws, bs)]
    loss = fn(params[0], params[1], ht, wt, student_bias=params[2], teacher_bias=bt, **kw)
    (loss if upstream is None else loss * upstream).sum().backward()
    return [loss.detach()] + [p.grad if p is not None else None for p in params]


def _close(actual, expected, atol=2e-5, rtol=2e-5):
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None
            continue
        torch.testing.assert_close(a.double(), e.double(), atol=atol, rtol=rtol)


@contextlib.contextmanager
def _blocked(*targets):
    """Make each (object, attribute) raise while active: fastpo must not run a peer's code."""
    saved = [(obj, name, getattr(obj, name)) for obj, name in targets]

    def refuse(*args, **kwargs):
        raise AssertionError("fastpo delegated to the peer implementation")

    for obj, name, _ in saved:
        setattr(obj, name, refuse)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


# ---------------------------------------------------------------- parity with TRL 1.16 and verl

trl_distill = pytest.importorskip("trl.trainer.distillation_trainer", reason="pip install 'fastpo[parity]'")


def _trl_blocks():
    from trl.kernels import chunked_divergence
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    return ((chunked_divergence.ChunkedDivergenceFunction, "apply"), (trl_distill, "_chunked_divergence_loss"),
            (GKDTrainer, "generalized_jsd_loss"), (torch.nn.functional, "kl_div"))


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("transform", [
    {}, {"temperature": 0.7},
    {"temperature": 1.3, "student_logit_softcap": 2.5, "teacher_logit_softcap": 4.0, "teacher_logit_scale": 0.6,
     "student_logit_scale": 1.2}])
def test_parity_trl_chunked_divergence(beta, transform, monkeypatch):
    """The DistillationTrainer's loss (TRL's ChunkedDivergenceFunction over the completion mask) and its student
    gradients, on a ragged [B, K] mask with the chunk not dividing N."""
    hs, ws, bs, ht, wt, bt, mask = _inputs()
    names = {"student_logit_softcap": "student_final_logit_softcapping",
             "teacher_logit_softcap": "teacher_final_logit_softcapping"}

    def trl_loss(h, w, t_h, t_w, *, student_bias, teacher_bias):
        kw = {names.get(k, k): v for k, v in transform.items()}
        return trl_distill._chunked_divergence_loss(
            h, t_h, w, t_w, mask.long(), beta, student_lm_head_bias=student_bias, teacher_lm_head_bias=teacher_bias,
            **kw)[0]

    expected = _run(trl_loss, hs, ws, bs, ht, wt, bt)
    with _blocked(*_trl_blocks()):
        for be in ("cpu",) + (("triton",) if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
                              else ()):
            monkeypatch.setenv("FASTPO_BACKEND", be)
            actual = _run(fastpo.linear_distill_loss, hs, ws, bs, ht, wt, bt, mask=mask, beta=beta, chunk_size=4,
                          **transform)
            _close(actual, expected)
    # num_items_in_batch (gradient accumulation) divides the same sum
    monkeypatch.setenv("FASTPO_BACKEND", "cpu")
    n = 11
    ours = fastpo.linear_distill_loss(hs, ws, ht, wt, mask=mask, beta=beta, student_bias=bs, teacher_bias=bt,
                                      num_items_in_batch=torch.tensor(n), **transform)
    torch.testing.assert_close(ours, expected[0] * mask.sum() / n, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "labels-none"])
def test_parity_trl_gkd_generalized_jsd(beta, reduction, cpu_backend):
    """GKD's generalized_jsd_loss on the full logits: labels with -100, each reduction, temperature."""
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    hs, ws, _, ht, wt, _, _ = _inputs(seed=1, bias=False)
    labels = torch.randint(0, 37, (3, 5), generator=torch.Generator().manual_seed(2))
    labels[0, :3] = -100
    use_labels = reduction != "mean" or beta != 0.3  # the unlabelled mean and batchmean are checked below
    red = "none" if reduction == "labels-none" else reduction

    def gkd(h, w, t_h, t_w, *, student_bias, teacher_bias):
        out = GKDTrainer.generalized_jsd_loss(h @ w.t(), t_h @ t_w.t(), labels=labels if use_labels else None,
                                              beta=beta, temperature=0.8, reduction=red)
        return out.sum(-1) if red == "none" else out  # TRL's "none": the [n, V] elements of the counted tokens

    expected = _run(gkd, hs, ws, None, ht, wt, None)
    with _blocked(*_trl_blocks()):
        def ours(h, w, t_h, t_w, **kw):
            loss = fastpo.linear_distill_loss(h, w, t_h, t_w, labels if use_labels else None, beta=beta,
                                              temperature=0.8, reduction=red, chunk_size=6, **kw)
            return loss[labels != -100] if red == "none" else loss
        actual = _run(ours, hs, ws, None, ht, wt, None)
    _close(actual, expected)
    unlabelled = GKDTrainer.generalized_jsd_loss(hs @ ws.t(), ht @ wt.t(), beta=beta, reduction="batchmean")
    torch.testing.assert_close(fastpo.linear_distill_loss(hs, ws, ht, wt, beta=beta), unlabelled, atol=2e-6,
                               rtol=2e-5)  # / B = 3, kl_div's batchmean


@pytest.mark.parametrize("estimator", ["reinforce", "k1", "abs", "k2", "k3"])
def test_parity_sampled_token_forms(estimator):
    """The sampled-token form against TRL's SDPO sampled_token loss (α = 1) and verl's kl_penalty estimators."""
    from trl.experimental.sdpo.loss_utils import compute_sampled_token_self_distillation_loss
    from verl.trainer.ppo.core_algos import kl_penalty_forward

    g = torch.Generator().manual_seed(3)
    s_logits, t_logits = torch.randn(2, 6, 11, generator=g), 3 * torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    mask = torch.rand(2, 6, generator=g) < 0.7
    s_leaf = s_logits.clone().requires_grad_()
    if estimator == "reinforce":
        peer = compute_sampled_token_self_distillation_loss(s_leaf, t_logits, ids, distillation_alpha=1.0)
    else:
        s_lp = torch.log_softmax(s_leaf, -1).gather(-1, ids[..., None])[..., 0]
        t_lp = torch.log_softmax(t_logits, -1).gather(-1, ids[..., None])[..., 0]
        peer = kl_penalty_forward(s_lp, t_lp, estimator)
    (peer * mask).sum().div(mask.sum()).backward()
    leaf = s_logits.clone().requires_grad_()
    s_lp = torch.log_softmax(leaf, -1).gather(-1, ids[..., None])[..., 0]
    t_lp = torch.log_softmax(t_logits, -1).gather(-1, ids[..., None])[..., 0]
    loss = fastpo.sampled_distill_loss(s_lp, t_lp, mask, estimator=estimator)
    loss.backward()
    torch.testing.assert_close(loss, (peer * mask).sum().detach() / mask.sum())
    torch.testing.assert_close(leaf.grad, s_leaf.grad)
    per_token = fastpo.sampled_distill_loss(s_lp, t_lp, mask, estimator=estimator, reduction="none")
    assert per_token.shape == (2, 6) and bool((per_token[~mask] == 0).all())


# ---------------------------------------------------------------- reference vs CPU vs Triton


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "none", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_three_way(beta, reduction, dtype, backend):
    hs, ws, bs, ht, wt, bt, mask = _inputs(lead=(2, 7), vocab=29, dtype=dtype, seed=4)
    labels = torch.randint(0, 29, (2, 7)).masked_fill(~mask, -100)
    kw = dict(beta=beta, reduction=reduction, temperature=0.9, student_logit_softcap=5.0, teacher_logit_scale=1.1)
    upstream = torch.rand(2, 7) if reduction == "none" else None
    as64 = [t.double() if t is not None else None for t in (hs, ws, bs, ht, wt, bt)]
    expected = _run(reference.linear_distill_loss, *as64, upstream=upstream, labels=labels, **kw)
    dev = [t.to(backend) if t is not None else None for t in (hs, ws, bs, ht, wt, bt)]
    actual = _run(fastpo.linear_distill_loss, *dev, upstream=None if upstream is None else upstream.to(backend),
                  labels=labels.to(backend), chunk_size=3, **kw)
    assert actual[0].dtype == torch.float32
    assert [a.dtype for a in actual[1:]] == [dtype] * 3
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    _close([a.cpu() for a in actual[:1]], expected[:1], **tol)
    _close([a.cpu() for a in actual[1:]], expected[1:], **tol)


def test_entropy_and_vocab_one(backend):
    hs, ws, bs, ht, wt, bt, mask = _inputs(lead=(9,), vocab=1, seed=5)
    loss, ent = fastpo.linear_distill_loss(*(t.to(backend) for t in (hs, ws, ht, wt)), mask=mask.to(backend),
                                           reduction="none", return_entropy=True)
    assert bool((loss == 0).all()) and bool((ent == 0).all())
    hs, ws, bs, ht, wt, bt, mask = _inputs(lead=(9,), vocab=50, seed=6)
    _, ent = fastpo.linear_distill_loss(*(t.to(backend) for t in (hs, ws, ht, wt)), mask=mask.to(backend),
                                        return_entropy=True)
    _, expected = reference.linear_distill_loss(hs, ws, ht, wt, mask=mask, return_entropy=True)
    torch.testing.assert_close(ent.cpu(), expected, atol=2e-5, rtol=2e-5)
    assert not ent.requires_grad


def test_teacher_gets_no_gradient_and_no_grad_mode(cpu_backend):
    hs, ws, bs, ht, wt, bt, mask = _inputs(seed=7)
    ht.requires_grad_()
    wt.requires_grad_()
    loss = fastpo.linear_distill_loss(hs.requires_grad_(), ws, ht, wt, mask=mask)
    loss.backward()
    assert ht.grad is None and wt.grad is None and hs.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(fastpo.linear_distill_loss(hs, ws, ht, wt, mask=mask), loss.detach())


@pytest.mark.parametrize("beta", BETAS)
def test_gradcheck(beta, cpu_backend):
    hs, ws, bs, ht, wt, bt, mask = _inputs(lead=(2, 3), ds=3, dt=2, vocab=5, dtype=torch.float64, seed=8)
    for fn in (reference.linear_distill_loss, fastpo.linear_distill_loss):
        def f(h, w, b):
            return fn(h, w, ht, wt, mask=mask, beta=beta, student_bias=b, teacher_bias=bt, temperature=0.8,
                      student_logit_softcap=2.0, reduction="none")
        assert torch.autograd.gradcheck(f, tuple(t.clone().requires_grad_() for t in (hs, ws, bs)))
    def g(h, w):
        return fastpo.linear_distill_loss(h, w, ht, wt, mask=mask, beta=beta, chunk_size=2)
    assert torch.autograd.gradcheck(g, (hs.clone().requires_grad_(), ws.clone().requires_grad_()))


def test_double_backward_raises(cpu_backend):
    hs, ws, bs, ht, wt, bt, mask = _inputs(seed=9)
    for reduction in ("batchmean", "none"):
        h = hs.clone().requires_grad_()
        loss = fastpo.linear_distill_loss(h, ws, ht, wt, mask=mask, reduction=reduction).sum()
        (grad,) = torch.autograd.grad(loss, h, create_graph=True)
        with pytest.raises(NotImplementedError, match="double backward"):
            grad.sum().backward()


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_never_materialises_full_logits(reduction, cpu_backend):
    n_tokens, dim, vocab, chunk = 256, 16, 3000, 16
    hs, ws, bs, ht, wt, bt, mask = _inputs(lead=(n_tokens,), ds=dim, dt=dim, vocab=vocab, seed=10)
    hs.requires_grad_()
    ws.requires_grad_()
    with _LargestAllocation() as seen:
        loss = fastpo.linear_distill_loss(hs, ws, ht, wt, mask=mask, beta=0.5, chunk_size=chunk,
                                          reduction=reduction, student_bias=bs, teacher_bias=bt)
        loss.sum().backward()
    assert seen.largest <= max(chunk * vocab, vocab * dim)
    assert seen.largest < n_tokens * vocab // 8


@pytest.mark.parametrize("beta", BETAS)
def test_extreme_logits_and_masked_vocabulary(beta, backend):
    hs, ws, bs, ht, wt, bt, mask = _inputs(lead=(6,), vocab=40, seed=11)
    hs = hs * 3e3  # logits of order ±1e4
    bt = bt.clone()
    bt[::3] = -1e30 if beta < 1 else -1e4  # a vocabulary masked out of the teacher (exp underflows to 0)
    dev = [t.to(backend) for t in (hs, ws, bs, ht, wt, bt)]
    loss, gh, gw, gb = _run(fastpo.linear_distill_loss, *dev, mask=mask.to(backend), beta=beta, reduction="none")
    for t in (loss, gh, gw, gb):
        assert bool(torch.isfinite(t).all())
    expected = reference.linear_distill_loss(hs.double(), ws.double(), ht.double(), wt.double(), mask=mask,
                                             beta=beta, student_bias=bs.double(), teacher_bias=bt.double(),
                                             reduction="none")
    torch.testing.assert_close(loss.cpu().double(), expected, atol=1e-2, rtol=1e-4)


def test_compile_dynamic(cpu_backend):
    compiled = torch.compile(fastpo.linear_distill_loss, fullgraph=True, dynamic=True)
    for n in (5, 8):
        hs, ws, bs, ht, wt, bt, mask = _inputs(lead=(n,), seed=n)
        for reduction in ("batchmean", "none"):
            expected = _run(fastpo.linear_distill_loss, hs, ws, bs, ht, wt, bt, mask=mask, beta=0.5,
                            temperature=0.7, reduction=reduction)
            actual = _run(compiled, hs, ws, bs, ht, wt, bt, mask=mask, beta=0.5, temperature=0.7,
                          reduction=reduction)
            _close(actual, expected, atol=1e-6, rtol=1e-6)


def test_errors(cpu_backend):
    hs, ws, bs, ht, wt, bt, mask = _inputs(seed=12)
    f = fastpo.linear_distill_loss
    with pytest.raises(ValueError, match="same vocabulary"):
        f(hs, ws, ht[:2], wt)
    with pytest.raises(ValueError, match="same vocabulary"):
        f(hs, ws, ht, wt[:5])
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        f(hs, ws.double(), ht, wt)
    with pytest.raises(ValueError, match="beta must lie in"):
        f(hs, ws, ht, wt, beta=1.5)
    with pytest.raises(TypeError, match="beta"):
        f(hs, ws, ht, wt, beta="0.5")
    with pytest.raises(ValueError, match="temperature"):
        f(hs, ws, ht, wt, temperature=0.0)
    with pytest.raises(ValueError, match="not both"):
        f(hs, ws, ht, wt, torch.zeros(3, 5, dtype=torch.long), mask=mask)
    with pytest.raises(ValueError, match="mask must have the tokens' shape"):
        f(hs, ws, ht, wt, mask=mask[:, :2])
    with pytest.raises(ValueError, match="reduction"):
        f(hs, ws, ht, wt, reduction="avg")
    with pytest.raises(ValueError, match="student_logit_softcap"):
        f(hs, ws, ht, wt, student_logit_softcap=-1.0)
    with pytest.raises(ValueError, match="teacher_logit_scale"):
        f(hs, ws, ht, wt, teacher_logit_scale=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        f(hs, ws, ht, wt, chunk_size=0)
    with pytest.raises(ValueError, match="bias must have shape"):
        f(hs, ws, ht, wt, student_bias=bs[:3])
    with pytest.raises(ValueError, match="teacher_logp must have"):
        fastpo.sampled_distill_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="estimator"):
        fastpo.sampled_distill_loss(torch.zeros(3), torch.zeros(3), estimator="k4")
