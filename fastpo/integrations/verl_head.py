"""verl's fused log-prob + entropy head (``use_fused_kernels``) served by :func:`fastpo.linear_token_logprobs`.

With ``actor_rollout_ref.model.use_fused_kernels=True`` and ``fused_kernel_options.impl_backend`` ``torch``
(verl's default) or ``liger``, verl 0.9 replaces the HF model's ``forward`` by ``forward_with_torch_backend``
(``verl/models/transformers/dense_common.py``, and its qwen2_vl / qwen3_vl / glm4v / qwen3_5 copies). It runs
the backbone, then imports ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` *at call time* and
calls ``FusedLinearForPPO(impl_backend=...).forward(hidden_states, lm_head.weight, rolled_labels, temperature)``.

:func:`install` replaces that module attribute by :class:`FastpoFusedLinearForPPO`, a subclass with the same
constructor (and its validation), whose forward returns, for logits z = h·Wᵀ and τ the temperature,

    log_probs = z_y/τ − logsumexp(z/τ)                  (float32, shaped like the labels)
    entropy   = logsumexp(z/τ) − Σ_v softmax(z/τ)_v·z_v/τ  (in hidden_states' dtype, as verl's buffer)

both differentiable w.r.t. the hidden states and the head weight, from one ``linear_token_logprobs`` call
that never builds the ``[N, V]`` logits. Labels equal to -100 score 0 (as verl's liger backend). Under
autocast the head runs in the autocast dtype (hidden and weight cast to it, as verl's matmul would), with
fastpo itself run with autocast off. fastpo picks its own chunk size (verl's ``chunk_size`` only bounds
memory; the results do not depend on it).

Handed back to verl's own class (logged once, counted in :data:`STATS`): a temperature that is not a
Python real (verl's engine asserts a scalar), and DTensor hidden states or weights (a sharded head).

verl's ``impl_backend=triton`` (``verl.utils.kernel.linear_cross_entropy``) and Megatron's vocab-parallel
head are not swapped: use ``impl_backend=torch`` to have fastpo serve the head (its Triton kernel on CUDA).

Opt in with ``FASTPO_VERL_FUSED_HEAD=1`` in the workers' environment (``fastpo.integrations.verl`` reads it
when verl imports it as ``external_lib``; see :func:`install_from_env`), or call :func:`install` yourself.
"""

from __future__ import annotations

import collections
import logging
import os
from numbers import Real
from typing import Optional

import torch

from fastpo.integrations._head import head_logprobs, is_dtensor

from verl.utils.experimental import torch_functional as _verl_tf  # noqa: E402  (this module swaps its class)

__all__ = ["FastpoFusedLinearForPPO", "install", "uninstall", "installed", "install_from_env", "ENV_VAR", "STATS"]

logger = logging.getLogger("fastpo.integrations.verl")

ENV_VAR = "FASTPO_VERL_FUSED_HEAD"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
# Counts of the head calls fastpo served ("served:fused_linear") and handed back ("delegated:<reason>").
STATS: collections.Counter = collections.Counter()
_LOGGED: set = set()
_ORIGINAL = _verl_tf.FusedLinearForPPO  # verl's class, whatever install() later puts in its place


def _delegate_reason(hidden_states, vocab_weights, temperature) -> Optional[str]:
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        return f"temperature of type {type(temperature).__name__} (fastpo takes a Python real)"
    if is_dtensor(hidden_states) or is_dtensor(vocab_weights):
        return "DTensor hidden states or head weight"
    return None


class FastpoFusedLinearForPPO(_ORIGINAL):
    """verl's ``FusedLinearForPPO`` (same constructor) with the forward served by fastpo."""

    def forward(self, hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                temperature: float = 1.0):
        reason = _delegate_reason(hidden_states, vocab_weights, temperature)
        if reason is not None:
            STATS[f"delegated:{reason}"] += 1
            if reason not in _LOGGED:
                _LOGGED.add(reason)
                logger.warning("fastpo: verl's FusedLinearForPPO serves this call: %s", reason)
            return super().forward(hidden_states, vocab_weights, input_ids, temperature)
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
        if tuple(input_ids.shape) != tuple(hidden_states.shape[:-1]):
            raise ValueError(f"input_ids {tuple(input_ids.shape)} must match hidden_states "
                             f"{tuple(hidden_states.shape)} without its last dimension")
        log_probs, entropy = head_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64),
                                           temperature=temperature, return_entropy=True)
        STATS["served:fused_linear"] += 1
        return log_probs, entropy.to(hidden_states.dtype)


def install() -> None:
    """Makes ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` fastpo's (idempotent)."""
    _verl_tf.FusedLinearForPPO = FastpoFusedLinearForPPO


def uninstall() -> None:
    """Puts verl's own ``FusedLinearForPPO`` back."""
    _verl_tf.FusedLinearForPPO = _ORIGINAL


def installed() -> bool:
    """Whether verl's patched forwards currently get :class:`FastpoFusedLinearForPPO`."""
    return _verl_tf.FusedLinearForPPO is FastpoFusedLinearForPPO


def install_from_env() -> bool:
    """:func:`install` when ``FASTPO_VERL_FUSED_HEAD`` is 1/true/yes/on (0/false/no/off or unset: leaves verl
    as it is). Returns whether it installed; any other value raises ``ValueError``."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in _TRUE:
        install()
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{ENV_VAR} must be one of 1/true/yes/on or 0/false/no/off, got {os.environ[ENV_VAR]!r}")
