"""What every algorithm does each step, and the pieces they share.

An algorithm turns a step number into an :class:`Experience` (rollout, rewards, old-policy and
reference log-probs, advantages: no gradients) and an experience into a loss. The loop
(``fastpo.trainer.loop``) owns the optimiser, clipping, skipping non-finite steps, logging and
checkpoints, so each algorithm module is only its math."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

import fastpo

from ...rollout.base import Rollout, SamplingSettings
from ..batch import TokenBatch, make_token_batch, token_logprobs


@dataclass
class Experience:
    """One step's training data. ``tensors`` holds what the loss reads; ``metrics`` what was
    measured while collecting it (rewards, lengths, the rollout/trainer log-prob gap)."""

    batch: Optional[TokenBatch]
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: Dict[str, Optional[float]] = field(default_factory=dict)
    num_tokens: int = 0          # prompt + response tokens processed (for tokens/s)

    @property
    def empty(self) -> bool:
        return self.batch is None or self.batch.num_response_tokens == 0


class Algorithm(ABC):
    """Base class: ``experience(step)`` then ``loss(experience)``; see the module docstring."""

    name = "?"
    needs_reference = False
    needs_critic = False

    def __init__(self, trainer):
        self.trainer = trainer
        self.cfg = trainer.cfg

    @abstractmethod
    def experience(self, step: int) -> Experience:
        """Collect the step's data without gradients."""

    @abstractmethod
    def loss(self, exp: Experience) -> Tuple[torch.Tensor, Dict[str, Optional[float]]]:
        """The differentiable loss of an experience and its metrics (plain floats or None)."""

    # ---- shared pieces -------------------------------------------------------------------------

    def sampling(self, step: int, *, n: int, greedy: bool = False, purpose: int = 0) -> SamplingSettings:
        return SamplingSettings(n=n, temperature=0.0 if greedy else self.cfg.temperature, top_p=self.cfg.top_p,
                                max_new_tokens=self.cfg.max_new_tokens,
                                seed=self.trainer.seed_for(step, purpose=purpose))

    def rollout(self, step: int, n: int):
        """Sample prompts, generate ``n`` responses each and score them: (examples, rollout, rewards [B])."""
        examples = self.trainer.prompts.sample(self.cfg.prompts_per_step, self.trainer.rng_for(step))
        rollout = self.trainer.rollout.generate([e.prompt for e in examples], self.sampling(step, n=n))
        rewards = self.score(examples, rollout)
        return examples, rollout, rewards

    def score(self, examples, rollout: Rollout) -> torch.Tensor:
        """Rewards ``[B]`` float32 of each response against its prompt's example."""
        per_sample = [examples[g] for g in rollout.group_index]
        values = self.trainer.rewards([e.prompt for e in per_sample], rollout.completions,
                                      [e.answer for e in per_sample])
        return torch.tensor(values, dtype=torch.float32, device=self.trainer.device)

    def token_batch(self, rollout: Rollout) -> TokenBatch:
        return make_token_batch(rollout.prompt_ids, rollout.response_ids, self.trainer.tokenizer.pad_token_id,
                                self.trainer.device)

    @torch.no_grad()
    def old_policy(self, batch: TokenBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """The rollout-time forward: old-policy log-probs and entropies ``[N]`` of the sampled tokens."""
        return token_logprobs(self.trainer.policy_eval, batch, return_entropy=True)

    @torch.no_grad()
    def reference_logp(self, batch: TokenBatch) -> Optional[torch.Tensor]:
        if self.trainer.ref is None:
            return None
        return token_logprobs(self.trainer.ref, batch)

    def rollout_metrics(self, rollout: Rollout, rewards: torch.Tensor, old_logp: torch.Tensor,
                        entropy: torch.Tensor, rollout_logp: torch.Tensor,
                        batch: TokenBatch) -> Dict[str, Optional[float]]:
        """Reward and length statistics, and the train/rollout log-prob gap over sampled tokens
        (``rollout_logp``: the engine's log-probs, packed like ``old_logp``)."""
        gap = (old_logp - rollout_logp).abs()
        n_tok = max(batch.num_response_tokens, 1)
        is_stats = importance_weight_stats(old_logp, rollout_logp, batch, cap=self.cfg.rollout_is_cap,
                                           sequence_level=self.cfg.rollout_is.startswith("sequence"))
        return {**is_stats,
            "reward_mean": float(rewards.mean()) if rewards.numel() else None,
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "response_len": float(batch.lengths.float().mean()) if rewards.numel() else 0.0,
            "finished_frac": sum(rollout.finished) / max(len(rollout), 1),
            "entropy": float(entropy.sum() / n_tok),
            "rollout_logp_abs_diff": float(gap.sum() / n_tok),
            "rollout_logp_max_abs_diff": float(gap.max()) if gap.numel() else 0.0,
        }

    def global_token_count(self, batch: TokenBatch, mask: Optional[torch.Tensor] = None) -> Optional[float]:
        """``num_tokens`` for token-mean losses under data parallelism: the token count over all
        ranks divided by the world size (DDP averages gradients over ranks)."""
        info = self.trainer.dist
        if not info.enabled:
            return None
        from ..distributed import all_sum

        local = float(mask.sum()) if mask is not None else batch.num_response_tokens
        return max(all_sum(local, info), 1.0) / info.world_size


def importance_weight_stats(old_logp: torch.Tensor, rollout_logp: torch.Tensor, batch: TokenBatch, *,
                            cap: float, sequence_level: bool) -> Dict[str, Optional[float]]:
    """Statistics of the rollout importance weights that ``PolicyLossConfig.rollout_is`` uses, measured
    whether or not the correction is on: per token w = exp(old_logp − rollout_logp) (log clamped to
    ±20), per sequence the exp of its mean log-weight. ``rollout_is_over_cap_frac`` is the fraction of
    tokens (or, with a ``sequence_*`` mode, of sequences) whose weight exceeds ``cap``: what
    ``*_truncate`` caps and ``*_mask`` drops."""
    if old_logp.numel() == 0:
        return {k: None for k in ("rollout_is_mean", "rollout_is_min", "rollout_is_max", "rollout_is_seq_mean",
                                  "rollout_is_seq_max", "rollout_is_over_cap_frac")}
    log_w = (old_logp.float() - rollout_logp.float()).clamp(-20.0, 20.0)
    w = log_w.exp()
    seq_log_w = fastpo.sequence_logprobs(log_w, cu_seqlens=batch.cu_seqlens, average=True)
    seq_w = seq_log_w[batch.lengths > 0].exp()
    level = seq_w if sequence_level else w
    return {
        "rollout_is_mean": float(w.mean()),
        "rollout_is_min": float(w.min()),
        "rollout_is_max": float(w.max()),
        "rollout_is_seq_mean": float(seq_w.mean()),
        "rollout_is_seq_max": float(seq_w.max()),
        "rollout_is_over_cap_frac": float((level > cap).float().mean()),
    }


def finite_or_none(x) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def metrics_of(out, keys: List[str]) -> Dict[str, Optional[float]]:
    return {k: float(out.metrics[k]) for k in keys if k in out.metrics}
