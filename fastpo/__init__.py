"""fastpo: the loss hot path of LLM reinforcement learning and preference optimisation, fused.

Public API (see DESIGN.md): ``token_logprobs``, ``linear_token_logprobs``; ``fastpo.reference``
holds the eager specification of every op.
"""

from fastpo import reference
from fastpo.loss_output import LossOutput
from fastpo.ops import linear_token_logprobs, token_logprobs
from fastpo.reference.logprobs import LogProbOutputs
from fastpo.ops.policy_loss import policy_loss
from fastpo.ops.linear_policy_loss import linear_policy_loss
from fastpo.ops.linear_distill import linear_distill_loss
from fastpo.ops.sampled_distill import sampled_distill_loss
from fastpo.ops.value_loss import value_loss
from fastpo.policy_config import (BNPO, CISPO, CISPO_TRL, DAPO, DPPO_KL, DPPO_TV, DR_GRPO, DRO, GMPO, GPG, GRPO, GSPO,
                                   LUSPO, PPO, SAPO, VESPO, PolicyLossConfig)
from fastpo.policy_config import CLIP_COV, KL_COV
from fastpo.ops.gae import gae
from fastpo.ops.group_advantages import group_advantages, process_advantages
from fastpo.ops.multi_reward import multi_reward_advantages
from fastpo.ops.overlong import overlong_penalty
from fastpo.ops.token_baseline import optimal_token_baseline
from fastpo.ops.whiten import whiten
from fastpo.ops.sequence_logprobs import sequence_logprobs
from fastpo.preference import (cpo_loss, dpo_loss, kto_kl_ref_point, kto_loss, ld_sequence_logprobs, nll_loss,
                               orpo_loss, simpo_loss, wpo_weights)

__version__ = "0.1.0"

__all__ = [
    "gae", "group_advantages", "process_advantages", "whiten",
    "multi_reward_advantages", "optimal_token_baseline", "overlong_penalty",
    "sequence_logprobs", "dpo_loss", "simpo_loss", "orpo_loss", "kto_loss",
    "cpo_loss", "nll_loss", "kto_kl_ref_point", "ld_sequence_logprobs", "wpo_weights",
    "token_logprobs", "linear_token_logprobs", "LogProbOutputs",
    "LossOutput", "reference", "__version__",
    "policy_loss", "linear_policy_loss", "value_loss", "PolicyLossConfig", "PPO", "GRPO", "DAPO", "DR_GRPO", "GSPO",
    "BNPO", "LUSPO", "CISPO", "CISPO_TRL", "SAPO", "GMPO", "GPG", "DPPO_TV", "DPPO_KL", "DRO", "VESPO",
    "CLIP_COV", "KL_COV",
    "linear_distill_loss", "sampled_distill_loss",
]
