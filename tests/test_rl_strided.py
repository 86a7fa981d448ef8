"""Issue 20 §0: policy_loss, value_loss, gae and sequence_logprobs give the contiguous result (values and
gradients) for strided, expanded (stride 0) and transposed views of every tensor argument, in every
backend, and accept strided upstream gradients.

The view of an argument holds the same values as a contiguous tensor: the "strided" view interleaves
them with junk (NaN for floats, out-of-range numbers for integers), so a kernel that ignores the
strides reads the junk; "expanded" replaces the argument by its first row (or element) broadcast with
stride 0; "transposed" stores a [B, T] argument column-major.
"""

import pytest
import torch

from rl_cases import ALL_CASES, BACKENDS, assert_all_close, run, with_grad

VIEWS = ("strided", "expanded", "transposed")


def _junk(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool:
        return ~t
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, 10 ** 6)


def make_view(t: torch.Tensor, kind: str, name: str, requires_grad: bool = False):
    """A non-contiguous view and its contiguous twin (same values), or None when ``kind`` does not apply
    to ``t`` (a 1-D transpose; an expanded cu_seqlens, which cannot cover N tokens). With
    ``requires_grad`` the view's base is a leaf requiring grad, so the view has a grad_fn."""
    if kind == "strided":
        base = torch.stack([t, _junk(t)], dim=-1)
        make = lambda b: b[..., 0]  # noqa: E731
    elif kind == "expanded":
        if name == "cu_seqlens":
            return None
        # a mask keeps a counted token in every non-empty sequence
        base = torch.ones_like(t[:1]) if name == "mask" else t[:1].clone()
        make = lambda b: b.expand_as(t)  # noqa: E731
    elif kind == "transposed":
        if t.dim() != 2:
            return None
        base = t.t().contiguous()
        make = lambda b: b.t()  # noqa: E731
    else:
        raise AssertionError(kind)
    if requires_grad:
        base.requires_grad_()
    view = make(base)
    assert not view.is_contiguous()
    return view, view.detach().contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, kind", [(c, k) for c in ALL_CASES for k in VIEWS if not (c.packed and k == "transposed")],
                         ids=lambda x: getattr(x, "name", x))
def test_every_argument_as_a_view(case, kind, backend):
    checked = 0
    for name, tensor in case.tensors.items():
        made = make_view(tensor, kind, name, requires_grad=name in case.grad_names)
        if made is None:
            continue
        view, twin = made  # the gradient is taken w.r.t. the view itself
        got_inputs = {**with_grad(case, case.tensors), name: view}
        want_inputs = with_grad(case, {**case.tensors, name: twin})
        got = run(case, got_inputs, backend)
        want = run(case, want_inputs, "reference")
        assert_all_close(got[0], want[0], what=f"{case.name} {backend} {kind} {name}: outputs")
        assert_all_close(got[1], want[1], what=f"{case.name} {backend} {kind} {name}: gradients")
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.name.startswith("sequence_logprobs")],
                         ids=lambda c: c.name)
def test_strided_upstream_gradient(case, backend):
    num_seqs = case.tensors["mask"].shape[0] if not case.packed else case.tensors["cu_seqlens"].numel() - 1
    g = torch.randn(num_seqs, 2, generator=torch.Generator().manual_seed(3))
    strided, expanded = g[:, 0], g[:1, 1].expand(num_seqs)
    for upstream in (strided, expanded):
        assert not upstream.is_contiguous()
        got = run(case, with_grad(case, case.tensors), backend, upstream=upstream)
        want = run(case, with_grad(case, case.tensors), "reference", upstream=upstream.contiguous())
        assert_all_close(got[1], want[1], what=f"{case.name} {backend}: gradients")
