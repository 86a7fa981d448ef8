"""token_logprobs' two autograd paths: eager calls on plain tensors skip the torch.library dispatcher
(a plain autograd.Function over the same bodies); torch.compile, dispatch modes and fake tensors go
through the custom ops. Both must give identical results, gradients and errors."""

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastpo
from fastpo import _validation
from helpers import make_labels

tl = importlib.import_module("fastpo.ops.token_logprobs")
ALL = ("logp", "entropy", "log_sum_sq_probs", "is_top1", "mean_logits")


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _run(logits, labels, grads, kw):
    """(outputs..., dlogits) of one forward + backward over every differentiable output."""
    x = logits.detach().clone().requires_grad_()
    leaf = x
    if kw.pop("shifted", False):  # the [B, T, V] blocks of a shifted model output
        x = x[:, :-1]
    out = fastpo.token_logprobs(x, labels, **kw)
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        diff = [t for t in (out.logp, out.entropy) if t is not None]
        values = [t for t in out if t is not None]
    elif isinstance(out, tuple):
        diff = values = list(out)
    else:
        diff = values = [out]
    sum(((t * g).sum() for t, g in zip(diff, grads)), torch.zeros(())).backward()
    return [v.detach().clone() for v in values] + [leaf.grad]


CASES = [
    dict(),
    dict(return_entropy=True, temperature=0.7),
    dict(outputs=ALL, logit_softcap=5.0, logit_scale=0.5),
    dict(outputs=("entropy", "is_top1")),
    dict(return_entropy=True, inplace_backward=True),
    dict(return_entropy=True, shifted=True),
    dict(return_entropy=True, ignore_index=3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_direct_path_equals_custom_op_path(backend, monkeypatch, dtype, case):
    g = torch.Generator().manual_seed(case)
    shifted = CASES[case].get("shifted", False)
    logits = (3 * torch.randn(2, 5 + shifted, 37, generator=g)).to(dtype).to(backend)
    labels = make_labels((2, 5), 37, generator=g, device=backend)
    if "ignore_index" in CASES[case]:
        labels = torch.where(labels == -100, CASES[case]["ignore_index"], labels)
    grads = [torch.randn(2, 5, generator=g).to(backend) for _ in range(2)]
    calls = []
    apply = tl._EagerTokenLogprobs.apply
    monkeypatch.setattr(tl._EagerTokenLogprobs, "apply", lambda *a: calls.append(1) or apply(*a))
    direct = _run(logits, labels, grads, dict(CASES[case]))
    assert calls, "eager call on plain tensors did not take the direct path"
    monkeypatch.setattr(tl, "direct_call_ok", lambda *tensors: False)
    via_ops = _run(logits, labels, grads, dict(CASES[case]))
    assert len(calls) == 1
    assert len(direct) == len(via_ops)
    for a, b in zip(direct, via_ops):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_no_grad_call_skips_autograd_function(cpu_backend, monkeypatch):
    monkeypatch.setattr(tl._EagerTokenLogprobs, "apply", None)  # would raise if called
    logits = torch.randn(4, 9, requires_grad=True)
    labels = torch.tensor([0, 8, -100, 3])
    with torch.no_grad():
        got = fastpo.token_logprobs(logits, labels)
    want = torch.log_softmax(logits.detach(), -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    torch.testing.assert_close(got, torch.where(labels == -100, 0.0, want))
    assert got.grad_fn is None


def test_dispatch_modes_see_the_custom_ops(cpu_backend):
    """Under a TorchDispatchMode (a FLOP counter, a debug mode) the op is the registered custom op."""
    logits = torch.randn(3, 11, requires_grad=True)
    labels = torch.tensor([1, 2, 10])
    with _Recorder() as rec:
        fastpo.token_logprobs(logits, labels, return_entropy=True)[1].sum().backward()
    assert any("fastpo.token_logprobs_fwd" in op for op in rec.ops), rec.ops
    assert any("fastpo.token_logprobs_bwd" in op for op in rec.ops), rec.ops
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_fake_and_meta_tensors_use_the_fake_implementation(cpu_backend, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(2, 6, 13)
        labels = torch.zeros(2, 6, dtype=torch.long)
        logp, entropy = fastpo.token_logprobs(logits, labels, return_entropy=True)
    assert logp.shape == (2, 6) and entropy.dtype == torch.float32
    monkeypatch.delenv("FASTPO_BACKEND")  # meta tensors: the default dispatch (FASTPO_BACKEND=cpu refuses them)
    logp = fastpo.token_logprobs(torch.empty(4, 13, device="meta"), torch.zeros(4, dtype=torch.long, device="meta"))
    assert logp.shape == (4,) and logp.device.type == "meta"


def test_double_backward_refused_on_the_direct_path(cpu_backend):
    x = torch.randn(4, 7, requires_grad=True)
    labels = torch.tensor([0, 6, 2, -100])
    (grad,) = torch.autograd.grad(fastpo.token_logprobs(x, labels).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="does not support double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("labels", [
    torch.tensor([0, 5, -100, 7]),                      # int64 contiguous: the C++ count
    torch.tensor([0, 5, -100, 7], dtype=torch.int32),   # the torch fallback
    torch.tensor([[0, 5], [-100, 7]]).t(),              # non-contiguous int64: the torch fallback
])
def test_label_range_check_paths_agree(labels):
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\) or equal ignore_index=-100; found 2 out of "
                                         r"range \(first: (5|7)\)"):
        _validation.check_label_range(labels, 5, -100)
    _validation.check_label_range(labels, 8, -100)
    with pytest.raises(ValueError, match="found 3 out of range"):
        _validation.check_label_range(labels, 5, 99)  # -100 is no longer ignored


def test_count_bad_labels_binding():
    from fastpo import _C

    labels = torch.tensor([3, -1, 9, -100, 2, 12])
    assert tuple(_C.count_bad_labels(labels.numpy(), 10, -100)) == (2, -1)
    assert tuple(_C.count_bad_labels(labels.numpy(), 13, -1)) == (1, -100)
    assert tuple(_C.count_bad_labels(labels[:0].numpy(), 1, -100)) == (0, 0)
    with pytest.raises(ValueError, match="contiguous 1-D int64"):
        _C.count_bad_labels(labels.int().numpy(), 10, -100)
    with pytest.raises(ValueError, match="contiguous 1-D int64"):
        _C.count_bad_labels(labels[::2].numpy(), 10, -100)


def test_scalar_tensor_cache_is_safe_for_autograd():
    """Eager scalar_tensor keeps one tensor per value, but never an inference tensor (autograd could not
    save it) and never one made under a mode (a fake or meta tensor)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.inference_mode():
        inside = _validation.scalar_tensor(0.8125)
    assert inside.is_inference()
    assert not _validation.scalar_tensor(0.8125).is_inference()
    assert _validation.scalar_tensor(0.8125) is _validation.scalar_tensor(0.8125)
    with FakeTensorMode():
        _validation.scalar_tensor(0.4375)
    assert type(_validation.scalar_tensor(0.4375)) is torch.Tensor
    for value in (1.0, 0.7, 1e-30, -2.5, 3):
        t = _validation.scalar_tensor(value)
        assert t.dtype == torch.float64 and t.shape == () and float(t) == value
    with torch.inference_mode():
        fastpo.token_logprobs(torch.randn(2, 5), torch.tensor([1, 2]), temperature=0.8125)
    x = torch.randn(2, 5, requires_grad=True)  # the custom-op path saves the temperature tensor
    with _Recorder():
        fastpo.token_logprobs(x, torch.tensor([1, 2]), temperature=0.8125).sum().backward()
    assert x.grad is not None


sl = importlib.import_module("fastpo.ops.sequence_logprobs")


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_direct_path_equals_custom_op_path(cpu_backend, monkeypatch, packed, average):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 6, generator=g)
    mask = torch.rand(3, 6, generator=g) > 0.3
    kw = dict(average=average)
    if packed:
        x, mask = x.reshape(-1), mask.reshape(-1)
        kw["cu_seqlens"] = torch.tensor([0, 5, 5, 18])
    weights = torch.randn(3, generator=g)

    def run():
        leaf = x.clone().requires_grad_()
        out = fastpo.sequence_logprobs(leaf, mask, **kw)
        (grad,) = torch.autograd.grad((out * out * weights).sum(), leaf, create_graph=True)
        (grad * grad).sum().backward()  # double backward: linear op, supported
        return out.detach(), grad.detach(), leaf.grad

    calls = []
    apply = sl._EagerSequenceLogprobs.apply
    monkeypatch.setattr(sl._EagerSequenceLogprobs, "apply", lambda *a: calls.append(1) or apply(*a))
    direct = run()
    monkeypatch.setattr(sl, "direct_call_ok", lambda *tensors: False)
    via_ops = run()
    assert len(calls) == 1
    for a, b in zip(direct, via_ops):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with _Recorder() as rec:
        fastpo.sequence_logprobs(x.clone().requires_grad_(), mask, **kw)
    assert any("fastpo.sequence_logprobs_fwd" in op for op in rec.ops)
    if packed:
        with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
            monkeypatch.undo()
            fastpo.sequence_logprobs(x, mask, cu_seqlens=torch.tensor([0, 5, 5, 17]), average=average)
