"""The checks of a policy loss's per-token inputs against its config, shared by ``fastpo.policy_loss``'s
callers that score their own log-probs (``fastpo.linear_policy_loss``)."""

from __future__ import annotations

from typing import Optional

import torch

from fastpo._layout import TokenLayout, check_like_layout
from fastpo.ops.policy_loss import check_num_tokens
from fastpo.policy_config import PolicyLossConfig

__all__ = ["check_policy_inputs"]


def check_policy_inputs(layout: TokenLayout, config: PolicyLossConfig, *, advantages: torch.Tensor,
                        ref_logp: Optional[torch.Tensor], rollout_logp: Optional[torch.Tensor],
                        is_weights: Optional[torch.Tensor], num_tokens, has_entropy: bool,
                        layout_name: str = "old_logp"):
    """Shapes and devices like the layout's tensor, and what the config needs; returns the checked
    ``num_tokens`` (see ``fastpo.ops.policy_loss.check_num_tokens``)."""
    check_like_layout(layout, advantages, "advantages", layout_name)
    for name, t in (("ref_logp", ref_logp), ("rollout_logp", rollout_logp), ("is_weights", is_weights)):
        if t is not None:
            check_like_layout(layout, t, name, layout_name)
    if is_weights is not None and config.rollout_is != "none":
        raise ValueError(f"is_weights replaces config.rollout_is: pass one of them, got rollout_is="
                         f"{config.rollout_is!r} and is_weights")
    if config.kl_coef > 0 and ref_logp is None:
        raise ValueError(f"config.kl_coef={config.kl_coef} > 0 needs ref_logp (got None)")
    if config.entropy_coef != 0 and not has_entropy:
        raise ValueError(f"config.entropy_coef={config.entropy_coef} != 0 needs entropy (got None)")
    if config.rollout_is != "none" and rollout_logp is None:
        raise ValueError(f"config.rollout_is={config.rollout_is!r} needs rollout_logp (got None)")
    num_tokens = check_num_tokens(num_tokens, layout)
    if num_tokens is not None and config.aggregation != "token_mean":
        raise ValueError(f"num_tokens applies to aggregation='token_mean' only, got aggregation="
                         f"{config.aggregation!r} (scale sequence-mean / token_sum_norm losses yourself)")
    return num_tokens
