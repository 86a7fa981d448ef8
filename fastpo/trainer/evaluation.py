"""Held-out evaluation (``--eval-every N``): every N optimiser steps, one response per held-out
prompt, greedy (``--eval-temperature 0``, the default) or sampled at ``--eval-temperature``, scored
with the run's reward terms. The step's ``metrics.jsonl`` line gets:

  eval_accuracy          fraction of responses whose answer check scores 1: the first reward term
                         (the task's exact-number or countdown check, or math-verify's with --reward math)
  eval_reward_mean/_std  the run's total reward (the weighted sum of its terms), as ``reward_mean``
  eval_rewards/NAME/mean, eval_rewards/NAME/std   each term's unweighted value (TRL's names)
  eval_response_len      mean response length in tokens; eval_finished_frac: the fraction that ended at EOS
  eval_reward_failures   reward calls that failed (raised, timed out) during the evaluation
  eval_s                 seconds the evaluation took

The held-out set: ``--eval-data`` / ``--eval-split`` with ``--task dataset`` (its first ``--eval-size``
rows, default all); the built-in tasks' fixed ``eval_set(--eval-size)`` (default 64, drawn from its
own seeded generator). Under torchrun every rank evaluates the whole set with the same seed (so
FSDP ranks generate in lock step) and the main process reports it: the work is repeated, not split."""

from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch

from ..rollout.base import SamplingSettings
from .errors import UserInputError
from .multi_reward import mean_std, term_statistics

BUILTIN_EVAL_SIZE = 64
EVAL_SEED = 1234  # the built-in tasks' held-out draw (ArithmeticTask.eval_set's default)
_EVAL_PURPOSE = 7  # seed_for(step, purpose): distinct from the rollout's (0) and ReMax's greedy pass (1)


def eval_examples_of(trainer) -> List:
    """The held-out examples of a run (see the module docstring)."""
    cfg = trainer.cfg
    if trainer.eval_examples is not None:
        examples = list(trainer.eval_examples)
        return examples[:cfg.eval_size] if cfg.eval_size else examples
    eval_set = getattr(trainer.prompts, "eval_set", None)
    if eval_set is None:
        raise UserInputError(f"--eval-every: --task {cfg.task} has no held-out set; use --task dataset with "
                             "--eval-data or --eval-split, or a built-in task")
    return eval_set(cfg.eval_size or BUILTIN_EVAL_SIZE, seed=EVAL_SEED)


class Evaluator:
    """Scores the held-out set with the run's rollout engine and rewards; ``due(step)`` says when."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.cfg = trainer.cfg
        self.every = self.cfg.eval_every
        self.examples = eval_examples_of(trainer) if self.every else []

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def settings(self, step: int) -> SamplingSettings:
        cfg = self.cfg
        greedy = cfg.eval_temperature == 0
        return SamplingSettings(n=1, temperature=cfg.eval_temperature, top_p=1.0 if greedy else cfg.top_p,
                                max_new_tokens=cfg.max_new_tokens,
                                seed=self.trainer.seed_for(step, purpose=_EVAL_PURPOSE))

    @torch.no_grad()
    def __call__(self, step: int) -> Dict[str, Optional[float]]:
        t0 = time.perf_counter()
        trainer, algo = self.trainer, self.trainer.algo
        failures = sum(trainer.rewards.failures.values())
        rollout = trainer.rollout.generate(algo.prompt_texts(self.examples), self.settings(step))
        breakdown = algo.reward_breakdown(self.examples, rollout)
        totals = trainer.rewards.total(breakdown)
        check = breakdown[trainer.rewards.terms[0].name]
        metrics: Dict[str, Optional[float]] = {"eval_accuracy": sum(v >= 1.0 for v in check) / max(len(check), 1)}
        metrics["eval_reward_mean"], metrics["eval_reward_std"] = mean_std(totals)
        metrics.update(term_statistics(breakdown, "eval_"))
        metrics["eval_response_len"] = sum(map(len, rollout.response_ids)) / max(len(rollout), 1)
        metrics["eval_finished_frac"] = sum(rollout.finished) / max(len(rollout), 1)
        metrics["eval_reward_failures"] = sum(trainer.rewards.failures.values()) - failures
        metrics["eval_s"] = time.perf_counter() - t0
        return metrics
