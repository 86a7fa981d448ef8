"""Shared test helpers: reference comparisons and upstream gradients."""

import torch

TOLERANCES = {  # (atol, rtol) for values computed in float32 from inputs of the given dtype
    torch.float32: (2e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (2e-5, 1e-5),
    torch.float16: (2e-5, 1e-5),
}
# Gradients come back in the input dtype: allow its rounding.
GRAD_TOLERANCES = {
    torch.float32: (2e-5, 1e-4),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (1e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}


def make_labels(shape, vocab, *, ignore_index=-100, ignore_fraction=0.25, generator=None, device="cpu"):
    labels = torch.randint(0, vocab, shape, generator=generator)
    drop = torch.rand(shape, generator=generator) < ignore_fraction
    return labels.masked_fill(drop, ignore_index).to(device)


def assert_close(actual, expected, dtype, *, grad=False):
    atol, rtol = (GRAD_TOLERANCES if grad else TOLERANCES)[dtype]
    torch.testing.assert_close(actual.cpu().to(expected.dtype), expected.cpu(), atol=atol, rtol=rtol)
