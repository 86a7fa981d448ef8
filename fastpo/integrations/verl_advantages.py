"""fastpo's advantage estimators as verl 0.9.1 estimators: ``register()`` adds ``fastpo_<name>`` to verl's
``ADV_ESTIMATOR_REGISTRY`` (``verl.trainer.ppo.core_algos.register_adv_est``) for every estimator verl
has: gae, grpo, grpo_vectorized, gdpo, grpo_passk, reinforce_plus_plus, reinforce_plus_plus_baseline,
remax, rloo, rloo_vectorized, opo, gpg, optimal_token_baseline, tir_optimal_token_baseline.

Each function has the signature of verl's built-in of the same name and returns what it returns
(``(advantages, returns)``, ``[bs, T]``), computed by fastpo's vectorised ops (no Python loop over the
batch; verl's own code is never called). Where fastpo's public ops deliberately differ, these forms
follow verl: a group of one keeps its raw score (mean 0, std 1; ``rloo_vectorized`` gives 0, as verl),
``grpo_passk`` raises on a group of one. The differences that remain:

* sequence scores are the sum of ``token_level_rewards`` over the counted tokens (verl sums every
  position; equal whenever padding holds 0, as verl writes it);
* a NaN or ±inf at a masked position is ignored (verl propagates it), and NaN counted scores follow
  fastpo's (TRL's) "not scored" semantics;
* ``gae``, ``reinforce_plus_plus``, ``gdpo``, ``reinforce_plus_plus_baseline``: verl's ``masked_whiten``
  raises on fewer than two counted tokens; here it returns ``x − mean``;
* ``opo`` on a group whose responses are all empty gives 0 (verl: 0/0 = NaN).

verl's ``compute_advantage`` passes ``sum_pi_squared``/``old_log_probs`` (OTB) and the raw batch (GDPO)
only to its built-in names: call ``fastpo_optimal_token_baseline`` / ``fastpo_gdpo`` with those
arguments yourself (``get_adv_estimator_fn``), or use them directly. Importing this module imports
neither verl nor a GPU runtime; ``register()`` imports ``verl.trainer.ppo.core_algos`` only.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from fastpo._layout import accumulation_dtype
from fastpo.ops.group_advantages import sequence_advantages, sequence_scores
from fastpo.ops.group_stats import dense_groups, group_sum
from fastpo.ops.multi_reward import multi_reward_core
from fastpo.ops.token_baseline import otb_core

__all__ = ["register", "ESTIMATORS", "PREFIX"]

PREFIX = "fastpo_"


def _groups(index: Any, batch: int, device) -> torch.Tensor:
    """Dense group indices [B] of verl's ``index`` (uid strings, ints, an ndarray or a tensor)."""
    if isinstance(index, torch.Tensor) and not index.is_floating_point():
        ids = index.reshape(-1).to(device=device, dtype=torch.int64)
    else:
        arr = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index).reshape(-1)
        try:
            inverse = np.unique(arr, return_inverse=True)[1].reshape(-1)
        except TypeError:  # mixed, unorderable labels: first-seen order
            seen: dict = {}
            inverse = np.array([seen.setdefault(x, len(seen)) for x in arr.tolist()], dtype=np.int64)
        ids = torch.as_tensor(inverse, dtype=torch.int64, device=device)
    if ids.numel() != batch:
        raise ValueError(f"index must hold one group label per response (bs = {batch}), got {ids.numel()}")
    return dense_groups(batch, ids, None, device)


def _outcome(token_level_rewards, response_mask, index, method, eps, *, singleton_raw=True, scale=1.0):
    s, lengths, m = sequence_scores(token_level_rewards, response_mask)
    g = _groups(index, s.shape[0], s.device)
    adv = sequence_advantages(s, g, method, eps, lengths=lengths, singleton_raw=singleton_raw) * scale
    adv = (adv[:, None] * response_mask).to(token_level_rewards.dtype)
    return adv, adv


def _whiten(x, response_mask):
    import fastpo

    return fastpo.whiten(x, response_mask)


# --------------------------------------------------------------------------------------------
# The estimators (verl's signatures)
# --------------------------------------------------------------------------------------------


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    import fastpo

    adv, _ = fastpo.gae(token_level_rewards, values, response_mask, gamma=float(gamma), lam=float(lam))
    # verl carries the running advantage through masked positions: there it is the advantage of the next
    # counted token (0 past the last), and returns = that + values.
    t = adv.shape[-1]
    pos = torch.arange(t, device=adv.device)
    nxt = torch.where(response_mask != 0, pos, t).flip(-1).cummin(-1).values.flip(-1)
    carried = torch.cat([adv, adv.new_zeros(adv.shape[0], 1)], -1).gather(-1, nxt)
    returns = carried + values.to(carried.dtype)
    return _whiten(carried, response_mask).to(token_level_rewards.dtype), returns.to(token_level_rewards.dtype)


def compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                                   norm_adv_by_std_in_grpo: bool = True, config: Optional[Any] = None):
    return _outcome(token_level_rewards, response_mask, index, "grpo" if norm_adv_by_std_in_grpo else "dr_grpo",
                    epsilon)


def compute_grpo_vectorized_outcome_advantage(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                                              norm_adv_by_std_in_grpo: bool = True, config: Optional[Any] = None):
    return compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon,
                                          norm_adv_by_std_in_grpo, config)


def compute_gdpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                                   norm_adv_by_std_in_grpo: bool = True, config: Optional[Any] = None,
                                   non_tensor_batch: Optional[dict] = None, batch: Optional[dict] = None, **kwargs):
    s, lengths, _ = sequence_scores(token_level_rewards, response_mask)
    weights = None
    if config is not None and non_tensor_batch is not None and batch is not None:
        keys = config.get("gdpo_reward_keys", None)
        if not keys:
            raise ValueError("GDPO requires 'algorithm.gdpo_reward_keys' listing the reward component keys")
        missing = [k for k in keys if k not in non_tensor_batch]
        if missing:
            raise ValueError(f"GDPO reward keys {missing} not found in non_tensor_batch (keys: "
                             f"{list(non_tensor_batch.keys())})")
        s = torch.stack([torch.as_tensor(np.asarray(non_tensor_batch[k], dtype=np.float32), device=s.device)
                         for k in keys], 1).to(s.dtype)
        weights = config.get("gdpo_reward_weights", None)
    s = s[:, None] if s.dim() == 1 else s
    w = torch.ones(s.shape[1], dtype=s.dtype, device=s.device) if weights is None else \
        torch.tensor(list(weights), dtype=torch.float32).to(device=s.device, dtype=s.dtype)
    g = _groups(index, s.shape[0], s.device)
    adv = multi_reward_core(s, w, g, lengths, "gdpo", "group" if norm_adv_by_std_in_grpo else "none", epsilon,
                            singleton_raw=True)
    adv = (adv[:, None] * response_mask).to(token_level_rewards.dtype)
    return adv, adv


def compute_grpo_passk_outcome_advantage(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                                         norm_adv_by_std_in_grpo: bool = True, config: Optional[Any] = None,
                                         **kwargs):
    if config is None:
        raise ValueError("grpo_passk reads norm_adv_by_std_in_grpo from config (verl asserts config is not None)")
    norm = config.get("norm_adv_by_std_in_grpo", True)
    g = _groups(index, token_level_rewards.shape[0], token_level_rewards.device)
    sizes = group_sum(torch.ones_like(g, dtype=torch.float32), g)
    if bool((sizes < 2).any()):
        raise ValueError(f"Pass@k requires at least 2 samples per group, got a group of "
                         f"{int(sizes.min())}")
    return _outcome(token_level_rewards, response_mask, index, "grpo_passk" if norm else "dr_grpo_passk", epsilon)


def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards, response_mask, index,
                                                          epsilon: float = 1e-6, config: Optional[Any] = None,
                                                          **kwargs):
    return _outcome(token_level_rewards, response_mask, index, "reinforce_pp", epsilon)


def compute_rloo_outcome_advantage(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                                   config: Optional[Any] = None, **kwargs):
    return _outcome(token_level_rewards, response_mask, index, "rloo", epsilon)


def compute_rloo_vectorized_outcome_advantage(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                                              config: Optional[Any] = None, **kwargs):
    return _outcome(token_level_rewards, response_mask, index, "rloo", epsilon, singleton_raw=False)


def compute_opo_outcome_advantage(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                                  config: Optional[Any] = None, **kwargs):
    return _outcome(token_level_rewards, response_mask, index, "opo", epsilon)


def compute_gpg_outcome_advantage(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                                  f_norm: float = 1.0, alpha: float = 1.0, config=None, **kwargs):
    return _outcome(token_level_rewards, response_mask, index, "gpg", epsilon, scale=1.0 / f_norm)


def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards, response_mask, config: Optional[Any] = None,
                                                  **kwargs):
    import fastpo

    if config is None:
        raise ValueError("reinforce_plus_plus reads gamma from config (verl asserts config is not None)")
    # G_t = r_t + γ·G_next over the counted tokens: GAE with V = 0 and λ = 1.
    returns, _ = fastpo.gae(token_level_rewards, torch.zeros_like(token_level_rewards), response_mask,
                            gamma=float(config.gamma), lam=1.0)
    adv = (_whiten(returns, response_mask) * response_mask).to(token_level_rewards.dtype)
    return adv, returns.to(token_level_rewards.dtype)


def compute_remax_outcome_advantage(token_level_rewards, reward_baselines, response_mask,
                                    config: Optional[Any] = None, **kwargs):
    dtype = accumulation_dtype(token_level_rewards.dtype)
    m = response_mask != 0
    r = torch.where(m, token_level_rewards.detach().to(dtype), torch.zeros((), dtype=dtype))
    returns = r.flip(-1).cumsum(-1).flip(-1)
    adv = returns - reward_baselines.detach().to(dtype)[:, None] * response_mask
    return adv.to(token_level_rewards.dtype), returns.to(token_level_rewards.dtype)


def _otb(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared, rollout_is_weights,
         handle_zero_tail, epsilon, multi_turn):
    dtype = accumulation_dtype(token_level_rewards.dtype)
    cast = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    g = _groups(index, token_level_rewards.shape[0], token_level_rewards.device)
    adv, ret = otb_core(cast(token_level_rewards), response_mask != 0, cast(old_log_probs), cast(sum_pi_squared),
                        cast(rollout_is_weights), g, multi_turn=multi_turn, handle_zero_tail=handle_zero_tail,
                        eps=epsilon, singleton_raw=True)
    return adv.to(token_level_rewards.dtype), ret.to(token_level_rewards.dtype)


def compute_optimal_token_baseline_advantage(token_level_rewards, response_mask, index, old_log_probs,
                                             sum_pi_squared, rollout_is_weights=None, handle_zero_tail: bool = True,
                                             epsilon: float = 1e-8, **kwargs):
    return _otb(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared, rollout_is_weights,
                handle_zero_tail, epsilon, multi_turn=False)


def compute_multi_turn_optimal_token_baseline_advantage(token_level_rewards, response_mask, index, old_log_probs,
                                                        sum_pi_squared, rollout_is_weights=None,
                                                        handle_zero_tail: bool = True, epsilon: float = 1e-8,
                                                        **kwargs):
    return _otb(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared, rollout_is_weights,
                handle_zero_tail, epsilon, multi_turn=True)


# verl name -> fastpo function (registered as PREFIX + name)
ESTIMATORS = {
    "gae": compute_gae_advantage_return,
    "grpo": compute_grpo_outcome_advantage,
    "grpo_vectorized": compute_grpo_vectorized_outcome_advantage,
    "gdpo": compute_gdpo_outcome_advantage,
    "grpo_passk": compute_grpo_passk_outcome_advantage,
    "reinforce_plus_plus": compute_reinforce_plus_plus_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
    "remax": compute_remax_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "rloo_vectorized": compute_rloo_vectorized_outcome_advantage,
    "opo": compute_opo_outcome_advantage,
    "gpg": compute_gpg_outcome_advantage,
    "optimal_token_baseline": compute_optimal_token_baseline_advantage,
    "tir_optimal_token_baseline": compute_multi_turn_optimal_token_baseline_advantage,
}


def register() -> list[str]:
    """Register every estimator of ``ESTIMATORS`` with verl as ``fastpo_<name>``; returns the names.

    Idempotent (verl's ``register_adv_est`` accepts the same function twice and refuses another one
    under a taken name).
    """
    from verl.trainer.ppo.core_algos import register_adv_est

    names = []
    for name, fn in ESTIMATORS.items():
        register_adv_est(PREFIX + name)(fn)
        names.append(PREFIX + name)
    return names
