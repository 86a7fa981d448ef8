"""Strided, expanded and transposed views of every tensor argument of the log-prob ops (issue 20 §0).

Each case builds its arguments as views of leaf tensors; fastpo (CPU path and Triton kernels) must
give the reference's log-probs, entropies and gradients (those of the leaves, through the views),
with strided upstream gradients too. The Triton path used to read labels as contiguous (errors up
to 9, or a crash for stride-0 labels) and the CPU path raised "must be contiguous".
"""

import pytest
import torch

import fastpo
from fastpo import reference

N, V, D = 6, 37, 8


def _leaves(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return {
        "logits": 3 * torch.randn(N, V, generator=g, dtype=dtype),
        "logits_t": 3 * torch.randn(V, N, generator=g, dtype=dtype),  # transposed storage
        "logits_tbv": 3 * torch.randn(3, 2, V, generator=g, dtype=dtype),  # [T, B, V]
        "logits_wide": 3 * torch.randn(N, 2 * V, generator=g, dtype=dtype),
        "logits_row": 3 * torch.randn(1, V, generator=g, dtype=dtype),
        "logits_btv": 3 * torch.randn(2, 4, V, generator=g, dtype=dtype),  # [B, T + 1, V]
    }


def _ids(seed):
    g = torch.Generator().manual_seed(seed + 100)
    ids = torch.randint(0, V, (N, 5), generator=g)
    ids[1, 3] = -100
    return ids


# name -> (logits from the leaves, labels from an int matrix ids [N, 5]); labels are [6] or [2, 3],
# contiguous unless the case is about them
TOKEN_CASES = {
    "labels_column_view": (lambda t: t["logits"], lambda ids: ids[:, 3]),
    "labels_expanded": (lambda t: t["logits"], lambda ids: ids[0, 2:3].expand(N)),
    "labels_transposed_2d": (lambda t: t["logits"].view(2, 3, V), lambda ids: ids[:3, :2].t()),
    "labels_int32_strided": (lambda t: t["logits"], lambda ids: ids.to(torch.int32)[:, 1]),
    "logits_transposed": (lambda t: t["logits_t"].t(), lambda ids: ids[:, 0].contiguous()),
    "logits_time_major": (lambda t: t["logits_tbv"].transpose(0, 1), lambda ids: ids[:, 4].view(2, 3).contiguous()),
    "logits_strided_rows": (lambda t: t["logits_wide"][:, :V], lambda ids: ids[:, 2].contiguous()),
    "logits_every_other_column": (lambda t: t["logits_wide"][:, ::2][:, :V], lambda ids: ids[:, 2].contiguous()),
    "logits_expanded_rows": (lambda t: t["logits_row"].expand(N, V), lambda ids: ids[:, 1].contiguous()),
    "logits_shifted": (lambda t: t["logits_btv"][:, :-1], lambda ids: ids[:, 4].view(2, 3).contiguous()),
    "logits_shifted_strided_rows": (lambda t: t["logits_wide"].view(2, 3, 2 * V)[:, 1:, 3:V + 3],
                                    lambda ids: ids[:4, 0].view(2, 2).contiguous()),
    "all_strided": (lambda t: t["logits_t"].t(), lambda ids: ids[:, 3]),
}


def _backward_strided(logp, entropy):
    """Backward with strided upstream gradients: every other element of a wider buffer for logp,
    a stride-0 (expanded) one for the entropy."""
    wide = torch.arange(2 * logp.numel(), dtype=logp.dtype, device=logp.device).reshape(*logp.shape, 2) / 7 - 0.3
    g_logp = wide[..., 0]
    g_entropy = torch.tensor(0.6, dtype=entropy.dtype, device=entropy.device).expand(entropy.shape)
    assert not g_logp.is_contiguous() and g_entropy.stride() == (0,) * entropy.dim()
    torch.autograd.backward([logp, entropy], [g_logp, g_entropy])


def _token_run(fn, leaves, case, ids, temperature, **kw):
    make_logits, make_labels = TOKEN_CASES[case]
    logp, entropy = fn(make_logits(leaves), make_labels(ids), temperature=temperature, return_entropy=True, **kw)
    _backward_strided(logp, entropy)
    return logp.detach(), entropy.detach(), {k: v.grad for k, v in leaves.items() if v.grad is not None}


def _reference_token(logits, labels, *, temperature, return_entropy):
    return reference.token_logprobs(logits, labels.long(), temperature, -100, return_entropy)


@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_token_logprobs_views(backend, case, inplace_backward):
    leaves = _leaves(0, torch.float32)
    ids = _ids(0)
    ref_leaves = {k: v.double().requires_grad_() for k, v in leaves.items()}
    want = _token_run(_reference_token, ref_leaves, case, ids, 0.8)
    dev_leaves = {k: v.clone().to(backend).requires_grad_() for k, v in leaves.items()}
    got = _token_run(fastpo.token_logprobs, dev_leaves, case, ids.to(backend), 0.8, inplace_backward=inplace_backward)
    torch.testing.assert_close(got[0].cpu().double(), want[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1].cpu().double(), want[1], atol=2e-5, rtol=1e-5)
    assert got[2].keys() == want[2].keys()
    for k in want[2]:
        torch.testing.assert_close(got[2][k].cpu().double(), want[2][k], atol=2e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("layout", ["strided_rows", "shifted_batch"])
def test_token_logprobs_does_not_copy_row_contiguous_logits(cpu_backend, layout):
    """Rows at a stride (a slice of a wider buffer) and the shifted logits[:, :-1] of a [B, T, V]
    output are read in place: the in-place backward writes the gradient into that very buffer."""
    if layout == "strided_rows":
        buffer = torch.randn(N, V + 5)

        def view(t):
            return t[:, :V]
        labels = _ids(1)[:, 0].contiguous()
    else:
        buffer = torch.randn(2, 4, V)

        def view(t):
            return t[:, :-1]
        labels = _ids(1)[:, 0].view(2, 3).contiguous()
    x = view(buffer).detach().clone().requires_grad_()
    fastpo.token_logprobs(x, labels, return_entropy=True)[0].sum().backward()
    leaf = view(buffer).detach().requires_grad_()  # shares the buffer's memory
    fastpo.token_logprobs(leaf, labels, return_entropy=True, inplace_backward=True)[0].sum().backward()
    torch.testing.assert_close(view(buffer), x.grad, atol=0, rtol=0)  # the gradient landed in the buffer


def _linear_leaves(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(N, D, generator=g, dtype=dtype),
        "hidden_t": torch.randn(D, N, generator=g, dtype=dtype),
        "hidden_tbd": torch.randn(3, 2, D, generator=g, dtype=dtype),
        "hidden_row": torch.randn(1, D, generator=g, dtype=dtype),
        "weight": torch.randn(V, D, generator=g, dtype=dtype) / 2,
        "weight_t": torch.randn(D, V, generator=g, dtype=dtype) / 2,
        "weight_wide": torch.randn(V, 2 * D, generator=g, dtype=dtype) / 2,
        "bias": torch.randn(V, generator=g, dtype=dtype) / 4,
        "bias_2": torch.randn(V, 2, generator=g, dtype=dtype) / 4,
    }


# name -> (hidden, weight, bias, labels) from the leaves and ids; labels contiguous unless the case is about them
LINEAR_CASES = {
    "labels_column_view": lambda t, ids: (t["hidden"], t["weight"], t["bias"], ids[:, 3]),
    "labels_expanded": lambda t, ids: (t["hidden"], t["weight"], None, ids[0, 2:3].expand(N)),
    "hidden_transposed": lambda t, ids: (t["hidden_t"].t(), t["weight"], t["bias"], ids[:, 0].contiguous()),
    "hidden_time_major": lambda t, ids: (t["hidden_tbd"].transpose(0, 1), t["weight"], None, ids[:3, :2].t()),
    "hidden_expanded": lambda t, ids: (t["hidden_row"].expand(N, D), t["weight"], t["bias"], ids[:, 1].contiguous()),
    "weight_transposed": lambda t, ids: (t["hidden"], t["weight_t"].t(), t["bias"], ids[:, 2].contiguous()),
    "weight_strided_rows": lambda t, ids: (t["hidden"], t["weight_wide"][:, :D], None, ids[:, 2].contiguous()),
    "bias_strided": lambda t, ids: (t["hidden"], t["weight"], t["bias_2"][:, 1], ids[:, 4].contiguous()),
    "all_strided": lambda t, ids: (t["hidden_t"].t(), t["weight_t"].t(), t["bias_2"][:, 0], ids[:, 3]),
}


def _linear_run(fn, leaves, case, ids, **kw):
    hidden, weight, bias, labels = LINEAR_CASES[case](leaves, ids)
    logp, entropy = fn(hidden, weight, labels, bias=bias, temperature=0.9, return_entropy=True, **kw)
    _backward_strided(logp, entropy)
    return logp.detach(), entropy.detach(), {k: v.grad for k, v in leaves.items() if v.grad is not None}


def _reference_linear(hidden, weight, labels, *, bias, temperature, return_entropy):
    return reference.linear_token_logprobs(hidden, weight, labels.long(), bias, temperature, -100, return_entropy)


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_token_logprobs_views(backend, case):
    leaves = _linear_leaves(2, torch.float32)
    ids = _ids(2)
    want = _linear_run(_reference_linear, {k: v.double().requires_grad_() for k, v in leaves.items()}, case, ids)
    dev_leaves = {k: v.clone().to(backend).requires_grad_() for k, v in leaves.items()}
    got = _linear_run(fastpo.linear_token_logprobs, dev_leaves, case, ids.to(backend), chunk_size=4)
    torch.testing.assert_close(got[0].cpu().double(), want[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1].cpu().double(), want[1], atol=2e-5, rtol=1e-5)
    assert got[2].keys() == want[2].keys()
    for k in want[2]:
        torch.testing.assert_close(got[2][k].cpu().double(), want[2][k], atol=5e-5, rtol=1e-4, msg=k)
