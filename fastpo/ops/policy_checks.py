"""Argument checks of ``fastpo.policy_loss`` and ``fastpo.linear_policy_loss`` (the public boundary): the
per-token inputs against the layout and the config, and ``num_tokens`` (its value is checked inside the op,
where it is data, by :func:`check_num_tokens_value`)."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional

import torch

from fastpo import _validation as check
from fastpo._layout import TokenLayout, check_like_layout
from fastpo.policy_config import PolicyLossConfig

__all__ = ["check_num_tokens", "check_num_tokens_value", "check_policy_inputs"]


def check_num_tokens_value(num_tokens: torch.Tensor) -> None:
    """A ``num_tokens`` tensor holds a finite count > 0. Data-dependent, so it runs inside the custom op
    (not traced by torch.compile): on the host for a CPU tensor; for a CUDA tensor on the device with
    ``torch._assert_async`` (no host sync: a bad count fails at the next synchronisation, with a
    device-side assertion). Traced (the reference backend under torch.compile), it is the device check too."""
    if num_tokens.device.type == "cpu" and not torch.compiler.is_compiling():
        value = float(num_tokens)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"num_tokens must be a finite count > 0, got a tensor holding {value}")
    else:
        n = num_tokens.to(torch.float64)
        torch._assert_async(torch.isfinite(n) & (n > 0), "fastpo.policy_loss: num_tokens must be finite and > 0")


def check_num_tokens(num_tokens, layout: TokenLayout):
    """None, an int > 0, or a one-element real tensor on the tokens' device (its value is checked by
    :func:`check_num_tokens_value`, in the op)."""
    if num_tokens is None or isinstance(num_tokens, torch.Tensor):
        if num_tokens is not None:
            if num_tokens.numel() != 1 or num_tokens.is_complex() or num_tokens.dtype == torch.bool:
                raise ValueError(f"num_tokens must be an int or a one-element real tensor, got a tensor of "
                                 f"dtype {num_tokens.dtype} and shape {check.shape_of(num_tokens)}")
            if num_tokens.device != layout.cu_seqlens.device:
                raise ValueError(f"num_tokens must be on the tokens' device {layout.cu_seqlens.device}, "
                                 f"got {num_tokens.device}")
            num_tokens = num_tokens.detach().reshape(())
        return num_tokens
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, Integral):
        raise TypeError(f"num_tokens must be None, an int or a tensor, got {type(num_tokens).__name__}")
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    return num_tokens  # not int(): under torch.compile a SymInt stays symbolic


def check_policy_inputs(layout: TokenLayout, config: PolicyLossConfig, *, advantages: torch.Tensor,
                        ref_logp: Optional[torch.Tensor], rollout_logp: Optional[torch.Tensor],
                        is_weights: Optional[torch.Tensor], num_tokens, has_entropy: bool, generator=None,
                        entropy_threshold=None, layout_name: str = "old_logp"):
    """A policy loss's per-token inputs against the layout and what the config needs (shared by
    ``policy_loss`` and ``linear_policy_loss``); returns the checked ``num_tokens``."""
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
    _check_prepass_inputs(config, has_entropy, rollout_logp, generator, entropy_threshold)
    num_tokens = check_num_tokens(num_tokens, layout)
    if num_tokens is not None and config.aggregation != "token_mean":
        raise ValueError(f"num_tokens applies to aggregation='token_mean' only, got aggregation="
                         f"{config.aggregation!r} (scale sequence-mean / token_sum_norm losses yourself)")
    return num_tokens


def _check_prepass_inputs(config, has_entropy, rollout_logp, generator, entropy_threshold):
    if config.top_entropy_quantile < 1.0 and not has_entropy:
        raise ValueError(f"config.top_entropy_quantile={config.top_entropy_quantile} < 1 masks tokens by their "
                         f"entropy: pass entropy (got None)")
    if config.rollout_rejection is not None and rollout_logp is None:
        raise ValueError(f"config.rollout_rejection={config.rollout_rejection!r} needs rollout_logp (got None)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if entropy_threshold is not None:
        if config.top_entropy_quantile >= 1.0:
            raise ValueError("entropy_threshold applies with config.top_entropy_quantile < 1 only")
        if isinstance(entropy_threshold, bool) or not isinstance(entropy_threshold, (Real, torch.Tensor)) or (
                isinstance(entropy_threshold, torch.Tensor) and entropy_threshold.numel() != 1):
            raise TypeError(f"entropy_threshold must be a number or a one-element tensor, got "
                            f"{type(entropy_threshold).__name__}")
