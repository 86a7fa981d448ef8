"""What every rollout engine returns, and the small interface the trainer calls.

An engine turns P prompts into P·n sampled responses (``n`` per prompt, grouped contiguously:
samples ``p·n .. p·n + n − 1`` answer prompt ``p``) and records, for each sampled token, its
log-probability under the distribution it was sampled from (``rollout_logp``). The trainer scores the
same tokens itself (the old-policy log-probs); the difference between the two is the train/rollout
mismatch that ``PolicyLossConfig.rollout_is`` corrects."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are drawn. ``temperature == 0`` means greedy decoding (one response per prompt
    is then the only sensible ``n``). ``top_p = 1`` and ``top_k = 0`` leave the distribution whole."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Rollout:
    """P·n samples, grouped by prompt. Token lists are Python lists (ragged); ``response_ids[i]``
    ends with the EOS id when ``finished[i]`` (the EOS is a sampled token and is trained on)."""

    prompt_ids: List[List[int]]          # per sample (repeated n times per prompt)
    response_ids: List[List[int]]        # per sample, without padding
    rollout_logp: List[List[float]]      # per sampled token, aligned with response_ids
    completions: List[str]               # decoded responses, special tokens removed
    group_index: List[int]               # the prompt index of each sample
    finished: List[bool]                 # stopped at EOS (False: cut at max_new_tokens)

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def num_response_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_response_tokens + sum(len(p) for p in self.prompt_ids)


class RolloutEngine(ABC):
    """The trainer's view of a generator: sample, and learn about new weights."""

    name: str = "?"

    @abstractmethod
    def generate(self, prompts: List[str], settings: SamplingSettings) -> Rollout:
        """Sample ``settings.n`` responses for each prompt (in order, grouped)."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the next ``generate`` use ``model``'s current weights (called after each optimiser
        step). Engines that generate with the training model itself need do nothing."""

    def close(self) -> None:
        """Release the engine's resources (processes, device memory)."""


def eos_ids_of(model: torch.nn.Module, tokenizer) -> "set[int]":
    """The token ids that end a response: the model's generation config's ``eos_token_id`` (an id or
    a list), else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    eos = config.eos_token_id if config is not None and config.eos_token_id is not None else tokenizer.eos_token_id
    if eos is None:
        raise ValueError("neither the model's generation config nor the tokenizer names an EOS token")
    return set(eos if isinstance(eos, (list, tuple)) else [eos])


def cut_at_eos(tokens: List[int], eos_ids: "set[int]", pad_id: Optional[int]) -> "tuple[List[int], bool]":
    """The response up to and including its first EOS; (tokens, finished). Padding after an
    unfinished response (batch generation pads finished rows) is dropped too."""
    out: List[int] = []
    for tok in tokens:
        out.append(tok)
        if tok in eos_ids:
            return out, True
    while out and pad_id is not None and out[-1] == pad_id and pad_id not in eos_ids:
        out.pop()
    return out, False


def named_weights(model: torch.nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """``model``'s parameters and buffers under its Hugging Face names, for an engine that keeps its
    own copy. A ``peft`` LoRA model gives the merged weights ``W + ΔW`` under the base model's names
    (``...q_proj.weight``, no ``base_layer`` / ``lora_*`` entries), which is what a plain model of
    the same architecture loads; the adapters stay unmerged in ``model``."""
    if not hasattr(model, "peft_config"):
        yield from ((name, t.detach()) for name, t in model.state_dict().items())
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            active = [a for a in module.active_adapters if a in module.lora_A]
            if active:
                deltas[f"{name}.weight"] = sum(module.get_delta_weight(a) for a in active)
    for key, t in base.state_dict().items():
        if ".lora_" in key:
            continue
        name = key.replace(".base_layer.", ".")
        yield name, (t + deltas[name].to(t.dtype) if name in deltas else t).detach()
