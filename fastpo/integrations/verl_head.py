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

With ``impl_backend=triton`` verl patches ``forward_with_triton_backend`` instead, which imports
``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` at call time and calls it as
``linear_cross_entropy(hidden_states, lm_head.weight, rolled_labels, temperature, "none")``: verl's Triton
kernel (CUDA only; it asserts CUDA tensors and a hidden size divisible by 128). :func:`install` replaces that
module attribute too, by :func:`fastpo_linear_cross_entropy`: the same log-probs and entropies, flattened to
``[N]`` float32 as verl's kernel returns them (``reduction`` "sum"/"mean" reduce the log-probs over the N
tokens as verl does; the entropies stay ``[N]``), on CPU and CUDA. A ``dist_process_group`` (verl's
Megatron vocab-parallel head, ``verl/models/mcore``, which binds the function at import) goes to verl's.

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
from verl.utils.kernel import linear_cross_entropy as _verl_lce  # noqa: E402  (and this one's function)

__all__ = ["FastpoFusedLinearForPPO", "fastpo_linear_cross_entropy", "install", "uninstall", "installed", "install_from_env", "ENV_VAR", "STATS"]

logger = logging.getLogger("fastpo.integrations.verl")

ENV_VAR = "FASTPO_VERL_FUSED_HEAD"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
# Counts of the head calls fastpo served ("served:fused_linear") and handed back ("delegated:<reason>").
STATS: collections.Counter = collections.Counter()
_LOGGED: set = set()
_ORIGINAL = _verl_tf.FusedLinearForPPO  # verl's class, whatever install() later puts in its place
_ORIGINAL_LCE = _verl_lce.linear_cross_entropy  # verl's Triton entry point (impl_backend=triton)
_REDUCTIONS = ("none", "sum", "mean")


def _delegate_reason(hidden_states, vocab_weights, temperature) -> Optional[str]:
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        return f"temperature of type {type(temperature).__name__} (fastpo takes a Python real)"
    if is_dtensor(hidden_states) or is_dtensor(vocab_weights):
        return "DTensor hidden states or head weight"
    return None


def _record_delegation(reason: str) -> None:
    STATS[f"delegated:{reason}"] += 1
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        logger.warning("fastpo: verl's own head serves this call: %s", reason)


class FastpoFusedLinearForPPO(_ORIGINAL):
    """verl's ``FusedLinearForPPO`` (same constructor) with the forward served by fastpo."""

    def forward(self, hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                temperature: float = 1.0):
        reason = _delegate_reason(hidden_states, vocab_weights, temperature)
        if reason is not None:
            _record_delegation(reason)
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


def fastpo_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                temperature: float = 1.0, reduction: str = "none", dist_process_group=None):
    """verl's ``linear_cross_entropy`` (impl_backend=triton) served by fastpo: ``(log_probs, entropy)`` of
    z = h·Wᵀ/τ for hidden ``[..., D]`` and labels ``[...]``, both float32 ``[N]`` (N = labels.numel());
    ``reduction`` "sum" / "mean" returns the sum / mean of the N log-probs instead, as verl's kernel."""
    reason = _delegate_reason(hidden, weight, temperature)
    if reason is None and dist_process_group is not None:
        reason = "a dist_process_group (Megatron vocab-parallel head)"
    if reason is None and reduction not in _REDUCTIONS:
        reason = f"reduction {reduction!r}"
    if reason is not None:
        _record_delegation(reason)
        return _ORIGINAL_LCE(hidden, weight, labels, temperature, reduction, dist_process_group)
    if not isinstance(labels, torch.Tensor) or not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise TypeError(f"hidden and labels must be tensors, got {type(hidden).__name__} and "
                        f"{type(labels).__name__}")
    if labels.numel() * hidden.size(-1) != hidden.numel():
        raise ValueError(f"labels {tuple(labels.shape)} must hold one label per row of hidden "
                         f"{tuple(hidden.shape)}")
    log_probs, entropy = head_logprobs(hidden.reshape(-1, hidden.size(-1)), weight,
                                       labels.reshape(-1).to(torch.int64), temperature=temperature,
                                       return_entropy=True)
    STATS["served:linear_cross_entropy"] += 1
    if reduction == "sum":
        log_probs = log_probs.sum()
    elif reduction == "mean":
        log_probs = log_probs.mean()
    return log_probs, entropy.float()


def install() -> None:
    """Makes ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` fastpo's (impl_backend torch /
    liger) and ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` fastpo's (impl_backend
    triton); idempotent."""
    _verl_tf.FusedLinearForPPO = FastpoFusedLinearForPPO
    _verl_lce.linear_cross_entropy = fastpo_linear_cross_entropy


def uninstall() -> None:
    """Puts verl's own ``FusedLinearForPPO`` and ``linear_cross_entropy`` back."""
    _verl_tf.FusedLinearForPPO = _ORIGINAL
    _verl_lce.linear_cross_entropy = _ORIGINAL_LCE


def installed() -> bool:
    """Whether verl's patched forwards (every backend) currently get fastpo's head."""
    return (_verl_tf.FusedLinearForPPO is FastpoFusedLinearForPPO
            and _verl_lce.linear_cross_entropy is fastpo_linear_cross_entropy)


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
