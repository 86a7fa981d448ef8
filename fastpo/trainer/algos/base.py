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
from ..batch import TokenBatch, make_token_batch, score_in_chunks, token_logprobs
from ..packing import padding_fraction


@dataclass
class Experience:
    """One step's training data. ``tensors`` holds what the loss reads; ``metrics`` what was
    measured while collecting it (rewards, lengths, the rollout/trainer log-prob gap)."""

    batch: Optional[TokenBatch]
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: Dict[str, Optional[float]] = field(default_factory=dict)
    num_tokens: int = 0          # prompt + response tokens processed (for tokens/s)
    totals: Optional["StepTotals"] = None   # of the optimiser step's batch, when this is a micro-batch of it

    @property
    def empty(self) -> bool:
        return self.batch is None or self.batch.num_response_tokens == 0


@dataclass(frozen=True)
class StepTotals:
    """Counts over the whole batch of one optimiser step, which each micro-batch's loss is normalised
    by, so that the micro-batches' losses (and gradients) add up to the unsplit batch's:

      token_mean                     Σ l / tokens                       (``policy_loss(num_tokens=tokens)``)
      seq_mean_token_mean / _sum     its own mean × counted_here / counted_sequences
      token_sum_norm (Dr.GRPO)       its own Σ l / (B_here·L) × B_here / sequences
      value loss (token mean)        its own mean × tokens_here / local_tokens

    ``tokens`` is summed over ranks and divided by the world size (DDP averages gradients over ranks,
    so each rank's token sum over the global count / world size gives the global token mean)."""

    tokens: float               # counted response tokens (all ranks / world size)
    local_tokens: int           # response tokens on this rank, mask ignored
    sequences: int              # sequences on this rank
    counted_sequences: int      # sequences with at least one counted token on this rank

    @staticmethod
    def of(batch: TokenBatch, mask: Optional[torch.Tensor], dist) -> "StepTotals":
        counted = counted_sequences(batch, mask)
        local = float(mask.sum()) if mask is not None else float(batch.num_response_tokens)
        if dist is not None and dist.enabled:
            from ..distributed import all_sum

            tokens = max(all_sum(local, dist), 1.0) / dist.world_size
        else:
            tokens = max(local, 1.0)
        return StepTotals(tokens, batch.num_response_tokens, batch.num_sequences, counted)


def counted_sequences(batch: TokenBatch, mask: Optional[torch.Tensor]) -> int:
    """Sequences with at least one counted response token (the seq-mean denominators)."""
    if mask is None:
        return int((batch.lengths > 0).sum())
    per_seq = torch.zeros(batch.num_sequences, dtype=torch.float32, device=mask.device)
    per_seq.index_add_(0, torch.repeat_interleave(torch.arange(batch.num_sequences, device=mask.device),
                                                  batch.lengths), mask.float())
    return int((per_seq > 0).sum())


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
        return self.scored_rollout(step, n)[:3]

    def scored_rollout(self, step: int, n: int, round_: int = 0):
        """:meth:`rollout` plus each reward term's unweighted values ``[B, K]`` (the run's term order)
        and their ``rewards/NAME/mean|std`` metrics; ``round_`` > 0 draws other prompts and samples
        (dynamic sampling's further rounds)."""
        from ..multi_reward import term_matrix, term_statistics

        rng = self.trainer.rng_for(step) if round_ == 0 else self.trainer.rng_for(step, purpose=100 + round_)
        examples = self.trainer.prompts.sample(self.cfg.prompts_per_step, rng)
        settings = self.sampling(step, n=n, purpose=0 if round_ == 0 else 100 + round_)
        rollout = self.trainer.rollout.generate(self.prompt_texts(examples), settings)
        breakdown = self.reward_breakdown(examples, rollout)
        rewards = torch.tensor(self.trainer.rewards.total(breakdown), dtype=torch.float32, device=self.trainer.device)
        terms = term_matrix(breakdown, [t.name for t in self.trainer.rewards.terms], self.trainer.device)
        return examples, rollout, rewards, terms, term_statistics(breakdown)

    def prompt_texts(self, examples) -> List[str]:
        """What the model continues: each example's prompt through ``--chat-template``."""
        fmt = getattr(self.trainer, "format_prompt", None)
        return [e.prompt if fmt is None else fmt(e.prompt) for e in examples]

    def score(self, examples, rollout: Rollout) -> torch.Tensor:
        """Rewards ``[B]`` float32 of each response against its prompt's example: the weighted sum
        of :meth:`reward_breakdown`."""
        values = self.trainer.rewards.total(self.reward_breakdown(examples, rollout))
        return torch.tensor(values, dtype=torch.float32, device=self.trainer.device)

    def reward_breakdown(self, examples, rollout: Rollout) -> Dict[str, List[float]]:
        """Each reward term's unweighted value per response, ``{term name: [B]}``; batched reward
        functions also get the examples' other fields as columns (one entry per response)."""
        per_sample = [examples[g] for g in rollout.group_index]
        answers = [e.answer for e in per_sample]
        columns = {"answer": answers}
        if per_sample and all(getattr(e, "columns", None) for e in per_sample):
            columns = {k: [e.columns.get(k) for e in per_sample] for k in per_sample[0].columns}
        return self.trainer.rewards.breakdown(self.prompt_texts(per_sample), rollout.completions, answers, columns)

    def token_batch(self, rollout: Rollout) -> TokenBatch:
        return make_token_batch(rollout.prompt_ids, rollout.response_ids, self.trainer.tokenizer.pad_token_id,
                                self.trainer.device)

    @torch.no_grad()
    def old_policy(self, batch: TokenBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """The rollout-time forward: old-policy log-probs and entropies ``[N]`` of the sampled tokens
        (``--micro-batch-size`` sequences per forward)."""
        return score_in_chunks(lambda b: token_logprobs(self.trainer.policy_eval, b, return_entropy=True), batch,
                               self.cfg.micro_batch_size)

    @torch.no_grad()
    def reference_logp(self, batch: TokenBatch) -> Optional[torch.Tensor]:
        if self.trainer.ref is None:
            return None
        return score_in_chunks(lambda b: token_logprobs(self.trainer.ref, b), batch, self.cfg.micro_batch_size)

    def step_totals(self, exp: Experience) -> StepTotals:
        """The counts ``exp``'s loss is normalised by: the optimiser step's when ``exp`` is a
        micro-batch of it, else its own."""
        if exp.totals is not None:
            return exp.totals
        return StepTotals.of(exp.batch, exp.tensors.get("mask"), self.trainer.dist)

    def policy_loss_scale(self, exp: Experience, aggregation: str) -> Tuple[Optional[torch.Tensor], float]:
        """``(num_tokens, factor)`` for ``fastpo.policy_loss`` on ``exp``: the token-mean denominator
        of the whole step, or the factor that turns a sequence-level mean over this micro-batch into
        its share of the step's mean (see :class:`StepTotals`)."""
        totals = self.step_totals(exp)
        if aggregation == "token_mean":
            return torch.tensor(totals.tokens, dtype=torch.float32, device=exp.batch.labels.device), 1.0
        if aggregation == "token_sum_norm":
            return None, exp.batch.num_sequences / max(totals.sequences, 1)
        here = counted_sequences(exp.batch, exp.tensors.get("mask"))
        return None, here / max(totals.counted_sequences, 1)

    def rollout_metrics(self, rollout: Rollout, rewards: torch.Tensor, old_logp: torch.Tensor,
                        entropy: torch.Tensor, rollout_logp: torch.Tensor,
                        batch: TokenBatch) -> Dict[str, Optional[float]]:
        """Reward and length statistics, and the train/rollout log-prob gap over sampled tokens
        (``rollout_logp``: the engine's log-probs, packed like ``old_logp``)."""
        gap = (old_logp - rollout_logp).abs()
        gap = torch.where(torch.isfinite(gap), gap, 0.0)  # a token outside the scored nucleus: see scorable_mask
        n_tok = max(batch.num_response_tokens, 1)
        is_stats = importance_weight_stats(old_logp, rollout_logp, batch, cap=self.cfg.rollout_is_cap,
                                           sequence_level=self.cfg.rollout_is.startswith("sequence"))
        return {**is_stats,
            "reward_mean": float(rewards.mean()) if rewards.numel() else None,
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "response_len": float(batch.lengths.float().mean()) if rewards.numel() else 0.0,
            # share of the padded forward's token positions that are padding (what --padding-free skips)
            "padding_frac": padding_fraction(batch.attention_mask, self.cfg.micro_batch_size),
            "finished_frac": sum(rollout.finished) / max(len(rollout), 1),
            "entropy": float(entropy.sum() / n_tok),
            "rollout_logp_abs_diff": float(gap.sum() / n_tok),
            "rollout_logp_max_abs_diff": float(gap.max()) if gap.numel() else 0.0,
        }



def scorable_mask(old_logp: torch.Tensor, metrics: Dict[str, Optional[float]]) -> Optional[torch.Tensor]:
    """Under ``--score-truncated`` a sampled token that the trainer's logits put just outside the
    nucleus scores −inf (the engine's slightly different logits kept it): such tokens leave the loss,
    since their ratio and KL have no finite value. Returns the float token mask ``[N]`` of the scorable
    tokens, or None when every token is; logs the dropped share as ``unscorable_frac`` when there are any."""
    finite = torch.isfinite(old_logp)
    dropped = int((~finite).sum())
    if not dropped:
        return None
    metrics["unscorable_frac"] = dropped / old_logp.numel()
    return finite.float()


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
