"""Parity of every ``fastpo_<name>`` verl estimator with verl 0.9.1's own, through verl's
``get_adv_estimator_fn``, on random batches with ties, zero-variance groups, singleton groups, empty
responses and long responses. verl's result is computed first; then every verl advantage function,
``masked_whiten``/``masked_mean``/``masked_var`` and ``group_mean_std`` are replaced by functions that
raise, so a fastpo estimator that quietly delegated to verl fails here."""

import numpy as np
import pytest
import torch

verl_core = pytest.importorskip("verl.trainer.ppo.core_algos",
                                reason="verl is not importable: the parity tests call verl's own estimators")

from fastpo.integrations import verl_advantages  # noqa: E402

NAMES = sorted(verl_advantages.ESTIMATORS)


class _Config(dict):
    """A config with ``.get`` and attribute access, as verl's AlgoConfig."""

    __getattr__ = dict.__getitem__


@pytest.fixture(scope="module", autouse=True)
def registered():
    return verl_advantages.register()


def _batch(seed, *, singleton=True, long=False):
    g = torch.Generator().manual_seed(seed)
    sizes = [4, 4, 3, 5] + ([1] if singleton else [])
    bs = sum(sizes)
    t = 48 if long else 9
    uids = np.array([f"p{j}" for j, n in enumerate(sizes) for _ in range(n)], dtype=object)
    perm = torch.randperm(bs, generator=g).numpy()
    uids = uids[perm]  # groups are not contiguous
    lengths = torch.randint(1, t + 1, (bs,), generator=g)
    lengths[0] = 0  # an empty response
    lengths[1] = t  # a full-length one
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    scores = torch.randint(0, 3, (bs,), generator=g).float()  # ties
    scores[uids == "p1"] = 1.0  # a zero-variance group
    rewards = torch.zeros(bs, t)
    last = (lengths - 1).clamp(min=0)
    rewards[torch.arange(bs), last] = scores * (lengths > 0)
    dense = torch.randn(bs, t, generator=g) * mask  # token-level rewards (REINFORCE++, ReMax, OTB)
    return dict(uids=uids, mask=mask, rewards=rewards, dense=dense, g=g, bs=bs, t=t)


def _kwargs(name, b):
    g, bs, t, mask = b["g"], b["bs"], b["t"], b["mask"]
    if name == "gae":
        return dict(token_level_rewards=b["dense"], values=torch.randn(bs, t, generator=g) * mask,
                    response_mask=mask, gamma=0.9, lam=0.8)
    if name == "remax":
        return dict(token_level_rewards=b["dense"], reward_baselines=torch.randn(bs, generator=g),
                    response_mask=mask, config=_Config())
    if name == "reinforce_plus_plus":
        return dict(token_level_rewards=b["dense"], response_mask=mask, config=_Config(gamma=0.95))
    kw = dict(token_level_rewards=b["rewards"], response_mask=mask, index=b["uids"])
    if name == "grpo_passk":
        kw["config"] = _Config(norm_adv_by_std_in_grpo=True)
    if name.endswith("optimal_token_baseline"):
        kw.update(token_level_rewards=b["dense"], old_log_probs=-torch.rand(bs, t, generator=g) * 4,
                  sum_pi_squared=torch.rand(bs, t, generator=g),
                  rollout_is_weights=torch.rand(bs, t, generator=g) + 0.5)
    return kw


_RAISING = ("masked_whiten", "masked_mean", "masked_var")


def _forbid_verl(monkeypatch):
    """Every verl advantage computation raises from here on."""
    def boom(*args, **kwargs):
        raise AssertionError("fastpo delegated to verl")

    for name in dir(verl_core):
        if name.startswith("compute_") and callable(getattr(verl_core, name)):
            monkeypatch.setattr(verl_core, name, boom)
    for name in list(verl_core.ADV_ESTIMATOR_REGISTRY):
        if not name.startswith(verl_advantages.PREFIX):
            monkeypatch.setitem(verl_core.ADV_ESTIMATOR_REGISTRY, name, boom)
    import verl.utils.groupwise as groupwise
    import verl.utils.torch_functional as verl_F

    for name in _RAISING:
        monkeypatch.setattr(verl_F, name, boom)
    monkeypatch.setattr(groupwise, "group_mean_std", boom)


def _compare(name, kwargs, monkeypatch, tol=2e-5):
    want = verl_core.get_adv_estimator_fn(name)(**{k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                                    for k, v in kwargs.items()})
    with monkeypatch.context() as patch:
        _forbid_verl(patch)
        with pytest.raises(AssertionError, match="delegated"):  # the guard is live
            verl_core.get_adv_estimator_fn(name)(**kwargs)
        got = verl_core.get_adv_estimator_fn(verl_advantages.PREFIX + name)(**kwargs)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert torch.isfinite(g).all()
        finite = torch.isfinite(w)
        torch.testing.assert_close(g[finite], w[finite], atol=tol, rtol=tol)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_verl(monkeypatch, name, seed):
    b = _batch(seed, singleton=name != "grpo_passk")
    _compare(name, _kwargs(name, b), monkeypatch)


@pytest.mark.parametrize("name", NAMES)
def test_matches_verl_long_responses(monkeypatch, name):
    b = _batch(7, singleton=name != "grpo_passk", long=True)
    _compare(name, _kwargs(name, b), monkeypatch)


@pytest.mark.parametrize("name", ["grpo", "grpo_vectorized", "gdpo", "grpo_passk"])
def test_without_std(monkeypatch, name):
    b = _batch(3, singleton=name != "grpo_passk")
    kw = _kwargs(name, b)
    if name == "grpo_passk":
        kw["config"] = _Config(norm_adv_by_std_in_grpo=False)
    else:
        kw["norm_adv_by_std_in_grpo"] = False
    _compare(name, kw, monkeypatch)


def test_multi_turn_masks(monkeypatch):
    """Observation tokens inside a response (mask holes): OTB, TIR-OTB, ReMax, REINFORCE++ and GAE."""
    b = _batch(4)
    holes = torch.rand(b["bs"], b["t"], generator=b["g"]) > 0.3
    b["mask"] = b["mask"] * holes
    b["dense"] = b["dense"] * b["mask"]
    for name in ("optimal_token_baseline", "tir_optimal_token_baseline", "remax", "reinforce_plus_plus", "gae"):
        _compare(name, _kwargs(name, b), monkeypatch)


def test_gdpo_reward_keys(monkeypatch):
    b = _batch(5)
    bs, t = b["bs"], b["t"]
    g = b["g"]
    non_tensor = {"acc": np.round(np.random.default_rng(0).random(bs) * 2) / 2,
                  "fmt": np.random.default_rng(1).integers(0, 2, bs).astype(np.float32), "uid": b["uids"]}
    prompt_len = 3
    attention = torch.cat([torch.ones(bs, prompt_len), b["mask"]], 1).long()
    batch = {"prompts": torch.zeros(bs, prompt_len, dtype=torch.long), "attention_mask": attention}
    config = _Config(gdpo_reward_keys=["acc", "fmt"], gdpo_reward_weights=[1.0, 0.5])
    kw = dict(token_level_rewards=torch.randn(bs, t, generator=g) * b["mask"], response_mask=b["mask"],
              index=b["uids"], config=config, non_tensor_batch=non_tensor, batch=batch)
    _compare("gdpo", kw, monkeypatch)


def test_passk_group_of_one_raises_like_verl():
    b = _batch(6, singleton=True)
    kw = _kwargs("grpo_passk", b)
    with pytest.raises(ValueError, match="at least 2"):
        verl_core.get_adv_estimator_fn("grpo_passk")(**kw)
    with pytest.raises(ValueError, match="at least 2"):
        verl_core.get_adv_estimator_fn("fastpo_grpo_passk")(**kw)


def test_register_is_idempotent_and_complete():
    names = verl_advantages.register()
    assert set(names) == {"fastpo_" + n for n in NAMES}
    builtin = {e.value for e in verl_core.AdvantageEstimator}
    assert builtin == set(NAMES), "every verl estimator has a fastpo form"


def test_importing_fastpo_does_not_import_verl():
    import subprocess
    import sys

    code = ("import sys, fastpo, fastpo.integrations.verl_advantages; "
            "assert not any(m == 'verl' or m.startswith('verl.') for m in sys.modules), 'verl imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
