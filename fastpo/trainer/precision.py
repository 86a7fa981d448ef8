"""How the trainer's forward passes run: bf16 autocast, the lm_head's dtype, gradient checkpointing
(and whether the sequences are packed: ``Precision.padding_free``, see packing.py).

- ``--bf16``: mixed precision as Hugging Face's Trainer (and so TRL) does it with ``bf16=True``: the
  weights, their gradients and AdamW's state stay float32 (the master weights), and the decoder runs
  under ``torch.autocast(dtype=bfloat16)``, so matmuls take bf16 inputs and accumulate in fp32 while
  norms and softmaxes stay fp32. The alternative (a bf16 model plus an fp32 optimiser copy) saves the
  weights' memory but is not what a ``bf16=True`` user gets elsewhere and needs its own optimiser; a
  plain bf16 model is ``--dtype bfloat16``.
- ``--cast-lm-head-fp32``: the lm_head log-probs (``fastpo.linear_token_logprobs``) take float32
  hidden states and weights whatever the decoder ran in (as verl's fp32 lm_head option); without it
  the head runs in the decoder's compute dtype (bf16 under ``--bf16`` or ``--dtype bfloat16``). The
  op accumulates in fp32 either way; the cast removes the bf16 rounding of the logits' inputs.
- ``--gradient-checkpointing``: transformers' per-layer checkpointing (``use_reentrant=False``):
  a layer's activations are recomputed in the backward instead of kept. Transformers checkpoints a
  layer only in training mode; the trainer keeps its models in eval mode (no dropout, so the
  old-policy log-probs equal the first epoch's), so :func:`run_decoder` switches on the training
  flag of the checkpointed layers alone, while gradients are being recorded."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Precision:
    autocast: Optional[torch.dtype] = None   # --bf16: torch.bfloat16
    head_fp32: bool = False                  # --cast-lm-head-fp32
    padding_free: bool = False               # --padding-free: sequences packed in one row (packing.py)


FULL = Precision()


def _checkpointed_layers(module: torch.nn.Module):
    return [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True
            and hasattr(m, "_gradient_checkpointing_func")]


@contextlib.contextmanager
def _checkpointing(module: torch.nn.Module):
    layers = _checkpointed_layers(module) if torch.is_grad_enabled() else []
    for layer in layers:
        layer.training = True  # the layer alone: its dropout and attention submodules stay in eval mode
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False


def run_decoder(decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                precision: Precision = FULL, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The decoder's last hidden states ``[B, L, D]`` under ``precision`` (and checkpointing);
    ``position_ids`` with no ``attention_mask`` is the packed layout (packing.py)."""
    autocast = (torch.autocast(input_ids.device.type, dtype=precision.autocast) if precision.autocast is not None
                else contextlib.nullcontext())
    with autocast, _checkpointing(decoder):
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state


def head_operands(hidden: torch.Tensor, head: torch.nn.Module, precision: Precision = FULL):
    """``(hidden, weight, bias)`` for ``linear_token_logprobs`` in the head's compute dtype: float32
    with ``head_fp32``, else the autocast dtype, else the weights' own."""
    dtype = torch.float32 if precision.head_fp32 else (precision.autocast or head.weight.dtype)
    bias = head.bias.to(dtype) if head.bias is not None else None
    return hidden.to(dtype), head.weight.to(dtype), bias


def enable_gradient_checkpointing(lm: torch.nn.Module) -> None:
    from .errors import UserInputError

    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise UserInputError(f"--gradient-checkpointing: {type(lm).__name__} does not support gradient checkpointing")
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
