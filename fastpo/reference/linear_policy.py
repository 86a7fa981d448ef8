"""Spec of ``fastpo.linear_policy_loss``: the policy loss of the lm_head's log-probs, built eagerly."""

from __future__ import annotations

from typing import Optional

import torch

from fastpo.loss_output import LossOutput
from fastpo.policy_config import GRPO, PolicyLossConfig
from fastpo.reference.logprobs import linear_token_logprobs
from fastpo.reference.policy import policy_loss

__all__ = ["linear_policy_loss"]


def linear_policy_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, old_logp: torch.Tensor,
    advantages: torch.Tensor, mask: Optional[torch.Tensor] = None, *, cu_seqlens=None, ref_logp=None,
    rollout_logp=None, is_weights=None, num_tokens=None, config: PolicyLossConfig = GRPO, temperature=1.0,
    bias=None, ignore_index: int = -100, logit_softcap=None, logit_scale=None, compute_entropy=None,
    process_group=None, generator=None, entropy_threshold=None,
) -> LossOutput:
    """``policy_loss(linear_token_logprobs(hidden, weight, labels, ...), old_logp, advantages, ...)`` with
    the full ``[N, V]`` logits (entropy computed when ``compute_entropy``, default: when the config reads it)."""
    reads_entropy = config.entropy_coef != 0 or config.top_entropy_quantile < 1.0
    with_entropy = reads_entropy if compute_entropy is None else compute_entropy
    scored = linear_token_logprobs(hidden, weight, labels, bias, temperature, ignore_index, with_entropy, None,
                                   logit_softcap, 1.0 if logit_scale is None else logit_scale)
    logp, entropy = scored if with_entropy else (scored, None)
    return policy_loss(logp, old_logp, advantages, mask, cu_seqlens=cu_seqlens, ref_logp=ref_logp,
                       entropy=entropy, rollout_logp=rollout_logp, is_weights=is_weights, num_tokens=num_tokens,
                       config=config, process_group=process_group, generator=generator,
                       entropy_threshold=entropy_threshold)
