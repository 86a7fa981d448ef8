"""LoRA through ``peft`` (``--lora-rank``, ``--lora-alpha``, ``--lora-target-modules``).

The policy becomes a ``peft.PeftModel``: its base weights frozen, a rank-r adapter ``ΔW = (α/r)·B·A``
on each targeted linear layer (``all-linear`` by default: every linear layer but the lm_head, as
peft's shorthand has it; B starts at zero, so the first policy is the base model). Only the
adapters train (the optimiser sees only them).

- The reference model is the same network with its adapters disabled (``disable_adapter()``): the
  base model, with no copy in memory. ``--ref-update-every`` is refused with LoRA (the reference is
  the base by construction).
- The rollout engines see the policy as it trains: ``generate`` runs the PeftModel itself; the vLLM
  engine receives merged weights ``W + ΔW`` under the base model's parameter names
  (:func:`fastpo.rollout.base.named_weights`).
- Checkpoints hold the adapter (``policy/adapter_model.safetensors`` and ``adapter_config.json``,
  peft's ``save_pretrained``) and the tokenizer; ``PeftModel.from_pretrained(base, path)`` loads it.
  ``--resume`` of a LoRA run is not supported yet (refused before any model loads).

Defaults as TRL's ``ModelConfig`` pairs them: ``--lora-alpha`` 2·rank (TRL: r 16, alpha 32); no LoRA
dropout (the trainer's forward passes stay deterministic, so the old-policy log-probs equal the
first epoch's)."""

from __future__ import annotations

from typing import List, Optional, Union

import torch

from .batch import TokenScorer
from .errors import UserInputError
from .precision import FULL, Precision


def target_modules(spec: str) -> Union[str, List[str]]:
    """``all-linear`` as is, else the comma-separated module names (``q_proj,v_proj``)."""
    if spec.strip() == "all-linear":
        return "all-linear"
    names = [s.strip() for s in spec.split(",")]
    if not all(names):
        raise UserInputError(f"--lora-target-modules: expected all-linear or comma-separated module names, got {spec!r}")
    return names


def import_peft():
    try:
        import peft
    except ImportError:
        raise UserInputError("--lora-rank needs the peft package: pip install peft (or pip install -e .[train])") from None
    return peft


def apply_lora(lm: torch.nn.Module, *, rank: int, alpha: Optional[float], modules: str) -> torch.nn.Module:
    """``lm`` wrapped in a ``PeftModel`` with a fresh rank-``rank`` adapter."""
    peft = import_peft()
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=0.0,
                             target_modules=target_modules(modules), task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(lm, config)
    except ValueError as exc:  # e.g. target modules not found in the model
        raise UserInputError(f"--lora-target-modules {modules}: {str(exc).splitlines()[0][:300]}") from None


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


class AdapterDisabledScorer(TokenScorer):
    """The reference policy of a LoRA run: the policy's own network with its adapters switched off."""

    def forward(self, *args, **kwargs):
        with self.lm.disable_adapter():
            return super().forward(*args, **kwargs)


def lora_reference(lm: torch.nn.Module, temperature: float, precision: Precision = FULL) -> TokenScorer:
    return AdapterDisabledScorer(lm, temperature=temperature, precision=precision)
