"""Eager PyTorch definitions of every fastpo op: the executable specification.

Readable and float64-capable; the Triton and CPU paths are tested against these functions. They are
not meant to be fast (the log-prob references materialise full ``[N, V]`` tensors). One module per
family of ops; everything is re-exported here, so ``fastpo.reference.<op>`` is the spec of
``fastpo.<op>``.
"""

from fastpo.reference.advantages import gae, group_advantages, process_advantages, whiten
from fastpo.reference.estimators import multi_reward_advantages, optimal_token_baseline
from fastpo.reference.logprobs import linear_token_logprobs, token_logprobs
from fastpo.reference.policy import policy_loss, value_loss
from fastpo.reference.linear_policy import linear_policy_loss
from fastpo.reference.preference import (cpo_loss, kto_kl_ref_point, kto_loss, nll_loss, orpo_loss,
                                        sequence_logprobs, simpo_loss)
from fastpo.reference.dpo import dpo_loss
from fastpo.reference.distill import linear_distill_loss, sampled_distill_loss

__all__ = ["gae", "group_advantages", "process_advantages", "whiten", "multi_reward_advantages", "optimal_token_baseline", "sequence_logprobs", "dpo_loss", "simpo_loss", "orpo_loss", "kto_loss", "cpo_loss", "nll_loss", "kto_kl_ref_point", "token_logprobs", "linear_token_logprobs", "policy_loss", "value_loss", "linear_policy_loss", "linear_distill_loss", "sampled_distill_loss"]
