"""PPO with a critic (Ouyang et al. 2022's RLHF recipe, as verl runs it).

Per step: one response per prompt (``--group-size`` responses per prompt also work: they are just
more samples); token rewards are the KL penalty against the reference, ``−kl_coef·(old_logp −
ref_logp)`` (k1), plus the outcome reward on the last response token; ``fastpo.gae`` over each
response gives advantages and returns from the critic's values; advantages are whitened over the
batch (``fastpo.whiten``). The loss is ``policy_loss`` (PPO preset: clip 0.2, dual clip 3,
token mean, no KL term: the KL lives in the reward) plus ``vf_coef · value_loss`` (clip 0.2)."""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch

import fastpo

from ..batch import packed_rollout_logp, policy_loss_of, score_in_chunks
from ..models import values_of
from .base import Algorithm, Experience, metrics_of, scorable_mask

DEFAULT_KL_COEF = 0.05


class PPO(Algorithm):
    name = "ppo"
    needs_critic = True

    def __init__(self, trainer):
        super().__init__(trainer)
        self.kl_coef = DEFAULT_KL_COEF if self.cfg.kl_coef is None else self.cfg.kl_coef
        self.needs_reference = self.kl_coef > 0
        self.config = dataclasses.replace(fastpo.PPO, rollout_is=self.cfg.rollout_is,
                                          rollout_is_cap=self.cfg.rollout_is_cap)

    @torch.no_grad()
    def experience(self, step: int) -> Experience:
        _, rollout, scores, _, term_metrics = self.scored_rollout(step, self.cfg.group_size)
        batch = self.token_batch(rollout)
        old_logp, entropy = self.old_policy(batch)
        rollout_logp = packed_rollout_logp(rollout.rollout_logp, self.trainer.device)
        metrics = self.rollout_metrics(rollout, scores, old_logp, entropy, rollout_logp, batch)
        metrics.update(term_metrics)  # rewards/NAME/mean|std of each reward term
        old_values = score_in_chunks(lambda b: values_of(self.trainer.critic_eval, b), batch,
                                     self.cfg.micro_batch_size)
        token_rewards = torch.zeros_like(old_logp)
        ref_logp = self.reference_logp(batch)
        if ref_logp is not None:
            kl = old_logp - ref_logp
            kl = torch.where(torch.isfinite(kl), kl, 0.0)  # tokens outside the scored nucleus: scorable_mask
            token_rewards -= self.kl_coef * kl
            metrics["kl"] = float(kl.mean()) if kl.numel() else 0.0
        last = batch.last_token_index()
        has_tokens = last >= 0
        token_rewards[last[has_tokens]] += scores[has_tokens]
        adv, returns = fastpo.gae(token_rewards, old_values, cu_seqlens=batch.cu_seqlens,
                                  gamma=self.cfg.gamma, lam=self.cfg.lam)
        adv = fastpo.whiten(adv)
        metrics["value_mean"] = float(old_values.mean()) if old_values.numel() else 0.0
        tensors = {"old_logp": old_logp, "advantages": adv, "returns": returns, "old_values": old_values,
                   "rollout_logp": rollout_logp}
        scorable = scorable_mask(old_logp, metrics)
        if scorable is not None:
            tensors["mask"] = scorable
        return Experience(batch, tensors, metrics, rollout.num_tokens)

    def loss(self, exp: Experience) -> Tuple[torch.Tensor, Dict[str, Optional[float]]]:
        t, batch = exp.tensors, exp.batch
        num_tokens, _ = self.policy_loss_scale(exp, self.config.aggregation)  # token mean: factor 1
        pg = policy_loss_of(self.trainer.policy, batch, t["old_logp"], t["advantages"], mask=t.get("mask"),
                            rollout_logp=t["rollout_logp"] if self.config.rollout_is != "none" else None,
                            num_tokens=num_tokens, config=self.config)
        values = values_of(self.trainer.critic, batch)
        vf = fastpo.value_loss(values, t["old_values"], t["returns"], cu_seqlens=batch.cu_seqlens, clip=0.2)
        vf_loss = vf.loss * (batch.num_response_tokens / max(self.step_totals(exp).local_tokens, 1))
        metrics = metrics_of(pg, ["clip_frac", "ratio_mean", "ppo_kl"])
        metrics.update(pg_loss=float(pg.loss.detach()), vf_loss=float(vf_loss.detach()),
                       vf_clip_frac=float(vf.metrics["vf_clip_frac"]))
        return pg.loss + self.cfg.vf_coef * vf_loss, metrics
