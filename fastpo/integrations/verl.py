"""verl 0.9 policy losses computed by ``fastpo.policy_loss``: ``fastpo_<name>`` for every verl built-in.

Use it from a verl run with ``actor_rollout_ref.model.external_lib=fastpo.integrations.verl`` and
``actor_rollout_ref.actor.policy_loss.loss_mode=fastpo_<name>``; importing this module registers
``fastpo_vanilla``, ``fastpo_dppo_tv``, ``fastpo_dppo_kl``, ``fastpo_gspo``, ``fastpo_sapo``,
``fastpo_gpg``, ``fastpo_clip_cov``, ``fastpo_kl_cov``, ``fastpo_geo_mean``, ``fastpo_dro``, ``fastpo_cispo``
and ``fastpo_bypass_mode`` through
``verl.trainer.ppo.core_algos.register_policy_loss`` (and, when ``fastpo.integrations.verl_advantages``
exists, its advantage estimators). It needs verl's ``core_algos`` only: no GPU, Ray workers or trainer.
With ``FASTPO_VERL_FUSED_HEAD=1`` in the workers' environment the import also swaps verl's fused log-prob +
entropy head (``use_fused_kernels``, every ``fused_kernel_options.impl_backend``: torch, liger, triton) for
``fastpo.linear_token_logprobs`` (``install_fused_head()``, see ``fastpo.integrations.verl_head``).

Each function has verl's signature ``(old_log_prob, log_prob, advantages, response_mask,
loss_agg_mode="token-mean", config=None, rollout_is_weights=None) -> (loss, metrics)``, reads the same
``ActorConfig`` fields, honours ``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``,
``global_batch_size``, ``loss_scale_factor``) as verl's ``agg_loss`` does, overrides the aggregation
where verl's does (sapo: seq-mean-token-mean; geo_mean: the mean over the micro-batch's rows) and
returns the same metric keys as Python floats. The loss and its gradient come from one fused
``fastpo.policy_loss`` call; ``rollout_is_weights`` go in as its ``is_weights``.

``clip_cov`` and ``kl_cov`` select their tokens inside ``fastpo.policy_loss`` (``clip_cov_ratio`` /
``kl_cov_ratio``: one pass over the micro-batch, as verl; ``clip_cov``'s random pick draws from torch's
global generator, as verl). ``bypass_mode``'s weights and rejection sampling come from
``fastpo.ops.rollout_correction`` and its ``rollout_corr/*`` diagnostics (the same keys and values as verl's
``compute_rollout_correction_and_rejection_mask``) from ``fastpo.ops.rollout_metrics``; verl's helper is not
called. Batch-normalised weights are normalised over the default process group when torch.distributed is
initialised, as verl.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from typing import Callable, Dict, Optional, Tuple

import torch

import fastpo
from fastpo.ops.rollout_correction import rejection_mask, rollout_is_weights
from fastpo.ops.rollout_metrics import parse_is_threshold, verl_rollout_corr_metrics
from fastpo.policy_config import PolicyLossConfig

from verl.trainer.ppo import core_algos  # noqa: E402  (this module exists to plug into verl)
from fastpo.integrations.verl_head import install as install_fused_head, install_from_env  # noqa: E402
from fastpo.integrations.verl_head import uninstall as uninstall_fused_head  # noqa: E402,F401

__all__ = ["LOSSES", "register", "fastpo_config", "SAFETY_BOUND", "install_fused_head", "uninstall_fused_head"]

SAFETY_BOUND = 20.0  # verl's rollout_corr_helper clamp of IS log-ratios
_AGG = {"token-mean": "token_mean", "token-sum": "token_sum", "seq-mean-token-mean": "seq_mean_token_mean",
        "seq-mean-token-sum": "seq_mean_token_sum", "seq-mean-token-sum-norm": "seq_mean_token_sum"}


def _clip_bounds(config) -> Tuple[float, float]:
    lo = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    hi = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return float(lo), float(hi)


def _knobs(name: str, config):
    """The ActorConfig numbers that verl's ``name`` loss reads beyond the clip bounds."""
    if name == "vanilla":
        return config.get("clip_ratio_c", 3.0)
    if name in ("dppo_tv", "dppo_kl"):
        return config.get("clip_ratio_c", 20.0)
    if name == "sapo":
        return config.tau_pos, config.tau_neg
    if name == "dro":
        return config.policy_loss.dro_beta
    return None


_CONFIGS: Dict[tuple, PolicyLossConfig] = {}


def fastpo_config(name: str, config, loss_agg_mode: str, count_empty_sequences: bool = False) -> PolicyLossConfig:
    """The ``PolicyLossConfig`` of verl's ``name`` loss under ``config`` (an ActorConfig) and ``loss_agg_mode``;
    cached per the values it reads (a config is frozen; building one costs more than the loss of a small batch)."""
    if loss_agg_mode not in _AGG:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    key = (name, loss_agg_mode, _clip_bounds(config), _knobs(name, config), count_empty_sequences)
    cfg = _CONFIGS.get(key)
    if cfg is None:
        cfg = _build_config(name, key[2], key[3], _AGG[loss_agg_mode])
        if count_empty_sequences and cfg.aggregation.startswith("seq_mean"):
            cfg = dataclasses.replace(cfg, count_empty_sequences=True)
        if len(_CONFIGS) >= 256:
            _CONFIGS.clear()
        _CONFIGS[key] = cfg
    return cfg


def _build_config(name: str, bounds: Tuple[float, float], knobs, agg: str) -> PolicyLossConfig:
    lo, hi = bounds
    base = dict(clip_low=lo, clip_high=hi, kl_coef=0.0, aggregation=agg)
    if name == "vanilla":
        c = knobs
        if not c > 1.0:
            raise ValueError(f"The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0, "
                             f"but get the value: {c}.")
        return PolicyLossConfig(dual_clip=float(c), **base)
    if name in ("dppo_tv", "dppo_kl"):
        return PolicyLossConfig(surrogate=name, dppo_ratio_cap=float(knobs), **base)
    if name == "gspo":
        return PolicyLossConfig(ratio_level="sequence", **base)
    if name == "sapo":  # verl aggregates SAPO with seq-mean-token-mean whatever loss_agg_mode says
        return PolicyLossConfig(surrogate="sapo", sapo_tau_pos=float(knobs[0]), sapo_tau_neg=float(knobs[1]),
                                **dict(base, aggregation="seq_mean_token_mean"))
    if name == "gpg":
        return PolicyLossConfig(surrogate="reinforce", **base)
    if name == "geo_mean":  # verl: torch.mean over the rows of the micro-batch, whatever loss_agg_mode says
        return PolicyLossConfig(surrogate="geo_mean", count_empty_sequences=True,
                                **dict(base, aggregation="seq_mean_token_mean"))
    if name == "dro":
        beta = knobs
        if beta is None or beta <= 0:
            raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
        return PolicyLossConfig(surrogate="dro", dro_beta=float(beta), **base)
    if name == "cispo":
        return PolicyLossConfig(surrogate="cispo", **base)
    raise ValueError(f"no fastpo equivalent of verl's policy loss {name!r}")


def _global_scale(loss, response_mask, loss_agg_mode, info, *, local_only=False):
    """verl's agg_loss normalisers on top of fastpo's local aggregation (see ``_call``)."""
    if local_only:
        return loss
    dp = info.get("dp_size", 1) or 1
    if loss_agg_mode.startswith("seq-mean"):
        gbs = info.get("global_batch_size")
        if gbs is None:
            if dp > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
        else:  # fastpo divided by the B rows of the micro-batch (count_empty_sequences): verl divides by gbs
            loss = loss * (response_mask.shape[0] / gbs)
        if loss_agg_mode == "seq-mean-token-sum-norm":
            factor = info.get("loss_scale_factor")
            loss = loss / (response_mask.shape[-1] if factor is None else factor)
    elif loss_agg_mode == "token-mean" and info.get("batch_num_tokens") is None and dp > 1:
        raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    return loss * dp


_NO_INFO: dict = {}


def _call(cfg: PolicyLossConfig, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
          is_weights=None, *, local_only=False, metrics=None, rollout_logp=None):
    """One fused fastpo.policy_loss over verl's padded [bs, T] micro-batch, scaled as verl's agg_loss;
    ``metrics``: the fastpo metrics the verl keys need (the CPU kernel skips the others); ``rollout_logp``: for a
    ``cfg.rollout_is`` mode (the kernel forms the IS weights)."""
    info = getattr(config, "global_batch_info", None) or _NO_INFO
    num_tokens = None
    if cfg.aggregation == "token_mean" and not local_only:
        num_tokens = info.get("batch_num_tokens")
    if cfg.aggregation.startswith("seq_mean") and not local_only and info.get("global_batch_size") is not None \
            and not cfg.count_empty_sequences:
        cfg = dataclasses.replace(cfg, count_empty_sequences=True)
    # the kernels read a bool or float mask as it is (non-zero = counted): no conversion pass here
    out = fastpo.policy_loss(log_prob, old_log_prob.detach(), advantages.detach(), response_mask,
                             is_weights=None if is_weights is None else is_weights.detach(), num_tokens=num_tokens,
                             rollout_logp=None if rollout_logp is None else rollout_logp.detach(), config=cfg,
                             metrics=metrics)
    return _global_scale(out.loss, response_mask, loss_agg_mode, info, local_only=local_only), _host(out.metrics)


def _host(metrics: dict) -> dict:
    """The op's 0-d metric tensors as Python floats, in one device-to-host transfer."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return dict(metrics)
    values = torch.stack([metrics[k].detach().double().reshape(()) for k in keys]).tolist()
    return {**metrics, **dict(zip(keys, values))}


def _f(metrics, key) -> float:
    return float(metrics[key])


# verl's metric keys per loss, from fastpo's metrics (see fastpo.policy_loss and the surrogates' flags).
def _clip_metrics(m):
    return {"actor/pg_clipfrac": _f(m, "clip_frac"), "actor/ppo_kl": _f(m, "ppo_kl"),
            "actor/pg_clipfrac_lower": _f(m, "dual_clip_frac")}


def _clip_only_metrics(m):
    return {"actor/pg_clipfrac": _f(m, "clip_frac"), "actor/ppo_kl": _f(m, "ppo_kl"), "actor/pg_clipfrac_lower": 0.0}


_METRICS: Dict[str, Callable[[dict], dict]] = {
    "vanilla": _clip_metrics, "dppo_tv": _clip_metrics, "dppo_kl": _clip_metrics,
    "gspo": _clip_only_metrics, "cispo": _clip_only_metrics,
    "sapo": lambda m: {"actor/pg_clipfrac": 0.0, "actor/ppo_kl": _f(m, "ppo_kl"), "actor/pg_clipfrac_lower": 0.0},
    "gpg": lambda m: {},
    "geo_mean": lambda m: {"actor/pg_clipfrac": _f(m, "clip_frac_high"), "actor/ppo_kl": _f(m, "ppo_kl"),
                           "actor/pg_clipfrac_lower": _f(m, "clip_frac_low")},
    "dro": lambda m: {"actor/ppo_kl": _f(m, "ppo_kl")},
}
# The fastpo metrics each loss's verl keys are made of (what _call asks the op for).
_CLIP_KL = ("clip_frac", "ppo_kl")
_METRIC_NAMES: Dict[str, Tuple[str, ...]] = {
    "vanilla": _CLIP_KL + ("dual_clip_frac",), "dppo_tv": _CLIP_KL + ("dual_clip_frac",),
    "dppo_kl": _CLIP_KL + ("dual_clip_frac",), "gspo": _CLIP_KL, "cispo": _CLIP_KL, "sapo": ("ppo_kl",), "gpg": (),
    "geo_mean": ("clip_frac_low", "clip_frac_high", "ppo_kl"), "dro": ("ppo_kl",),
}


def _make_loss(name: str):
    def loss_fn(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                rollout_is_weights: Optional[torch.Tensor] = None):
        assert config is not None
        info = getattr(config, "global_batch_info", None) or _NO_INFO
        cfg = fastpo_config(name, config, loss_agg_mode, info.get("global_batch_size") is not None)
        agg_mode = "seq-mean-token-mean" if name == "sapo" else loss_agg_mode
        loss, metrics = _call(cfg, old_log_prob, log_prob, advantages, response_mask, agg_mode, config,
                              rollout_is_weights, local_only=name == "geo_mean", metrics=_METRIC_NAMES[name])
        return loss, _METRICS[name](metrics)

    loss_fn.__name__ = loss_fn.__qualname__ = f"fastpo_{name}"
    loss_fn.__doc__ = f"verl's ``{name}`` policy loss, computed by one fused fastpo.policy_loss call."
    return loss_fn


def _bypass_weights(log_prob, rollout_log_prob, mask, level, threshold, batch_normalize):
    """verl's rollout IS weights π_current/π_rollout (fastpo.ops.rollout_correction, detached)."""
    if level not in ("token", "sequence"):
        raise ValueError(f"Invalid rollout_is: {level}. Must be one of {{'token', 'sequence'}}.")
    group = None  # verl normalises over the default process group when one is initialised
    if batch_normalize and torch.distributed.is_available() and torch.distributed.is_initialized():
        group = torch.distributed.group.WORLD
    upper, lower = parse_is_threshold(threshold)
    return rollout_is_weights(log_prob, rollout_log_prob, mask, level=level, mode="truncate" if lower is None else "mask",
                              upper=upper, lower=lower, batch_normalize=batch_normalize, group=group)


def fastpo_bypass_mode(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                       response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                       rollout_is_weights: Optional[torch.Tensor] = None):
    """verl's ``bypass_mode`` (old_log_prob is the rollout's): ``loss_type="ppo_clip"`` is fastpo_vanilla
    against the rollout log-probs with no IS weight; ``loss_type="reinforce"`` is −A·logp·w with verl's
    rollout IS weights w (token or sequence level, TIS or IcePop); ``rollout_is_weights`` is ignored, as
    in verl."""
    assert config is not None, "config is required for bypass_mode loss"
    rc = config.policy_loss.get("rollout_correction", None) if hasattr(config, "policy_loss") else None
    if rc is None:
        raise ValueError("rollout_correction config not found in policy_loss. "
                         "When using loss_mode='bypass_mode', ensure rollout_correction config is passed.")
    loss_type = rc.get("loss_type", "ppo_clip")
    level = rc.get("rollout_is", None)
    threshold = rc.get("rollout_is_threshold", 2.0)
    batch_normalize = rc.get("rollout_is_batch_normalize", False)
    rs, rs_threshold = rc.get("rollout_rs", None), rc.get("rollout_rs_threshold", None)
    rollout_metrics = verl_rollout_corr_metrics(  # verl's rollout_corr/* keys and values, computed by fastpo
        log_prob, old_log_prob, response_mask, rollout_is=level, rollout_is_threshold=threshold,
        rollout_is_batch_normalize=batch_normalize, rollout_rs=rs, rollout_rs_threshold=rs_threshold)
    response = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    # verl's rejection sampling: the kept tokens are the loss mask (the weights use the whole response)
    mask = response if rs is None else rejection_mask(log_prob, old_log_prob, response, rs, rs_threshold)
    if loss_type == "reinforce" and _kernel_weights(level, threshold, batch_normalize, rs):
        # TIS at token level: the fused kernel forms min(π/π_rollout, upper) itself (rollout_is="token_truncate"
        # with old = log_prob.detach(), rollout = old_log_prob), so no weights pass before it; verl's ppo_kl is
        # the response's mean(rollout − logp), which rollout_corr/kl already is (the same sum, as verl)
        cfg = PolicyLossConfig(surrogate="reinforce", kl_coef=0.0, aggregation=_AGG[_check_mode(loss_agg_mode)],
                               rollout_is="token_truncate", rollout_is_cap=parse_is_threshold(threshold)[0])
        loss, _ = _call(cfg, log_prob.detach(), log_prob, advantages, mask, loss_agg_mode, config, metrics=(),
                        rollout_logp=old_log_prob)
        pg_metrics = {"actor/ppo_kl": rollout_metrics["rollout_corr/kl"]}
    elif loss_type == "reinforce":
        w = None
        if level is not None and threshold is not None:
            w = _bypass_weights(log_prob, old_log_prob, response, level, threshold, batch_normalize)
        cfg = PolicyLossConfig(surrogate="reinforce", kl_coef=0.0, aggregation=_AGG[_check_mode(loss_agg_mode)])
        loss, metrics = _call(cfg, old_log_prob, log_prob, advantages, mask, loss_agg_mode, config, w,
                              metrics=("ppo_kl",))
        pg_metrics = {"actor/ppo_kl": _f(metrics, "ppo_kl")}
    elif loss_type == "ppo_clip":
        loss, pg_metrics = LOSSES["vanilla"](old_log_prob, log_prob, advantages, mask, loss_agg_mode, config, None)
    else:
        raise ValueError(f"Invalid loss_type: {loss_type}. Must be 'reinforce' or 'ppo_clip'.")
    pg_metrics.update(rollout_metrics)
    return loss, pg_metrics


def _kernel_weights(level, threshold, batch_normalize, rs) -> bool:
    """Whether bypass REINFORCE's IS weights are the fused kernel's token_truncate mode: token level, an upper
    bound only, no batch normalisation, and no rejection (whose kept tokens would then differ from the
    response that ppo_kl averages over)."""
    return level == "token" and threshold is not None and not batch_normalize and rs is None \
        and parse_is_threshold(threshold)[1] is None


def fastpo_clip_cov(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                    rollout_is_weights: Optional[torch.Tensor] = None):
    """verl's ``clip_cov``: the PPO clip (no dual clip) with the gradient of a random few high-covariance
    tokens cut, selected inside fastpo.policy_loss (``PolicyLossConfig.clip_cov_ratio``; torch's global
    generator, as verl)."""
    assert config is not None
    pl = config.policy_loss
    get = lambda v, default: default if v is None else v  # noqa: E731
    lo, hi = _clip_bounds(config)
    ratio = get(pl.clip_cov_ratio, 0.0002)
    assert ratio > 0, "clip_ratio should be larger than 0."
    cfg = PolicyLossConfig(clip_low=lo, clip_high=hi, kl_coef=0.0, aggregation=_AGG[_check_mode(loss_agg_mode)],
                           clip_cov_ratio=float(ratio), clip_cov_lower=float(get(pl.clip_cov_lb, 1.0)),
                           clip_cov_upper=float(get(pl.clip_cov_ub, 5.0)))
    loss, metrics = _call(cfg, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                          rollout_is_weights, metrics=("ppo_kl",))
    return loss, {"actor/pg_clipfrac": _f(metrics, "clip_cov_frac"), "actor/ppo_kl": _f(metrics, "ppo_kl")}


def fastpo_kl_cov(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                  response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                  rollout_is_weights: Optional[torch.Tensor] = None):
    """verl's ``kl_cov``: −A·r unclipped, plus ppo_kl_coef·|logp − old_logp| on the top few covariance tokens,
    selected inside fastpo.policy_loss (``PolicyLossConfig.kl_cov_ratio``); ``rollout_is_weights`` weigh
    both terms, as verl."""
    assert config is not None
    pl = config.policy_loss
    ratio = pl.kl_cov_ratio if pl.kl_cov_ratio is not None else 0.0002
    coef = pl.ppo_kl_coef if pl.ppo_kl_coef is not None else 1.0
    assert ratio > 0, "kl_cov_ratio should be larger than 0."
    cfg = PolicyLossConfig(surrogate="ratio", kl_coef=0.0, aggregation=_AGG[_check_mode(loss_agg_mode)],
                           kl_cov_ratio=float(ratio), kl_cov_coef=float(coef))
    loss, _ = _call(cfg, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                    rollout_is_weights, metrics=())
    mask = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    abs_kl = torch.where(mask, (log_prob.detach() - old_log_prob).abs_(), 0.0).sum()  # a select: NaN padding
    return loss, {"actor/ppo_kl": float((abs_kl / mask.sum().clamp(min=1)).item())}


def _check_mode(loss_agg_mode: str) -> str:
    if loss_agg_mode not in _AGG:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    return loss_agg_mode


LOSSES: Dict[str, Callable] = {name: _make_loss(name) for name in _METRICS}
LOSSES.update(bypass_mode=fastpo_bypass_mode, clip_cov=fastpo_clip_cov, kl_cov=fastpo_kl_cov)


def register() -> None:
    """Registers ``fastpo_<name>`` for every loss in :data:`LOSSES` (verl overwrites an earlier registration
    of the same name), and the advantage estimators of ``fastpo.integrations.verl_advantages`` if present."""
    for name, fn in LOSSES.items():
        core_algos.register_policy_loss(f"fastpo_{name}")(fn)
    if importlib.util.find_spec("fastpo.integrations.verl_advantages") is not None:
        importlib.import_module("fastpo.integrations.verl_advantages").register()


register()
install_from_env()  # FASTPO_VERL_FUSED_HEAD=1: verl's FusedLinearForPPO is fastpo's (verl_head)
