"""Group-relative policy gradient: GRPO, DAPO, Dr.GRPO, GSPO, RLOO and REINFORCE++.

Per step: G responses to each of P prompts; one outcome reward per response; the advantage of a
response compares it with its group (``fastpo.group_advantages``) and is shared by all its tokens;
the loss is ``fastpo.linear_policy_loss`` (from the hidden states) with the algorithm's preset. The
variants differ only in the row of :data:`VARIANTS` (advantage estimator, loss preset) and DAPO's
group filter.

  grpo          (s − mean_g)/(std_g + ε)     GRPO preset: clip 0.2, k3 KL β=0.04, seq-mean-token-mean
  dapo          same advantages              DAPO preset: clip 0.2/0.28, token-mean; dynamic sampling:
                                             groups whose responses all got the same reward are replaced by
                                             further rounds' groups, or masked out (dynamic_sampling.py)
  dr_grpo       s − mean_g                   DR_GRPO preset: Σ token losses / (B · max_new_tokens)
  gspo          (s − mean_g)/(std_g + ε)     GSPO preset: sequence-level ratio, clip 3e-4/4e-4
  rloo          s − mean of the others       token-mean PPO-clip loss, no KL in the loss
  reinforce_pp  s − mean_g, batch-whitened   token-mean PPO-clip loss, no KL in the loss
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch

import fastpo

from ..batch import packed_rollout_logp, policy_loss_of
from .base import Algorithm, Experience, metrics_of, scorable_mask

_PG_ONLY = fastpo.PolicyLossConfig(clip_low=0.2, clip_high=0.2, kl_coef=0.0, aggregation="token_mean")

# name -> (group_advantages method, loss preset)
VARIANTS = {
    "grpo": ("grpo", fastpo.GRPO),
    "dapo": ("grpo", fastpo.DAPO),
    "dr_grpo": ("dr_grpo", fastpo.DR_GRPO),
    "gspo": ("grpo", fastpo.GSPO),
    "rloo": ("rloo", _PG_ONLY),
    "reinforce_pp": ("reinforce_pp", _PG_ONLY),
    "remax": ("remax", _PG_ONLY),
}

LOSS_METRICS = ["clip_frac", "ratio_mean", "ppo_kl", "ref_kl"]


def loss_config(name: str, cfg) -> fastpo.PolicyLossConfig:
    """The preset with the run's overrides: KL weight, rollout correction, and Dr.GRPO's length."""
    preset = VARIANTS[name][1]
    changes = dict(rollout_is=cfg.rollout_is, rollout_is_cap=cfg.rollout_is_cap)
    if cfg.kl_coef is not None:
        changes["kl_coef"] = cfg.kl_coef
    if preset.aggregation == "token_sum_norm":
        changes["norm_length"] = cfg.max_new_tokens
    return dataclasses.replace(preset, **changes)


class GroupPolicyGradient(Algorithm):
    """GRPO and its relatives (see the module docstring)."""

    def __init__(self, trainer, name: str):
        super().__init__(trainer)
        self.name = name
        self.method = VARIANTS[name][0]
        self.config = loss_config(name, self.cfg)
        self.needs_reference = self.config.kl_coef > 0
        self.filter_groups = name == "dapo" if self.cfg.dynamic_sampling is None else self.cfg.dynamic_sampling

    def baseline(self, step: int, examples) -> Optional[torch.Tensor]:
        """Per-prompt baseline for ``remax``; the group methods need none."""
        return None

    @torch.no_grad()
    def experience(self, step: int) -> Experience:
        examples, rollout, rewards, terms, term_metrics, generated_tokens = self.sample(step)
        batch = self.token_batch(rollout)
        old_logp, entropy = self.old_policy(batch)
        rollout_logp = packed_rollout_logp(rollout.rollout_logp, self.trainer.device)
        metrics = self.rollout_metrics(rollout, rewards, old_logp, entropy, rollout_logp, batch)
        metrics.update(term_metrics)  # rewards/NAME/mean|std of each reward term
        baseline = self.baseline(step, examples)
        if baseline is not None:
            baseline = baseline.repeat_interleave(self.cfg.group_size)
            metrics["baseline_reward_mean"] = float(baseline.mean())
        adv = self.advantages(rewards, terms, baseline)
        tensors = {"old_logp": old_logp, "advantages": batch.per_token(adv), "rollout_logp": rollout_logp}
        if self.needs_reference:
            tensors["ref_logp"] = self.reference_logp(batch)
        mask = self.keep_sequences(rewards)  # dropped sequences leave every count, denominators included
        if mask is not None:
            metrics["kept_frac"] = float(mask.float().mean())
        if self.cfg.mask_truncated_completions:  # TRL: responses cut at --max-new-tokens leave the loss
            finished = torch.tensor(rollout.finished, dtype=torch.bool, device=rewards.device)
            mask = finished if mask is None else mask & finished
        if mask is not None:
            tensors["mask"] = batch.per_token(mask).float()
        scorable = scorable_mask(old_logp, metrics)
        if scorable is not None:
            tensors["mask"] = scorable if mask is None else tensors["mask"] * scorable
        return Experience(batch, tensors, metrics, generated_tokens)

    def sample(self, step: int):
        """``(examples, rollout, rewards, reward terms, their metrics, generated tokens)`` of the step:
        one round, or with dynamic sampling as many as it takes (``dynamic_sampling.py``)."""
        if not self.filter_groups or self.cfg.max_sampling_rounds == 1:
            examples, rollout, rewards, terms, term_metrics = self.scored_rollout(step, self.cfg.group_size)
            return examples, rollout, rewards, terms, term_metrics, rollout.num_tokens
        from ..dynamic_sampling import sample_informative_groups
        from ..multi_reward import term_statistics

        examples, rollout, rewards, terms, rounds, tokens = sample_informative_groups(
            self, step, max_rounds=self.cfg.max_sampling_rounds)
        names = [t.name for t in self.trainer.rewards.terms]
        term_metrics = term_statistics({name: terms[:, k].tolist() for k, name in enumerate(names)})
        term_metrics["sampling_rounds"] = rounds
        return examples, rollout, rewards, terms, term_metrics, tokens

    def advantages(self, rewards: torch.Tensor, terms: torch.Tensor, baseline: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-sequence advantages: the estimator of the total reward, or with ``--multi-objective``
        the aggregation of the reward terms ``[B, K]`` (``multi_reward.py``)."""
        if self.cfg.multi_objective is None:
            return fastpo.group_advantages(rewards, group_size=self.cfg.group_size, method=self.method,
                                           baseline=baseline)
        from ..multi_reward import multi_objective_advantages

        return multi_objective_advantages(terms, [t.weight for t in self.trainer.rewards.terms],
                                          group_size=self.cfg.group_size, aggregation=self.cfg.multi_objective,
                                          algo=self.name)

    def keep_sequences(self, rewards: torch.Tensor) -> Optional[torch.Tensor]:
        """Dynamic sampling (DAPO's; ``--dynamic-sampling``): keep groups whose rewards differ (the
        others have no signal); None when it is off."""
        if not self.filter_groups:
            return None
        from ..dynamic_sampling import informative_groups

        return informative_groups(rewards, self.cfg.group_size).repeat_interleave(self.cfg.group_size)

    def loss(self, exp: Experience) -> Tuple[torch.Tensor, Dict[str, Optional[float]]]:
        t = exp.tensors
        batch = exp.batch
        num_tokens, factor = self.policy_loss_scale(exp, self.config.aggregation)
        # Hidden states -> loss in one op (three lm_head GEMMs for token-local configs).
        out = policy_loss_of(
            self.trainer.policy, batch, t["old_logp"], t["advantages"], mask=t.get("mask"),
            ref_logp=t.get("ref_logp"),
            rollout_logp=t["rollout_logp"] if self.config.rollout_is != "none" else None,
            num_tokens=num_tokens, config=self.config)
        metrics = metrics_of(out, LOSS_METRICS)
        metrics["kl"] = metrics.pop("ref_kl") if self.needs_reference else None
        return out.loss * factor if factor != 1.0 else out.loss, metrics


class ReMax(GroupPolicyGradient):
    """ReMax (Li et al. 2023): the baseline of a prompt's sampled responses is the reward of its
    greedy response, generated each step with the current policy."""

    def __init__(self, trainer):
        super().__init__(trainer, "remax")

    @torch.no_grad()
    def baseline(self, step: int, examples) -> torch.Tensor:
        greedy = self.trainer.rollout.generate(self.prompt_texts(examples),
                                               self.sampling(step, n=1, greedy=True, purpose=1))
        return self.score(examples, greedy)
