"""The trainer's policy losses come from fastpo.linear_policy_loss (hidden states -> loss in one op) and
equal policy_loss(token_logprobs(...)) of the same batch, loss and parameter gradients."""

import pytest
import torch

import fastpo
from fastpo.trainer.batch import token_logprobs
from test_trainer_microbatch import make_trainer, perturbed_experience


@pytest.mark.parametrize("algo", ["grpo", "dapo", "gspo", "ppo"])
def test_trainer_loss_is_linear_policy_loss(algo, small_lm, tmp_path, monkeypatch):
    trainer = make_trainer(algo, small_lm, tmp_path, "--kl-coef", "0.05")
    exp = perturbed_experience(trainer)
    calls = []
    real = fastpo.linear_policy_loss
    monkeypatch.setattr(fastpo, "linear_policy_loss", lambda *a, **k: calls.append(k["config"]) or real(*a, **k))
    params = [p for p in trainer.policy.parameters() if p.requires_grad]
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, _ = trainer.algo.loss(exp)
    assert calls == [trainer.algo.config]
    fused = torch.autograd.grad(loss, params, allow_unused=True)

    t, batch, cfg = exp.tensors, exp.batch, trainer.algo.config
    logp = token_logprobs(trainer.policy, batch)
    num_tokens, factor = trainer.algo.policy_loss_scale(exp, cfg.aggregation)
    want = fastpo.policy_loss(logp, t["old_logp"], t["advantages"], t.get("mask"), cu_seqlens=batch.cu_seqlens,
                              ref_logp=t.get("ref_logp"), num_tokens=num_tokens, config=cfg).loss * factor
    # (PPO's loss adds the critic's value loss: a separate module, so the policy's gradients are pg's alone.)
    composed = torch.autograd.grad(want, params, allow_unused=True)
    for a, b in zip(fused, composed):
        if a is None or b is None:
            assert (a is None or float(a.abs().sum()) == 0) and (b is None or float(b.abs().sum()) == 0)
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
