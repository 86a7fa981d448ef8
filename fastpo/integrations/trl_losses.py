"""TRL 1.15/1.16 ``GRPOTrainer._compute_loss`` / ``RLOOTrainer._compute_loss`` computed by
:func:`fastpo.policy_loss` (used by the mixins of :mod:`fastpo.integrations.trl`).

``grpo_delegation(t, inputs)`` / ``rloo_delegation(t, inputs)`` say why a batch must run TRL's own code
(None: fastpo serves it exactly); ``grpo_loss`` / ``rloo_loss`` then return what TRL's method returns and
append the same metrics, with the same names and cross-process reductions, to ``t._metrics``.

The GRPO mapping (TRL's ``_compute_loss``, with Δ = logp − old, r = exp(Δ) or the sequence ratio):

* loss_type -> surrogate / aggregation: grpo, bnpo, dr_grpo, dapo, luspo -> "clip" with TRL's ``delta``
  (fastpo's ``delta``: the unclipped ratio capped); cispo -> "cispo_upper" with clip_high = ε_high − 1
  (TRL's ε_high is the raw cap of sg(min(r, ε_high))); sapo -> "sapo" with TRL's gate temperatures; vespo ->
  "vespo" with TRL's gamma parameters. grpo / luspo / sapo average over all B rows, empty ones included
  (``count_empty_sequences``), dr_grpo divides by B·max_completion_length, dapo / cispo / vespo by TRL's
  ``num_items_in_batch`` normaliser (passed as ``num_tokens``); the others are divided by the gradient
  accumulation steps afterwards, as TRL.
* beta: k3 to ``ref_per_token_logps``, unclamped, times the ratio with ``use_bias_correction_kl``
  (``kl_bias_correction``).
* The entropy bonus (static or adaptive) is TRL's term and controller, on fastpo's differentiable entropies.
* The entropy mask, the off-policy mask and the vLLM importance-sampling ratio multiply the policy term
  only: fastpo's ``is_weights``. Under a sequence ratio the gradient of TRL's loss flows through the
  sequence mean, which equals fastpo's token-gradient form only when the weights and advantages are constant
  per sequence and there is no KL·r term: the other sequence-level cases are delegated.
"""

from __future__ import annotations

import torch

import fastpo
from fastpo.integrations.trl_head import STATS

__all__ = ["grpo_delegation", "grpo_loss", "rloo_delegation", "rloo_loss", "grpo_config"]

_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_TYPES = {  # TRL loss_type -> (surrogate, aggregation, count_empty_sequences)
    "grpo": ("clip", "seq_mean_token_mean", True), "bnpo": ("clip", "token_mean", False),
    "dr_grpo": ("clip", "token_sum_norm", False), "dapo": ("clip", "token_mean", False),
    "luspo": ("clip", "seq_mean_token_sum", True), "cispo": ("cispo_upper", "token_mean", False),
    "sapo": ("sapo", "seq_mean_token_mean", True), "vespo": ("vespo", "token_mean", False),
}
_GLOBAL_NORMALISER = ("dapo", "cispo", "vespo")  # TRL divides by num_items_in_batch, no extra GA division


def _vllm_ratio_on(t) -> bool:
    return bool(t.use_vllm and t.vllm_importance_sampling_correction)


def grpo_config(t) -> fastpo.PolicyLossConfig:
    """The :class:`fastpo.PolicyLossConfig` of a GRPOTrainer's settings (ValueError when there is none)."""
    surrogate, aggregation, count_empty = _TYPES[t.loss_type]
    args = t.args
    kw = dict(clip_low=t.epsilon_low, clip_high=t.epsilon_high, ratio_level=t.importance_sampling_level,
              kl_coef=float(t.beta), kl_estimator="k3", kl_clamp=None,
              kl_bias_correction=bool(t.beta != 0.0 and args.use_bias_correction_kl), surrogate=surrogate,
              aggregation=aggregation, count_empty_sequences=count_empty)
    if aggregation == "token_sum_norm":
        kw["norm_length"] = int(t.max_completion_length)
    if surrogate == "clip":
        kw["delta"] = args.delta
    elif surrogate == "cispo_upper":
        kw["clip_high"] = t.epsilon_high - 1.0
    elif surrogate == "sapo":
        kw.update(sapo_tau_pos=args.sapo_temperature_pos, sapo_tau_neg=args.sapo_temperature_neg)
    elif surrogate == "vespo":
        kw.update(vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos,
                  vespo_k_neg=args.vespo_k_neg, vespo_lambda_neg=args.vespo_lambda_neg)
    return fastpo.PolicyLossConfig(**kw)


def grpo_delegation(t, inputs) -> str | None:
    """Why TRL must compute this batch's GRPO loss itself; None when fastpo computes it exactly."""
    if t.loss_type not in _TYPES:
        return f"loss_type={t.loss_type!r}"
    if t.loss_type == "vespo" and _vllm_ratio_on(t):
        return "vespo with the vLLM importance-sampling ratio (TRL folds it into the gamma weight)"
    if t.importance_sampling_level == "sequence":
        ratio = inputs.get("importance_sampling_ratio") if _vllm_ratio_on(t) else None
        if inputs["advantages"].dim() == 2:
            return "per-token advantages under importance_sampling_level='sequence'"
        if t.top_entropy_quantile < 1.0:
            return "entropy mask under importance_sampling_level='sequence'"
        if ratio is not None and ratio.dim() == 2 and ratio.size(-1) > 1:
            return "per-token vLLM ratio under importance_sampling_level='sequence'"
        if t.beta != 0.0 and t.args.use_bias_correction_kl:
            return "use_bias_correction_kl under importance_sampling_level='sequence'"
    try:
        grpo_config(t)
    except (ValueError, TypeError) as exc:
        return f"no fastpo config: {exc}"
    return None


def grpo_loss(t, model, inputs):
    """TRL's ``GRPOTrainer._compute_loss(model, inputs)`` (for a batch ``grpo_delegation`` accepts)."""
    cfg = grpo_config(t)
    logps, entropies, aux_loss = t._fastpo_per_token(model, inputs)
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    adv = inputs["advantages"]
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    old = inputs.get("old_per_token_logps")
    old = logps.detach() if old is None else old

    weight = None
    entropy_mask = None
    if t.top_entropy_quantile < 1.0:
        entropy_mask = t.get_high_entropy_mask(entropies, mask, 1 - t.top_entropy_quantile)
        weight = entropy_mask.float()
    if t.off_policy_mask_threshold is not None:
        off = t.get_off_policy_mask(advantages=adv, per_token_logps=logps,
                                    sampling_per_token_logps=inputs.get("sampling_per_token_logps", old),
                                    mask=mask, off_policy_threshold=t.off_policy_mask_threshold).float()
        weight = off if weight is None else weight * off
    if _vllm_ratio_on(t):
        ratio = inputs["importance_sampling_ratio"].float()
        weight = ratio if weight is None else weight * ratio
    if weight is not None:
        weight = weight.expand_as(logps).contiguous()

    mode = "train" if t.model.training else "eval"
    ga = t.current_gradient_accumulation_steps if mode == "train" else 1.0
    num_tokens = None
    if t.loss_type in _GLOBAL_NORMALISER:
        num_tokens = inputs["num_items_in_batch"].clamp(min=1.0) / t.accelerator.num_processes
        if mode == "train":
            num_tokens = num_tokens * ga / t.args.steps_per_generation
    out = fastpo.policy_loss(logps, old, adv.expand_as(logps).contiguous(), mask != 0,
                             ref_logp=inputs["ref_per_token_logps"] if t.beta != 0.0 else None,
                             is_weights=weight, num_tokens=num_tokens, config=cfg)
    loss = out.loss if t.loss_type in _GLOBAL_NORMALISER else out.loss / ga
    if t._entropy_bonus_enabled:
        loss = loss - _entropy_bonus(t, mode, ga, out.loss.detach(), entropies, mask, entropy_mask)
    if t.aux_loss_enabled:  # scaled for gradient accumulation like the policy term, as TRL
        loss = loss + t.router_aux_loss_coef * aux_loss / ga
        t._metrics[mode]["aux_loss"].append(t.accelerator.gather_for_metrics(aux_loss).mean().item())
    STATS["served:grpo_loss"] += 1
    _grpo_metrics(t, mode, inputs, logps.detach(), old, adv, mask, entropies, out.metrics)
    return loss


def _entropy_bonus(t, mode, ga, policy_loss, entropies, mask, entropy_mask):
    """TRL's entropy bonus, coef·(token mean of H over the effective mask)/GA whatever the loss type, and its
    adaptive controller (state on the trainer: entropy_coef, _last_world_entropy, _entropy_window_stats); the
    entropies are fastpo's (differentiable)."""
    effective = mask if entropy_mask is None else mask * entropy_mask
    entropy_loss = (entropies * effective).sum() / effective.sum().clamp(min=1.0) / ga
    args = t.args
    if t.use_adaptive_entropy:
        coef = t.entropy_coef if t._last_world_entropy <= args.entropy_target else 0.0
    else:
        coef = t.entropy_coef
    metrics = t._metrics[mode]
    metrics["policy_loss"].append(t.accelerator.gather(policy_loss).nanmean().item())
    if t.use_adaptive_entropy and mode == "train":
        stats = torch.stack([(entropies * effective).sum(), effective.sum()]).detach()
        t._entropy_window_stats = stats if t._entropy_window_stats is None else t._entropy_window_stats + stats
        if t.accelerator.sync_gradients:
            window = t.accelerator.reduce(t._entropy_window_stats, reduction="sum")
            world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
            if world_entropy <= args.entropy_target:
                t.entropy_coef = min(t.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
            else:
                t.entropy_coef = max(t.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
            t._last_world_entropy = world_entropy
            t._entropy_window_stats = None
    if mode == "train" and t.accelerator.sync_gradients:
        metrics["entropy_coef"].append(t.entropy_coef)
    return coef * entropy_loss


def _op_token_fractions(t) -> bool:
    """Whether TRL's token-mean clip metrics are fastpo.policy_loss's clip_frac_low / _high / clip_frac: a
    token ratio (TRL's are per sequence under a sequence ratio) and, with ``delta``, a cap above 1 + ε_high
    (TRL reads the capped ratio, min(r, δ) > 1 + ε_high ⇔ r > 1 + ε_high then)."""
    if t.importance_sampling_level != "token" or t.loss_type == "luspo":
        return False
    return t.loss_type == "cispo" or t.args.delta is None or t.args.delta > 1 + t.epsilon_high


def _global_token_means(t, op_metrics, names, mask):
    """The op's local token means (over the counted tokens of ``mask``) made global as TRL's
    ``_fastpo_global_masked_mean`` does: Σ_ranks mean·n / Σ_ranks n, in one reduce."""
    n = (mask != 0).sum().to(torch.float64)
    local = torch.stack([op_metrics[k].to(torch.float64) * n for k in names] + [n])
    totals = t.accelerator.reduce(local, reduction="sum")
    return (totals[:-1] / totals[-1].clamp(min=1.0)).tolist()


@torch.no_grad()
def _grpo_metrics(t, mode, inputs, logps, old, adv, mask, entropies, op_metrics=None):
    """TRL's metric block of ``GRPOTrainer._compute_loss``, from detached tensors. The token-mean clip
    fractions (clip_ratio/low_mean, high_mean, region_mean; cispo_clip_ratio) are the op's metrics
    (``op_metrics``) where they have TRL's definition (:func:`_op_token_fractions`); the per-sequence
    extremes (clip_ratio/low_min, high_max) need per-sequence fractions, which the op does not return."""
    from trl.trainer.utils import nanmax, nanmin

    metrics = t._metrics[mode]
    from_op = op_metrics is not None and _op_token_fractions(t)
    log_ratio = logps - old
    if t.importance_sampling_level == "token":
        coef_1 = torch.exp(log_ratio)
    else:
        coef_1 = torch.exp(((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1))

    def gmm(x):
        return t._fastpo_global_masked_mean(x, mask)

    def masked_seq_mean(x):
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    if t.beta != 0.0:
        d = inputs["ref_per_token_logps"] - logps
        kl = torch.exp(d) - d - 1
        metrics["kl"].append(gmm(kl * coef_1 if t.args.use_bias_correction_kl else kl))
    metrics["entropy"].append(gmm(entropies))
    if t.loss_type in _CLIPPED:
        if t.args.delta is not None:
            coef_1 = torch.clamp(coef_1, max=t.args.delta)  # TRL's clip metrics read the delta-capped ratio
        low = ((coef_1 < 1 - t.epsilon_low) & (adv < 0)).float()
        high = ((coef_1 > 1 + t.epsilon_high) & (adv > 0)).float()
        if from_op:  # low and high are disjoint (A < 0 vs A > 0): the region is clip_frac = low + high
            means = _global_token_means(t, op_metrics, ("clip_frac_low", "clip_frac_high", "clip_frac"), mask)
        else:
            means = [gmm(low), gmm(high), gmm(torch.maximum(low, high))]
        for key, value in zip(("low_mean", "high_mean", "region_mean"), means):
            metrics[f"clip_ratio/{key}"].append(value)
        metrics["clip_ratio/low_min"].append(nanmin(t.accelerator.gather(masked_seq_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(t.accelerator.gather(masked_seq_mean(high))).item())
    elif t.loss_type == "cispo":
        if from_op:  # fastpo's cispo_upper has clip_high = ε_high − 1: clip_frac_high is A > 0 and r > ε_high
            metrics["cispo_clip_ratio"].append(_global_token_means(t, op_metrics, ("clip_frac_high",), mask)[0])
        else:
            metrics["cispo_clip_ratio"].append(gmm(((coef_1 > t.epsilon_high) & (adv > 0)).float()))
    elif t.loss_type == "vespo":
        args = t.args
        phi = t.get_gamma_weights(advantages=adv, log_ratio_per_token=log_ratio, mask=mask,
                                  importance_sampling_ratio=inputs.get("importance_sampling_ratio"),
                                  k_pos=args.vespo_k_pos, lambda_pos=args.vespo_lambda_pos, k_neg=args.vespo_k_neg,
                                  lambda_neg=args.vespo_lambda_neg)
        metrics["vespo/phi_seq_mean"].append(gmm(phi))


def rloo_delegation(t, inputs) -> str | None:
    """Why TRL must compute this batch's RLOO loss itself; None when fastpo computes it exactly."""
    try:
        fastpo.PolicyLossConfig(clip_low=t.epsilon_low, clip_high=t.epsilon_high, kl_coef=0.0)
    except (ValueError, TypeError) as exc:
        return f"no fastpo config: {exc}"
    return None


def rloo_loss(t, model, inputs):
    """TRL's ``RLOOTrainer._compute_loss``: the sequence log-prob ratio exp(Σ_t logp − old_logps), clipped per
    sequence, mean over the batch, as a one-token-per-sequence ``fastpo.policy_loss``."""
    logps, entropies, aux_loss = t._fastpo_per_token(model, inputs)
    mask = inputs["completion_mask"]
    seq = fastpo.sequence_logprobs(logps, mask)
    old, adv = inputs["old_logps"], inputs["advantages"]
    cfg = fastpo.PolicyLossConfig(clip_low=t.epsilon_low, clip_high=t.epsilon_high, kl_coef=0.0,
                                  aggregation="token_mean")
    loss = fastpo.policy_loss(seq[:, None], old[:, None].to(seq.dtype), adv[:, None].to(seq.dtype), config=cfg).loss
    STATS["served:rloo_loss"] += 1

    from trl.trainer.utils import nanmax, nanmin

    mode = "train" if t.model.training else "eval"
    metrics = t._metrics[mode]
    if t.aux_loss_enabled:  # unscaled: the HF Trainer divides RLOO's loss by the accumulation steps
        loss = loss + t.router_aux_loss_coef * aux_loss
        metrics["aux_loss"].append(t.accelerator.gather_for_metrics(aux_loss).mean().item())
    with torch.no_grad():
        stats = t.accelerator.reduce(torch.stack([(entropies * mask).sum(), mask.sum().float()]), reduction="sum")
        metrics["entropy"].append((stats[0] / stats[1].clamp(min=1.0)).item())
        coef_1 = torch.exp(seq.detach() - old)
        low = ((coef_1 < 1 - t.epsilon_low) & (adv < 0)).float()
        high = ((coef_1 > 1 + t.epsilon_high) & (adv > 0)).float()
        low_g, high_g = t.accelerator.gather(low), t.accelerator.gather(high)
        metrics["clip_ratio/low_mean"].append(low_g.nanmean().item())
        metrics["clip_ratio/low_min"].append(nanmin(low_g).item())
        metrics["clip_ratio/high_mean"].append(high_g.nanmean().item())
        metrics["clip_ratio/high_max"].append(nanmax(high_g).item())
        metrics["clip_ratio/region_mean"].append(t.accelerator.gather(torch.maximum(low, high)).nanmean().item())
    return loss
