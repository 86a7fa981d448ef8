"""Drop-in fastpo for OpenRLHF 0.11: ``FastpoPolicyLoss`` / ``FastpoValueLoss`` and ``install()``.

The classes subclass the installed ``openrlhf.models.loss.PolicyLoss`` / ``ValueLoss`` (so the constructor,
its arguments and its validation are OpenRLHF's own) and compute ``forward`` with :func:`fastpo.policy_loss`
/ :func:`fastpo.value_loss`, returning what OpenRLHF's returns: ``(loss, clip_ratio, ppo_kl, vllm_kl,
is_filter_ratio)`` and the value loss. :func:`install` puts them where OpenRLHF's PPO actors and critics
look them up; run it in every Ray worker before the actors are built, through Ray's setup hook::

    import ray
    from openrlhf.cli.train_ppo_ray import train   # calls ray.init only when Ray is not initialised
    ray.init(runtime_env={"worker_process_setup_hook": "fastpo.integrations.openrlhf.install"})
    train(args)

(or ``ray job submit --runtime-env-json '{"worker_process_setup_hook": "fastpo.integrations.openrlhf.install"}'``).

Mapping: ppo -> token ratio (Δ clamped to ±20, as OpenRLHF); gspo -> fastpo's sequence ratio (old :=
``rollout_log_probs`` when IS correction is on); ``dual_clip`` -> ``dual_clip``; ``token_level_loss`` ->
``token_mean`` (``num_tokens=batch_num_tokens``) or ``seq_mean_token_mean`` (rescaled by the non-empty count /
``global_batch_size``), times ``dp_size``; the IS correction coefficient (every level / mode / gating) is
OpenRLHF's detached per-token weight, passed as ``is_weights``. Handed back to OpenRLHF's own forward:
``action_mask=None``, gspo with advantages that vary within a sequence (OpenRLHF's gradient then flows
through the sequence mean, fastpo's sequence ratio is the token-gradient form), and options fastpo
cannot express (e.g. ``clip_eps_low >= 1``). Divergence: gspo's per-token log-ratios are clamped to ±20
before the sequence mean (OpenRLHF does not clamp). Counts are in :data:`STATS`.

``install()`` also makes ``Actor.forward`` compute its log-probs and entropy with
``fastpo.linear_token_logprobs`` (no ``[B, S, V]`` logits; see :mod:`fastpo.integrations.openrlhf_actor`).
"""

from __future__ import annotations

import collections
import importlib
import logging
import sys
import warnings

import torch

import fastpo

from openrlhf.models.loss import PolicyLoss as _PolicyLoss  # the installed classes (ImportError: no OpenRLHF)
from openrlhf.models.loss import ValueLoss as _ValueLoss

__all__ = ["FastpoPolicyLoss", "FastpoValueLoss", "install", "openrlhf_supported", "TESTED_OPENRLHF", "STATS"]

logger = logging.getLogger("fastpo.integrations.openrlhf")
TESTED_OPENRLHF = ((0, 11), (0, 12))  # [low, high)
STATS: collections.Counter = collections.Counter()
_LOGGED: set = set()
_TARGETS = (("openrlhf.trainer.ray.ppo_actor", "PolicyLoss"), ("openrlhf.trainer.ray.ppo_critic", "ValueLoss"))


def _installed_version() -> str:
    from importlib.metadata import version

    return version("openrlhf")


def openrlhf_supported(version: str | None = None) -> bool:
    """True when ``version`` (default: the installed openrlhf's) lies in :data:`TESTED_OPENRLHF` and the
    installed ``PolicyLoss`` has 0.11's IS-correction constructor (5-tuple forward)."""
    import inspect

    text = _installed_version() if version is None else version
    parts = tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in text.split(".")[:2])
    params = inspect.signature(_PolicyLoss.__init__).parameters
    return TESTED_OPENRLHF[0] <= parts < TESTED_OPENRLHF[1] and "is_correction_level" in params


def _delegate(what: str, reason: str) -> None:
    STATS[f"delegated:{what}"] += 1
    if (what, reason) not in _LOGGED:
        _LOGGED.add((what, reason))
        logger.warning("fastpo: %s handed back to OpenRLHF (%s)", what, reason)


def _masked_mean(x, mask, dim=None):
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim)  # OpenRLHF's masked_mean (NaN on an empty mask)


def _aggregate(loss, mask, token_level: bool, dp_size, batch_num_tokens, global_batch_size):
    """OpenRLHF's aggregate_loss on a fastpo loss aggregated by (token_mean, num_tokens) / seq_mean_token_mean."""
    if token_level:
        return loss if batch_num_tokens is None else loss * dp_size
    if global_batch_size is None:
        return loss
    return loss * (mask.sum(-1) > 0).sum() / global_batch_size * dp_size


class FastpoPolicyLoss(_PolicyLoss):
    """OpenRLHF's ``PolicyLoss`` (same constructor and forward) computed by :func:`fastpo.policy_loss`."""

    def _config(self):
        return fastpo.PolicyLossConfig(
            clip_low=self.clip_eps_low, clip_high=self.clip_eps_high, dual_clip=self.dual_clip,
            ratio_level="sequence" if self.policy_loss_type == "gspo" else "token", kl_coef=0.0,
            aggregation="token_mean" if self.token_level_loss else "seq_mean_token_mean")

    def _reason(self, advantages, action_mask):
        if not openrlhf_supported():
            return f"untested openrlhf {_installed_version()}"
        if self.policy_loss_type not in ("ppo", "gspo"):
            return f"policy_loss_type={self.policy_loss_type!r}"
        if action_mask is None:
            return "action_mask=None"
        if self.policy_loss_type == "gspo":
            m = action_mask.bool()
            hi = advantages.masked_fill(~m, float("-inf")).amax(-1)
            lo = advantages.masked_fill(~m, float("inf")).amin(-1)
            if bool(((hi > lo) & m.any(-1)).any()):
                return "gspo with advantages that vary within a sequence"
        try:
            self._config()
        except (ValueError, TypeError) as exc:
            return f"no fastpo config: {exc}"
        return None

    def _is_coef(self, old_log_probs, rollout_log_probs, action_mask):
        """OpenRLHF 0.11's detached IS-correction coefficient and its filter ratio (``forward``'s block)."""
        low, high = self.is_correction_threshold
        seq_level = self.is_correction_level == "seq"
        is_log_ratio = (old_log_probs - rollout_log_probs).detach()
        token_is = is_log_ratio.exp()
        if self.is_correction_gating == "ratio":
            stat = _masked_mean(is_log_ratio, action_mask, dim=-1).unsqueeze(-1) if seq_level else is_log_ratio
            stat = stat.exp()
        else:
            p = rollout_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
            q = old_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:  # tv
                stat = (p - q).abs()
            if seq_level:
                stat = _masked_mean(stat, action_mask, dim=-1).unsqueeze(-1)
        if self.is_correction_mode == "clip":
            coef, filtered = stat.clamp(min=low, max=high), (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            coef, filtered = torch.where(keep, token_is, 0.0), ~keep
        ratio = filtered.float().mean() if seq_level else _masked_mean(filtered.float(), action_mask)
        return coef.expand_as(old_log_probs).contiguous(), ratio

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
                batch_num_tokens=None, global_batch_size=None):
        reason = self._reason(advantages, action_mask)
        if reason is not None:
            _delegate("PolicyLoss", reason)
            return super().forward(log_probs, old_log_probs, advantages, action_mask, rollout_log_probs, dp_size,
                                   batch_num_tokens, global_batch_size)
        gspo = self.policy_loss_type == "gspo"
        is_on = self.is_correction_level != "off"
        ratio_old = rollout_log_probs if gspo and is_on else old_log_probs
        coef = vllm_kl = is_filter_ratio = None
        if is_on and not gspo:
            coef, is_filter_ratio = self._is_coef(old_log_probs, rollout_log_probs, action_mask)
            vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, action_mask)
        num_tokens = None
        if self.token_level_loss and batch_num_tokens is not None:
            num_tokens = torch.as_tensor(batch_num_tokens, dtype=torch.float32, device=log_probs.device)
        out = fastpo.policy_loss(log_probs, ratio_old.detach(), advantages.detach(), action_mask.bool(),
                                 is_weights=coef, num_tokens=num_tokens, config=self._config())
        loss = _aggregate(out.loss, action_mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        STATS["served:PolicyLoss"] += 1
        with torch.no_grad():
            clip_ratio, ppo_kl = self._metrics(log_probs.detach(), old_log_probs, ratio_old, advantages, action_mask)
        return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio

    def _metrics(self, log_probs, old_log_probs, ratio_old, advantages, action_mask):
        """OpenRLHF's clip_ratio (surr2 < surr1, unweighted advantages) and ppo_kl (unclamped)."""
        raw = log_probs - old_log_probs
        if self.policy_loss_type == "gspo":
            lr = log_probs - ratio_old
            ratio = ((lr * action_mask).sum(-1) / action_mask.sum(-1).clamp(min=1)).exp().unsqueeze(-1) * action_mask
        else:
            ratio = raw.clamp(-20.0, 20.0).exp()
        surr1 = ratio * advantages
        surr2 = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * advantages
        return _masked_mean(torch.lt(surr2, surr1).float(), action_mask), _masked_mean(-raw, action_mask)


class FastpoValueLoss(_ValueLoss):
    """OpenRLHF's ``ValueLoss`` (same constructor and forward) computed by :func:`fastpo.value_loss`."""

    def forward(self, values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
                global_batch_size=None):
        reason = None if openrlhf_supported() else f"untested openrlhf {_installed_version()}"
        if reason is None and action_mask is None:
            reason = "action_mask=None"
        if reason is not None:
            _delegate("ValueLoss", reason)
            return super().forward(values, old_values, returns, action_mask, dp_size, batch_num_tokens,
                                   global_batch_size)
        if self.token_level_loss:
            aggregation = "token_mean" if batch_num_tokens is None else "token_sum"
        else:
            aggregation = "seq_mean_token_mean"
        loss = fastpo.value_loss(values, old_values.detach(), returns.detach(), action_mask.bool(),
                                 clip=self.clip_eps, aggregation=aggregation).loss
        if self.token_level_loss and batch_num_tokens is not None:
            loss = loss / batch_num_tokens * dp_size
        else:
            loss = _aggregate(loss, action_mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        STATS["served:ValueLoss"] += 1
        return loss


def install(actor_forward: bool = True) -> bool:
    """Make OpenRLHF's PPO actors and critics build fastpo's losses (``openrlhf.models.PolicyLoss`` /
    ``ValueLoss``, and the names already imported by ``openrlhf.trainer.ray.ppo_actor`` / ``ppo_critic``) and,
    with ``actor_forward``, compute ``Actor.forward``'s log-probs with fastpo
    (:mod:`fastpo.integrations.openrlhf_actor`; skipped, logged, where OpenRLHF's actor does not import).
    For Ray: ``runtime_env={"worker_process_setup_hook": "fastpo.integrations.openrlhf.install"}``.
    Outside the tested OpenRLHF range it warns and changes nothing (returns False)."""
    if not openrlhf_supported():
        warnings.warn(f"fastpo.integrations.openrlhf was tested with openrlhf 0.11.x; {_installed_version()} is "
                      f"installed: OpenRLHF's own losses stay in place", stacklevel=2)
        return False
    models = importlib.import_module("openrlhf.models")
    models.PolicyLoss, models.ValueLoss = FastpoPolicyLoss, FastpoValueLoss
    for module_name, attr in _TARGETS:
        module = sys.modules.get(module_name)
        if module is None:
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:  # imported later, it picks the classes up from openrlhf.models
                logger.info("fastpo: %s not importable yet (%s)", module_name, exc)
                continue
        setattr(module, attr, FastpoPolicyLoss if attr == "PolicyLoss" else FastpoValueLoss)
    if actor_forward:
        try:
            from fastpo.integrations.openrlhf_actor import install_actor
        except ImportError as exc:  # openrlhf.models.actor needs flash-attn, deepspeed and peft
            logger.warning("fastpo: OpenRLHF's Actor.forward left as it is (%s)", exc)
        else:
            install_actor()
    return True
