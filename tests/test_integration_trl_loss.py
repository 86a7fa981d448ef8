"""fastpo.integrations.trl against TRL 1.16's own code, below the training loop:

* Loss level: TRL's own ``GRPOTrainer._compute_loss`` vs the mixin's, on one generated batch with perturbed
  old / reference log-probs, an empty completion row and random advantages, over the options the mixin
  serves (loss, every parameter gradient, every metric, the adaptive-entropy state), and over cases it must
  hand back to TRL (bit-identical); RLOO's ``_compute_loss``.
* The fused head: log-probs, entropies and gradients of TRL's head vs fastpo's (float32, bf16 autocast, no
  compaction), requests fastpo hands back.
* The version gate, the contract checks and the log-once delegation message.
"""

import math

import pytest
import torch

from trl_helpers import one_thread, rl_trainer, tiny, trl  # noqa: F401  (fixtures)
from transformers import LlamaForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

from fastpo.integrations import trl as ftrl  # noqa: E402
from fastpo.integrations.trl_head import (  # noqa: E402
    STATISTICS, head_settings, record_delegation, served_outputs, wrap_fused_lm_head,
)


# ---------------------------------------------------------------------------------------------------- loss level
@pytest.fixture(scope="module")
def grpo_batch(tiny, tmp_path_factory):
    """A FastpoGRPOTrainer (beta != 0, so it has a reference model) and one generated batch, perturbed: old and
    reference log-probs off by up to +-0.3, random advantages, one empty completion row."""
    t = rl_trainer(ftrl.FastpoGRPOTrainer, GRPOConfig, tiny, tmp_path_factory.mktemp("grpo"), beta=0.04)
    t.model.train()
    t.current_gradient_accumulation_steps = 2
    inputs = t._generate_and_score_completions(next(iter(t.get_train_dataloader())))
    g = torch.Generator().manual_seed(0)
    mask = inputs["completion_mask"].clone()
    mask[1] = 0
    inputs["completion_mask"] = mask
    with torch.no_grad():
        logps, _, _ = t._fastpo_per_token(t.model, inputs)
    b, n = logps.shape
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(b, n, generator=g)
    inputs["ref_per_token_logps"] = logps + 0.3 * torch.randn(b, n, generator=g)
    inputs["advantages"] = torch.randn(b, generator=g)
    inputs["num_items_in_batch"] = mask.sum() + 3  # as if the generation batch held more tokens
    ratios = {"token": torch.rand(b, n, generator=g) * 1.5 + 0.2, "sequence": torch.rand(b, 1, generator=g) + 0.5}
    return t, inputs, ratios


SETTINGS = ("loss_type", "importance_sampling_level", "beta", "epsilon_high", "top_entropy_quantile",
            "off_policy_mask_threshold", "use_vllm", "vllm_importance_sampling_correction", "_entropy_bonus_enabled",
            "entropy_coef", "use_adaptive_entropy", "_last_world_entropy", "_entropy_window_stats")
ARG_SETTINGS = ("delta", "use_bias_correction_kl")


def _grpo_case(t, inputs, ratios, *, vllm=None, eval_mode=False, **settings):
    """(loss, grads, metrics) of TRL's _compute_loss and of the mixin's, and the STATS of the mixin's call
    (``eval_mode``: the model in eval mode, as in TRL's prediction_step: no accumulation scaling)."""
    saved = {k: getattr(t, k) for k in SETTINGS}
    saved_args = {k: getattr(t.args, k) for k in ARG_SETTINGS}
    inputs = dict(inputs)
    if vllm is not None:
        settings.update(use_vllm=True, vllm_importance_sampling_correction=True)
        inputs["importance_sampling_ratio"] = ratios[vllm]
    try:
        t.model.train(not eval_mode)
        for k, v in settings.items():
            setattr(t.args if k in ARG_SETTINGS else t, k, v)
        state = {k: getattr(t, k) for k in SETTINGS}  # the adaptive entropy controller changes some
        results = []
        for fn in (GRPOTrainer._compute_loss, type(t)._compute_loss):
            for k, v in state.items():
                setattr(t, k, v)
            mode = "eval" if eval_mode else "train"
            t._metrics[mode].clear()
            t.model.zero_grad(set_to_none=True)
            ftrl.STATS.clear()
            loss = fn(t, t.model, inputs)
            loss.backward()
            grads = [p.grad.clone() for p in t.model.parameters() if p.grad is not None]
            metrics = {k: v[-1] for k, v in t._metrics[mode].items()}
            metrics["state:entropy_coef"], metrics["state:last_world_entropy"] = t.entropy_coef, t._last_world_entropy
            results.append((loss.detach(), grads, metrics, dict(ftrl.STATS)))
        return results
    finally:
        t.model.train()
        for k, v in saved.items():
            setattr(t, k, v)
        for k, v in saved_args.items():
            setattr(t.args, k, v)


SERVED = {
    "grpo": dict(loss_type="grpo"),
    "grpo-nobias-delta": dict(loss_type="grpo", use_bias_correction_kl=False, delta=1.5),
    "delta-below-clip": dict(loss_type="grpo", beta=0.0, delta=1.1, epsilon_high=0.28),
    "bnpo-entropy-mask": dict(loss_type="bnpo", top_entropy_quantile=0.5),
    "dr_grpo-offpolicy": dict(loss_type="dr_grpo", off_policy_mask_threshold=0.05),
    "dapo-vllm-token": dict(loss_type="dapo", vllm="token"),
    "dapo-vllm-seq-eps": dict(loss_type="dapo", vllm="sequence", epsilon_high=0.28),
    "luspo": dict(loss_type="luspo", use_bias_correction_kl=False),
    "cispo": dict(loss_type="cispo", epsilon_high=1.3),
    "sapo-vllm": dict(loss_type="sapo", vllm="token"),
    "vespo": dict(loss_type="vespo"),
    "beta0-delta": dict(loss_type="grpo", beta=0.0, delta=1.3, epsilon_high=0.28),
    "dapo-entropy-bonus": dict(loss_type="dapo", _entropy_bonus_enabled=True, entropy_coef=0.05),
    "grpo-adaptive-entropy-masked": dict(loss_type="grpo", _entropy_bonus_enabled=True, use_adaptive_entropy=True,
                                         entropy_coef=0.05, _last_world_entropy=0.0, top_entropy_quantile=0.5),
    "dapo-eval": dict(loss_type="dapo", eval_mode=True),
    "grpo-eval": dict(loss_type="grpo", eval_mode=True),
    "seq-grpo": dict(loss_type="grpo", importance_sampling_level="sequence", use_bias_correction_kl=False),
    "seq-bnpo-offpolicy": dict(loss_type="bnpo", importance_sampling_level="sequence", beta=0.0,
                               off_policy_mask_threshold=0.05),
    "seq-dapo-vllm-seq": dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.0, vllm="sequence"),
    "seq-dr_grpo": dict(loss_type="dr_grpo", importance_sampling_level="sequence", use_bias_correction_kl=False),
    "seq-luspo": dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.0),
    "seq-sapo": dict(loss_type="sapo", importance_sampling_level="sequence", beta=0.0),
    "seq-cispo": dict(loss_type="cispo", importance_sampling_level="sequence", beta=0.0, epsilon_high=1.3),
}


def _compare(stock, ours):
    torch.testing.assert_close(ours[0], stock[0], atol=1e-6, rtol=1e-5, msg=lambda m: f"loss: {m}")
    assert len(ours[1]) == len(stock[1]) > 0
    for g_ours, g_stock in zip(ours[1], stock[1]):
        torch.testing.assert_close(g_ours, g_stock, atol=1e-6, rtol=1e-5, msg=lambda m: f"grad: {m}")
    assert ours[2].keys() == stock[2].keys()
    for key, want in stock[2].items():
        got = ours[2][key]
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("case", list(SERVED))
def test_grpo_loss_served(case, grpo_batch):
    stock, ours = _grpo_case(*grpo_batch, **SERVED[case])
    if "entropy" in case and "bonus" in case or "adaptive" in case:
        assert "policy_loss" in ours[2] and "entropy_coef" in ours[2], ours[2]
    if "adaptive" in case:
        assert ours[2]["state:entropy_coef"] != SERVED[case]["entropy_coef"]  # the controller stepped
    assert ours[3].get("served:grpo_loss") == 1 and "delegated:grpo_loss" not in ours[3], ours[3]
    _compare(stock, ours)


DELEGATED = {
    "cispo-cap-below-1": dict(loss_type="cispo", epsilon_high=0.28),
    "vespo-vllm": dict(loss_type="vespo", vllm="token"),
    "seq-bias-kl": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "seq-entropy-mask": dict(loss_type="bnpo", importance_sampling_level="sequence", beta=0.0,
                             top_entropy_quantile=0.5),
    "seq-vllm-token": dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.0, vllm="token"),
}


@pytest.mark.parametrize("case", list(DELEGATED))
def test_grpo_loss_delegated(case, grpo_batch):
    stock, ours = _grpo_case(*grpo_batch, **DELEGATED[case])
    assert ours[3].get("delegated:grpo_loss") == 1 and "served:grpo_loss" not in ours[3], ours[3]
    torch.testing.assert_close(ours[0], stock[0], atol=0, rtol=0)


def test_grpo_loss_can_fail(grpo_batch):
    """The comparison is not empty: a fastpo config with another clip bound is caught."""
    t = grpo_batch[0]
    real = ftrl.trl_losses.grpo_config

    def wrong(trainer):
        import dataclasses

        return dataclasses.replace(real(trainer), clip_low=0.05)

    ftrl.trl_losses.grpo_config = wrong
    try:
        stock, ours = _grpo_case(*grpo_batch, loss_type="bnpo")
    finally:
        ftrl.trl_losses.grpo_config = real
    assert t is grpo_batch[0]
    with pytest.raises(AssertionError):
        _compare(stock, ours)


@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_rloo_loss_parity(eps_high, tiny, tmp_path):
    t = rl_trainer(ftrl.FastpoRLOOTrainer, RLOOConfig, tiny, tmp_path, epsilon_high=eps_high)
    t.model.train()
    inputs = t._generate_and_score_completions(next(iter(t.get_train_dataloader())))
    g = torch.Generator().manual_seed(1)
    inputs["old_logps"] = inputs["old_logps"] + 0.3 * torch.randn(inputs["old_logps"].shape, generator=g)
    inputs["advantages"] = torch.randn(inputs["advantages"].shape, generator=g)
    results = []
    for fn in (RLOOTrainer._compute_loss, type(t)._compute_loss):
        t._metrics["train"].clear()
        t.model.zero_grad(set_to_none=True)
        ftrl.STATS.clear()
        loss = fn(t, t.model, inputs)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in t.model.parameters() if p.grad is not None],
                        {k: v[-1] for k, v in t._metrics["train"].items()}, dict(ftrl.STATS)))
    assert results[1][3].get("served:rloo_loss") == 1
    _compare(*results)


# ---------------------------------------------------------------------------------------------------- fused head
def _per_token(t, inputs):
    t.model.zero_grad(set_to_none=True)
    logps, ent, _ = t._fastpo_per_token(t.model, inputs)
    (logps.sum() + 0.1 * ent.sum()).backward()
    return logps.detach(), ent.detach(), [p.grad.clone() for p in t.model.parameters() if p.grad is not None]


@pytest.mark.parametrize("mode", ["float32", "bf16-autocast", "no-compaction"])
def test_head_parity(mode, grpo_batch):
    t, inputs, _ = grpo_batch
    model = t.model
    ours_forward = model.forward
    bf16 = mode == "bf16-autocast"
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    if mode == "no-compaction":
        model.forward = model._fastpo_trl_forward
        del model._fastpo_trl_forward
        assert wrap_fused_lm_head(model, compact=False)
    try:
        ftrl.STATS.clear()
        with ctx:
            ours = _per_token(t, inputs)
        assert ftrl.STATS["served:lm_head"] >= 1
        trl_forward = model._fastpo_trl_forward
        model.forward = trl_forward
        with ctx:
            stock = _per_token(t, inputs)
    finally:
        model.forward = ours_forward
        model._fastpo_trl_forward = trl_forward
    tol = dict(atol=2e-2, rtol=2e-2) if mode == "bf16-autocast" else dict(atol=1e-6, rtol=1e-5)
    for got, want in zip(ours[:2], stock[:2]):
        torch.testing.assert_close(got, want, **tol)
    for got, want in zip(ours[2], stock[2]):
        torch.testing.assert_close(got, want, **(tol if mode != "bf16-autocast" else dict(atol=5e-2, rtol=5e-2)))


ALL_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


@pytest.mark.parametrize("statistics", [True, False])
def test_head_outputs(statistics, tiny, monkeypatch):
    """Every field TRL's head computes (DPO / WPO / SFT policies ask for is_top1 and log_sum_sq_probs) is fastpo's
    where linear_token_logprobs has outputs=, else TRL's answer comes back unchanged; mean_logits is fastpo's
    (the closed form without outputs=)."""
    from trl.trainer.utils import add_fused_lm_head

    from fastpo.integrations import trl_head

    if not statistics:
        monkeypatch.setattr(trl_head, "_has_statistics", lambda: False)

    path, _ = tiny
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]])
    labels = ids.masked_fill(ids == 0, -100)
    labels[:, :2] = -100
    outs = {}
    for outputs in (ALL_OUTPUTS, ("log_probs", "entropy", "mean_logits")):
        stock, ours = LlamaForCausalLM.from_pretrained(path), LlamaForCausalLM.from_pretrained(path)
        add_fused_lm_head(stock, temperature=0.7, outputs=outputs)
        add_fused_lm_head(ours, temperature=0.7, outputs=outputs)
        assert head_settings(ours.forward)["outputs"] == outputs
        assert wrap_fused_lm_head(ours)
        ftrl.STATS.clear()
        want, got = stock(input_ids=ids, labels=labels, fused_lm_head=True), ours(input_ids=ids, labels=labels,
                                                                                  fused_lm_head=True)
        outs[outputs] = dict(ftrl.STATS)
        for field in ALL_OUTPUTS + ("loss", "label_mask"):
            a, b = getattr(got, field), getattr(want, field)
            assert (a is None) == (b is None), field
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"{field}: {m}")
    assert outs[ALL_OUTPUTS] == {"served:lm_head" if served_outputs() >= STATISTICS else "delegated:lm_head": 1}
    assert outs[("log_probs", "entropy", "mean_logits")] == {"served:lm_head": 1}


@pytest.mark.parametrize("attr,value,served", [("logit_scale", 0.5, True), ("logits_scaling", 4.0, True),
                                                ("final_logit_softcapping", 3.0, False)])
def test_head_logit_scale_and_softcap(attr, value, served, tiny):
    """TRL reads a logit scale from the config (z·s/T): fastpo serves it as the temperature T/s;
    softcapping goes to TRL's head."""
    from trl.trainer.utils import add_fused_lm_head

    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]])
    labels = ids.masked_fill(ids == 0, -100)
    stock, ours = (LlamaForCausalLM.from_pretrained(tiny[0]) for _ in range(2))
    results = []
    for model in (stock, ours):
        setattr(model.config, attr, value)
        add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy", "mean_logits"))
    assert wrap_fused_lm_head(ours)
    ftrl.STATS.clear()
    for model in (stock, ours):
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + out.entropy.sum()).backward()
        results.append((out.log_probs, out.entropy, out.mean_logits, model.lm_head.weight.grad))
    assert ftrl.STATS == ({"served:lm_head": 1} if served else {"delegated:lm_head": 1})
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_contract_check(tiny):
    model = LlamaForCausalLM.from_pretrained(tiny[0])
    assert head_settings(model.forward) is None
    assert not wrap_fused_lm_head(model)  # not TRL's head: left alone
    assert "_fastpo_trl_forward" not in vars(model) and "forward" not in vars(model)


def test_version_gate(tiny, tmp_path, monkeypatch):
    assert ftrl.trl_supported("1.15.0") and ftrl.trl_supported("1.16.3")
    assert not ftrl.trl_supported("1.14.2") and not ftrl.trl_supported("1.17.0.dev0")
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.warns(UserWarning, match="tested with trl"):
        t = rl_trainer(ftrl.FastpoGRPOTrainer, GRPOConfig, tiny, tmp_path)
    assert "_fastpo_trl_forward" not in vars(t.model)
    assert "untested" in t._fastpo_loss_reason({})


def test_delegation_logged_once(caplog):
    ftrl.STATS.clear()
    with caplog.at_level("WARNING", logger="fastpo.integrations.trl"):
        for _ in range(3):
            record_delegation("test_pass", "a reason seen for the first time")
    assert ftrl.STATS["delegated:test_pass"] == 3
    assert sum("a reason seen for the first time" in r.getMessage() for r in caplog.records) == 1


def test_contract_check_on_trainer_attributes(grpo_batch, monkeypatch):
    """A TRL whose trainer lacks an attribute the hook reads gets its own _compute_loss back."""
    t, inputs, _ = grpo_batch
    assert t._fastpo_contract() is None
    monkeypatch.setattr(type(t), "_fastpo_attributes", ("epsilon_low", "args.no_such_field"), raising=False)
    assert "no_such_field" in t._fastpo_contract()
    assert "no_such_field" in t._fastpo_loss_reason(inputs)


@pytest.mark.parametrize("case,from_op", [("grpo", True), ("grpo-nobias-delta", True), ("cispo", True),
                                          ("dapo-vllm-token", True), ("delta-below-clip", False),
                                          ("seq-grpo", False), ("luspo", False)])
def test_grpo_clip_metrics_from_op(case, from_op, grpo_batch, monkeypatch):
    """TRL's token-mean clip metrics are fastpo.policy_loss's (reduced across processes as TRL does) where they
    have TRL's definition, and still equal TRL's: a fake op metric would change them."""
    from fastpo.integrations import trl_losses

    calls = []
    real = trl_losses._global_token_means

    def spy(t, op_metrics, names, mask):
        calls.append(names)
        return real(t, op_metrics, names, mask)

    monkeypatch.setattr(trl_losses, "_global_token_means", spy)
    stock, ours = _grpo_case(*grpo_batch, **SERVED[case])
    _compare(stock, ours)
    assert bool(calls) == from_op, calls
    if from_op:
        monkeypatch.setattr(trl_losses, "_global_token_means", lambda t, m, names, mask: [0.5] * len(names))
        _, faked = _grpo_case(*grpo_batch, **SERVED[case])
        key = "cispo_clip_ratio" if case == "cispo" else "clip_ratio/high_mean"
        assert faked[2][key] == 0.5 != stock[2][key]
