"""Padding-free decoder forward (``--padding-free``): a batch's sequences back to back in one row.

A :class:`~.batch.TokenBatch` keeps its sequences right-padded (``input_ids [B, L]``). Packed, the
``T = Σ_i len_i`` real tokens form one row ``[1, T]`` whose ``position_ids`` restart at 0 with every
sequence (transformers' ``DataCollatorWithFlattening`` layout), and the hidden state that scores
response token ``(row r, position p)`` sits at ``offset_r + p`` (``offset_r = Σ_{i<r} len_i``). The
linear layers and MLPs then see ``T`` tokens instead of ``B·L``.

Attention must not cross sequences; transformers 5 keeps them apart from the position ids alone
when no 2-D ``attention_mask`` is passed:

- ``flash_attention_2``: ``_is_packed_sequence`` finds the restarts and calls flash-attn's varlen
  kernel with ``cu_seqlens`` from them (no mask, no padding compute);
- ``sdpa`` / ``eager`` (the CPU path): ``masking_utils.find_packed_sequence_indices`` turns the
  restarts into a block-diagonal causal mask. This one is a dense ``[T, T]`` mask, so attention costs
  ``T²`` (not ``Σ len_i²``): use ``--micro-batch-size`` with it (see :func:`padding_free_warning`).
  (``flex_attention`` gets the same mask as a sparse ``BlockMask``.)

The response tokens' packed layout (``cu_seqlens`` over ``[N]``) that the losses take is the same
either way, so nothing downstream of the decoder changes."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .errors import UserInputError
from .precision import FULL, Precision, run_decoder


class PaddingFreeWarning(UserWarning):
    """``--padding-free`` where the packed attention is a dense block-diagonal mask over a whole step."""


def pack_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids [1, T], position_ids [1, T], index [N])`` of a right-padded batch: its real tokens
    back to back, their positions within their own sequence, and where the hidden state
    ``(rows[k], positions[k])`` of the padded layout lands in the packed row."""
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids and attention_mask must both be [B, L]; got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    keep = attention_mask.bool()
    if input_ids.shape[1] > 1 and bool((keep[:, 1:] & ~keep[:, :-1]).any()):
        raise ValueError("padding-free packing needs right-padded rows (attention_mask 1...1 0...0)")
    lengths = keep.sum(dim=1)
    offsets = torch.cumsum(lengths, 0) - lengths
    position_ids = (torch.cumsum(keep, dim=1) - 1)[keep]
    return input_ids[keep].unsqueeze(0), position_ids.unsqueeze(0), offsets[rows] + positions


def padding_fraction(attention_mask: torch.Tensor, micro_batch_size: Optional[int] = None) -> float:
    """The share of the padded forward's token positions that are padding: ``1 − T / Σ_chunks b·L_chunk``
    over the ``micro_batch_size``-sequence chunks the trainer runs (each trimmed to its longest
    sequence, as ``TokenBatch.select`` does); what ``--padding-free`` saves in the linear layers."""
    lengths = attention_mask.sum(dim=1)
    b = lengths.numel()
    if b == 0:
        return 0.0
    size = b if micro_batch_size is None else micro_batch_size
    padded = sum(int(lengths[a:a + size].max()) * lengths[a:a + size].numel() for a in range(0, b, size))
    return 1.0 - float(lengths.sum()) / max(padded, 1)


def varlen_attention_available(device: torch.device, compute_dtype: torch.dtype) -> bool:
    """Whether flash-attn's varlen kernel can run the packed forward: CUDA, the ``flash_attn``
    package importable, and a bf16/fp16 compute dtype (flash-attn has no fp32 kernel)."""
    if device.type != "cuda" or compute_dtype not in (torch.bfloat16, torch.float16):
        return False
    from transformers.utils import is_flash_attn_2_available

    return bool(is_flash_attn_2_available())


def resolve_padding_free(setting: Optional[bool], device: torch.device, compute_dtype: torch.dtype) -> Tuple[bool, Optional[str]]:
    """``(padding_free, attn_implementation)`` of a run: ``--padding-free`` / ``--no-padding-free`` as
    given, by default on exactly where flash-attn's varlen kernel runs it (elsewhere the dense
    block-diagonal mask makes the packed attention cost more than the padding it saves on
    short sequences; see BENCHMARKS.md). ``attn_implementation`` is ``"flash_attention_2"`` when the
    packed forward can use it, else None (the model's own, ``sdpa`` for transformers' models)."""
    varlen = varlen_attention_available(device, compute_dtype)
    on = varlen if setting is None else bool(setting)
    return on, ("flash_attention_2" if on and varlen else None)


def padding_free_warning(padding_free: bool, attn_implementation: Optional[str],
                         micro_batch_size: Optional[int]) -> Optional[str]:
    """The message for a packed forward through a dense block-diagonal mask with no micro-batches
    (its ``[T, T]`` mask grows with the square of the step's whole token count), else None."""
    if not padding_free or attn_implementation == "flash_attention_2" or micro_batch_size is not None:
        return None
    return ("--padding-free without flash-attn: attention uses a dense [T, T] block-diagonal mask over all of a "
            "forward's T tokens; set --micro-batch-size to bound it (or install flash-attn on CUDA with bf16)")


def check_padding_free(setting) -> None:
    """Config validation of ``--padding-free``: None (the default), True or False."""
    if setting is not None and not isinstance(setting, bool):
        raise UserInputError(f"--padding-free: expected true or false, got {setting!r}")


def decoder_states(decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   rows: torch.Tensor, positions: torch.Tensor, precision: Precision = FULL) -> torch.Tensor:
    """The decoder's last hidden states at ``(rows, positions)`` of the padded layout, ``[N, D]``: from
    the padded forward, or with ``precision.padding_free`` from the packed one."""
    if not precision.padding_free:
        return run_decoder(decoder, input_ids, attention_mask, precision)[rows, positions]
    ids, position_ids, index = pack_inputs(input_ids, attention_mask, rows, positions)
    return run_decoder(decoder, ids, None, precision, position_ids=position_ids)[0, index]
