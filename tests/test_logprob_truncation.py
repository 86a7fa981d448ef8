"""top_k / top_p truncated scoring (vLLM's processed_logprobs) in token_logprobs / linear_token_logprobs:
the threshold pass against the sort-based reference mask, C++ and Triton (interpreter on CPU) against the
float64 reference, which is checked against vLLM's own masking function (apply_top_k_top_p_pytorch)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastpo
from fastpo import reference
from fastpo.ops.truncation import logits_thresholds, row_thresholds
from fastpo.reference.truncation import keep_mask

CASES = [(20, 0.9), (0, 0.9), (5, 1.0), (3, 0.5)]


def _sampled_labels(logits, generator, spread=4):
    """Labels mostly among each row's top entries (so that most are kept), one per row."""
    order = logits.float().argsort(-1, descending=True)
    pick = torch.randint(0, min(spread, logits.shape[-1]), logits.shape[:-1], generator=generator)
    return order.gather(-1, pick.unsqueeze(-1)).squeeze(-1)


def _finite(t):
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


@pytest.mark.parametrize("top_k,top_p", CASES + [(1, 0.2), (0, 0.05)])
def test_reference_mask_matches_vllm_masking(top_k, top_p):
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    g = torch.Generator().manual_seed(top_k)
    x = 3 * torch.randn(16, 300, generator=g)
    tau = 0.3 + torch.rand(16, 1, generator=g)
    s = x / tau
    k = torch.full((16,), top_k) if top_k else None
    p = torch.full((16,), top_p) if top_p < 1 else None
    want = torch.isfinite(apply_top_k_top_p_pytorch(s.clone(), k, p, allow_cpu_sync=True))
    assert torch.equal(keep_mask(x, s, top_k, top_p), want)


@pytest.mark.parametrize("vocab", [1, 7, 50, 1000])
@pytest.mark.parametrize("top_k,top_p", CASES)
def test_threshold_pass_equals_reference_mask(vocab, top_k, top_p):
    g = torch.Generator().manual_seed(vocab)
    x = 3 * torch.randn(9, vocab, generator=g)
    x[0] = 1.0  # all tied
    x[1, : vocab // 2] = x[1].max()  # ties at the maximum
    x[2, : min(3, vocab - 1)] = float("-inf")  # a masked vocabulary (not all of it)
    inv_t = 1 / (0.3 + torch.rand(9, generator=g))
    thr = row_thresholds(x, inv_t, top_k, top_p)
    assert torch.equal(x >= thr[:, None], keep_mask(x, x * inv_t[:, None], top_k, top_p))
    # chunked over rows, as the ops run it
    assert torch.equal(logits_thresholds(x, inv_t, top_k, top_p), thr)


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(4, 9, generator=g, dtype=torch.float64)
    labels = _sampled_labels(x, g, 2)
    labels[1] = -100
    x.requires_grad_()
    fn = lambda z: tuple(map(_finite, reference.token_logprobs(z, labels, 0.8, -100, True, None, None, 1.0, 3, 0.8)))
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 7, 50257])
@pytest.mark.parametrize("top_k,top_p", [(20, 0.9), (0, 0.9), (5, 1.0)])
def test_token_matches_reference(backend, dtype, vocab, top_k, top_p):
    g = torch.Generator().manual_seed(vocab + top_k)
    n = 3 if vocab > 1000 else 8
    logits = (3 * torch.randn(n, vocab, generator=g)).to(dtype)
    labels = _sampled_labels(logits, g)
    labels[0] = -100
    if vocab > 3:
        labels[1] = logits[1].float().argmin()  # outside the kept set
    tau = 0.5 + torch.rand(n, generator=g)
    names = ("logp", "entropy", "log_sum_sq_probs", "is_top1")
    x = logits.double().requires_grad_()
    want = reference.token_logprobs(x, labels, tau.double(), -100, False, names, None, 1.0, top_k, top_p)
    (_finite(want.logp) + want.entropy).sum().backward()
    y = logits.to(backend).requires_grad_()
    got = fastpo.token_logprobs(y, labels.to(backend), temperature=tau.to(backend), outputs=names, top_k=top_k,
                                top_p=top_p)
    (_finite(got.logp) + got.entropy).sum().backward()
    assert torch.equal(torch.isinf(got.logp.cpu()), torch.isinf(want.logp))
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-5}[dtype]  # the same (rounded) inputs: fp32 accumulation
    for name in ("logp", "entropy", "log_sum_sq_probs"):
        torch.testing.assert_close(_finite(getattr(got, name)).cpu().double(), _finite(getattr(want, name)),
                                   atol=tol, rtol=tol)
    assert torch.equal(got.is_top1.cpu(), want.is_top1)
    torch.testing.assert_close(y.grad.cpu().double(), x.grad, atol={torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype],
                               rtol=1e-2)
    assert torch.isfinite(y.grad).all()


def test_truncated_logp_is_log_of_renormalised_nucleus(cpu_backend):
    g = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(32, 100, generator=g)
    labels = _sampled_labels(logits, g, 1)  # the argmax: always kept
    full = fastpo.token_logprobs(logits, labels)
    cut = fastpo.token_logprobs(logits, labels, top_p=0.9)
    keep = keep_mask(logits, logits, 0, 0.9)
    mass = (torch.softmax(logits, -1) * keep).sum(-1)
    torch.testing.assert_close(cut - full, -torch.log(mass), atol=1e-5, rtol=1e-5)


def test_extreme_logits_no_nan(backend):
    logits = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-float("inf"), 3.0, 2.0, 1.0], [1e30, -1e30, 5.0, 5.0],
                           [2.0, 2.0, 2.0, 2.0]], device=backend)
    x = logits.clone().requires_grad_()
    logp, ent = fastpo.token_logprobs(x, torch.tensor([0, 1, 3, 2], device=backend), top_k=2, top_p=0.7,
                                      return_entropy=True)
    (_finite(logp).sum() + ent.sum()).backward()
    assert not torch.isnan(logp).any() and torch.isfinite(ent).all() and torch.isfinite(x.grad).all()
    assert logp[3].item() == pytest.approx(-torch.log(torch.tensor(4.0)).item())  # a tie is kept whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_reference(backend, dtype):
    g = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(2, 9, 8, generator=g).to(dtype), torch.randn(61, 8, generator=g).to(dtype)
    labels = _sampled_labels(hidden.float() @ weight.float().t(), g)
    labels[0, 0] = -100
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = reference.linear_token_logprobs(h, w, labels, None, 0.9, -100, True, None, None, 1.0, 20, 0.9)
    (_finite(want[0]).sum() + want[1].sum()).backward()
    h2, w2 = hidden.to(backend).requires_grad_(), weight.to(backend).requires_grad_()
    got = fastpo.linear_token_logprobs(h2, w2, labels.to(backend), temperature=0.9, return_entropy=True,
                                       chunk_size=4, top_k=20, top_p=0.9)
    (_finite(got[0]).sum() + got[1].sum()).backward()
    atol, rtol = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (6e-2, 5e-2)}[dtype]
    if dtype == torch.float32:  # (16-bit logits are rounded by the matmul: the kept sets may differ)
        assert torch.equal(torch.isinf(got[0].cpu()), torch.isinf(want[0]))
        for a, b in zip((_finite(got[0]), got[1], h2.grad, w2.grad), (_finite(want[0]), want[1], h.grad, w.grad)):
            torch.testing.assert_close(a.cpu().double(), b, atol=atol, rtol=rtol)
    assert torch.isfinite(h2.grad).all() and torch.isfinite(w2.grad).all()


class _LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        owned = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in owned:
                self.largest = max(self.largest, t.numel())
        return out


def test_linear_never_materialises_full_logits(cpu_backend):
    n_tokens, dim, vocab, chunk = 512, 16, 3000, 32
    hidden = torch.randn(n_tokens, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (n_tokens,))
    tau = torch.rand(n_tokens) + 0.5
    with _LargestAllocation() as seen:
        logp, entropy = fastpo.linear_token_logprobs(hidden, weight, labels, return_entropy=True, chunk_size=chunk,
                                                     temperature=tau, top_k=50, top_p=0.9)
        (_finite(logp).sum() + entropy.sum()).backward()
    assert seen.largest <= max(chunk * vocab, vocab * dim)


def test_errors():
    logits, labels = torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="top_p"):
        fastpo.token_logprobs(logits, labels, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        fastpo.token_logprobs(logits, labels, top_k=-1)
    with pytest.raises(TypeError, match="top_k"):
        fastpo.token_logprobs(logits, labels, top_k=2.0)
    with pytest.raises(ValueError, match="mean_logits"):
        fastpo.token_logprobs(logits, labels, top_k=2, outputs=("logp", "mean_logits"))
    with pytest.raises(ValueError, match="logit_scale"):
        fastpo.token_logprobs(logits, labels, top_k=2, logit_scale=-1.0)


def test_off_is_the_untruncated_path(cpu_backend):
    logits, labels = torch.randn(4, 9), torch.tensor([0, 1, 2, 3])
    a = fastpo.token_logprobs(logits, labels)
    for kw in ({"top_k": 0}, {"top_p": 1.0}, {"top_k": 9}, {"top_k": None, "top_p": None}):
        torch.testing.assert_close(fastpo.token_logprobs(logits, labels, **kw), a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("op", ["token", "linear"])
def test_compile_fullgraph(backend, op):
    g = torch.Generator().manual_seed(7)
    logits, hidden, weight = torch.randn(6, 30, generator=g), torch.randn(6, 4, generator=g), torch.randn(30, 4,
                                                                                                         generator=g)
    labels = _sampled_labels(hidden @ weight.t() if op == "linear" else logits, g, 2).to(backend)

    def fn(a, b):
        if op == "token":
            return fastpo.token_logprobs(a, labels, temperature=0.8, return_entropy=True, top_k=10, top_p=0.9)
        return fastpo.linear_token_logprobs(a, b, labels, temperature=0.8, return_entropy=True, top_k=10, top_p=0.9)

    first = logits if op == "token" else hidden
    eager_in, comp_in = first.to(backend).requires_grad_(), first.to(backend).requires_grad_()
    want = fn(eager_in, weight.to(backend))
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(comp_in, weight.to(backend))
    (_finite(want[0]).sum() + want[1].sum()).backward()
    (_finite(got[0]).sum() + got[1].sum()).backward()
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(comp_in.grad, eager_in.grad)
