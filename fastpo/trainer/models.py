"""Loading the policy and tokenizer, and the two extra networks some algorithms need: a frozen
reference copy of the policy and a critic (a copy of the backbone with a scalar value head)."""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch

from .batch import TokenBatch, TokenScorer
from .errors import UserInputError
from .packing import decoder_states, resolve_padding_free
from .precision import FULL, Precision, enable_gradient_checkpointing

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_model_source(name: Optional[str], log=print) -> str:
    """The directory or hub id the policy loads from: ``name`` itself (a local directory must exist),
    or for ``None`` the built-in tiny model's cache folder (built on first use). A vLLM rollout engine
    loads the same source."""
    if name is None:
        from .tiny_model import tiny_model_path

        return str(tiny_model_path(log=log))
    if _looks_like_path(name) and not os.path.isdir(name):
        raise UserInputError(f"--model: no such directory: {name}")
    return name


def load_policy(name: str, dtype: str, device: torch.device, attn_implementation: Optional[str] = None):
    """(causal LM, tokenizer) from a source that :func:`resolve_model_source` returned; the model's own
    attention implementation unless ``attn_implementation`` names one (``flash_attention_2``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype], **extra)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"--model {name}: could not load a causal LM and tokenizer ({exc})") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UserInputError(f"--model {name}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.get_output_embeddings() is None:
        raise UserInputError(f"--model {name}: the model has no output embedding (lm_head) to score tokens with")
    return model.to(device), tokenizer


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with a slash, or starting with ``.``/``~``/``/``,
    is meant as a local directory."""
    return name.startswith((".", "~", os.sep)) or name.count("/") > 1 or name.endswith("/")


def prepare_policy(lm: torch.nn.Module, cfg) -> torch.nn.Module:
    """The loaded policy as the run trains it: gradient checkpointing under ``--gradient-checkpointing``,
    LoRA adapters under ``--lora-rank``."""
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    if cfg.lora_rank:
        from .lora import apply_lora

        lm = apply_lora(lm, rank=cfg.lora_rank, alpha=cfg.lora_alpha, modules=cfg.lora_target_modules)
    return lm


def compute_dtype(cfg) -> torch.dtype:
    """The dtype the decoder's matmuls run in: bf16 under ``--bf16`` or ``--dtype bfloat16``."""
    return torch.bfloat16 if cfg.bf16 or cfg.dtype == "bfloat16" else torch.float32


def precision_of(cfg, device: torch.device) -> Precision:
    """The forward passes' settings (``--bf16``, ``--cast-lm-head-fp32``, see precision.py;
    ``--padding-free`` as resolved for ``device``, see packing.py)."""
    padding_free, _ = resolve_padding_free(cfg.padding_free, device, compute_dtype(cfg))
    return Precision(autocast=torch.bfloat16 if cfg.bf16 else None, head_fp32=cfg.cast_lm_head_fp32,
                     padding_free=padding_free)


def reference_policy(lm: torch.nn.Module, cfg) -> TokenScorer:
    """The reference: a frozen copy of the initial policy, or for a LoRA policy the same network with
    its adapters disabled (the base model, no copy)."""
    from .lora import is_lora, lora_reference
    from .truncated_scoring import apply_scoring_truncation

    precision = precision_of(cfg, next(lm.parameters()).device)
    ref = lora_reference(lm, cfg.temperature, precision) if is_lora(lm) else frozen_copy(lm, cfg.temperature, precision)
    return apply_scoring_truncation(ref, cfg)  # --score-truncated: the rollout's top-p distribution


def frozen_copy(lm: torch.nn.Module, temperature: float, precision: Precision = FULL) -> TokenScorer:
    """A reference policy: a deep copy, in eval mode, with no gradients."""
    ref = copy.deepcopy(lm)
    ref.eval()
    ref.requires_grad_(False)
    return TokenScorer(ref, temperature=temperature, precision=precision)


class ValueModel(torch.nn.Module):
    """V(s_t): the critic is a copy of the policy's decoder plus ``Linear(D, 1)`` (zero-initialised,
    so the first values are 0). Values are read at the positions that score each response token,
    i.e. the state before the token is generated."""

    def __init__(self, lm: torch.nn.Module, precision: Precision = FULL):
        super().__init__()
        self.precision = precision
        self.backbone = copy.deepcopy(lm.get_decoder())
        self.backbone.requires_grad_(True)
        width = lm.get_output_embeddings().weight.shape[1]
        self.head = torch.nn.Linear(width, 1, dtype=torch.float32)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.head.to(next(lm.parameters()).device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        hidden = decoder_states(self.backbone, input_ids, attention_mask, rows, positions, self.precision)
        return self.head(hidden.float()).squeeze(-1)


def values_of(critic: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Critic values at the batch's response tokens ``[N]`` (float32)."""
    return critic(batch.input_ids, batch.attention_mask, batch.rows, batch.positions)
