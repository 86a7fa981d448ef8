"""Per-token layouts shared by every sequence-aware op: padded ``[B, T]`` + mask, or packed ``[N]`` +
``cu_seqlens``.

Every op normalises its per-token inputs to one flat view: ``N`` tokens, ``B`` sequences whose
boundaries are ``cu_seqlens [B+1]`` (int64; sequence i is tokens ``cu_seqlens[i]:cu_seqlens[i+1]``)
and an optional ``mask [N]``. A padded batch ``[B, T]`` is the packed batch with
``cu_seqlens = [0, T, 2T, ..., BT]``, so one kernel serves both layouts.

Strides: the flat views are contiguous whatever the caller's strides (1-D strided views such as
``x[:, 0]``, ``.expand()``-ed stride-0 tensors, transposes): :meth:`TokenLayout.flat` and
:func:`flat_inputs` copy only when the input is not contiguous, and ``cu_seqlens`` and ``mask`` are
made contiguous here, so every kernel may read its ``[N]`` inputs with unit stride.

Static checks (shapes, dtypes, devices) run in :func:`token_layout`; the data-dependent check of the
``cu_seqlens`` values (:func:`check_cu_seqlens_values`) belongs inside the custom op, where
``torch.compile`` does not trace it (as the label range check of the log-prob ops).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fastpo import _validation as check
from fastpo._validation import shape_of

__all__ = [
    "TokenLayout", "token_layout", "check_like_layout", "check_cu_seqlens_values", "accumulation_dtype",
    "segment_ids", "segment_sum", "flat_mask", "flat_inputs",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of a batch are: ``flat(x)`` gives ``[N]``, ``unflatten(y)`` the caller's shape.

    ``cu_seqlens`` is int64 ``[B+1]`` on the tokens' device, contiguous; ``mask`` is the caller's mask
    flattened to a contiguous ``[N]`` (any dtype, non-zero = counted) or None when every token counts; ``padded_len`` is ``T``
    for a padded batch and None for a packed one.
    """

    shape: tuple
    cu_seqlens: torch.Tensor
    mask: Optional[torch.Tensor]
    num_seqs: int
    padded_len: Optional[int]

    @property
    def num_tokens(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_padded(self) -> bool:
        return self.padded_len is not None

    def flat(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``x`` as a contiguous ``[N]`` (differentiable: the gradient flows back to ``x``'s strides)."""
        return None if x is None else x.reshape(-1).contiguous()

    def unflatten(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(self.shape)


def token_layout(x, name: str, mask=None, cu_seqlens=None) -> TokenLayout:
    """Validate the layout of the per-token tensor ``x`` (called ``name`` in errors) and describe it.

    Padded (``cu_seqlens is None``): ``x [B, T]``, ``mask [B, T]`` or None.
    Packed: ``x [N]``, ``cu_seqlens [B+1]`` integer, ``mask [N]`` or None.
    ``mask`` may be bool, integer or floating (non-zero = counted).
    """
    check.check_float_tensor(x, name)
    if cu_seqlens is None:
        if x.dim() != 2:
            raise ValueError(
                f"{name} must be [B, T] (padded layout) or [N] with cu_seqlens (packed layout), "
                f"got shape {shape_of(x)} and no cu_seqlens")
        b, t = x.shape
        cu = torch.arange(0, (b + 1) * t, t, dtype=torch.int64, device=x.device) if t > 0 else \
            torch.zeros(b + 1, dtype=torch.int64, device=x.device)
        padded_len = t
    else:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
        if cu_seqlens.dtype not in check.INT_DTYPES or cu_seqlens.dtype == torch.uint8:
            raise TypeError(f"cu_seqlens must be an integer tensor, got dtype {cu_seqlens.dtype} "
                            f"with shape {shape_of(cu_seqlens)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens must be 1-D [B+1] with B >= 0, got shape {shape_of(cu_seqlens)}")
        if x.dim() != 1:
            raise ValueError(f"with cu_seqlens (packed layout) {name} must be 1-D [N], got shape {shape_of(x)}")
        check.check_same_device(**{name: x, "cu_seqlens": cu_seqlens})
        b = cu_seqlens.numel() - 1
        cu = cu_seqlens.to(torch.int64).contiguous()
        padded_len = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.is_complex():
            raise TypeError(f"mask must be a bool, integer or floating tensor, got dtype {mask.dtype}")
        if tuple(mask.shape) != tuple(x.shape):
            raise ValueError(f"mask must have the shape of {name}, got mask {shape_of(mask)} and {name} {shape_of(x)}")
        check.check_same_device(**{name: x, "mask": mask})
        mask = mask.reshape(-1).contiguous()
    return TokenLayout(shape=tuple(x.shape), cu_seqlens=cu, mask=mask, num_seqs=b, padded_len=padded_len)


def flat_inputs(layout: TokenLayout, *tensors):
    """Detached contiguous ``[N]`` views of per-token constants (None stays None)."""
    return [None if t is None else layout.flat(t.detach()) for t in tensors]


def check_like_layout(layout: TokenLayout, y, name: str, ref_name: str, *, floating: bool = True) -> None:
    """``y`` is a tensor shaped like the layout's per-token tensor ``ref_name`` and on its device."""
    if floating:
        check.check_float_tensor(y, name)
    elif not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if tuple(y.shape) != layout.shape:
        raise ValueError(f"{name} must have the shape of {ref_name}, got {name} {shape_of(y)} "
                         f"and {ref_name} {layout.shape}")
    if y.device != layout.cu_seqlens.device:
        raise ValueError(f"all tensors must be on one device, got {name} on {y.device} and "
                         f"{ref_name} on {layout.cu_seqlens.device}")


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, num_tokens: int) -> None:
    """``cu_seqlens`` starts at 0, never decreases and ends at ``num_tokens`` (data-dependent: syncs on CUDA)."""
    if cu_seqlens.numel() == 0:
        raise ValueError("cu_seqlens must have at least one element")
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    decreasing = bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()) if cu_seqlens.numel() > 1 else False
    if first != 0 or last != num_tokens or decreasing:
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at N={num_tokens} (the number of "
            f"tokens); got first={first}, last={last}, non-decreasing={not decreasing} "
            f"for cu_seqlens of shape {shape_of(cu_seqlens)}")


def segment_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """int64 ``[N]``: the sequence of each token (static output shape: no host sync)."""
    positions = torch.arange(num_tokens, dtype=torch.int64, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def segment_sum(values: torch.Tensor, seg: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """``[B]`` per-sequence sums of ``values [N, ...]`` (accumulated in ``values.dtype``)."""
    out = values.new_zeros((num_seqs,) + tuple(values.shape[1:]))
    return out.index_add_(0, seg, values)


def flat_mask(layout: TokenLayout, dtype: torch.dtype) -> torch.Tensor:
    """The mask as ``[N]`` 0/1 values of ``dtype`` (all ones when there is no mask)."""
    if layout.mask is None:
        return torch.ones(layout.num_tokens, dtype=dtype, device=layout.cu_seqlens.device)
    return (layout.mask != 0).to(dtype)
