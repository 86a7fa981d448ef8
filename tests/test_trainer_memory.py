"""--gradient-checkpointing, --bf16 (autocast over fp32 master weights), --cast-lm-head-fp32 and the
learning-rate schedule."""

import math

import pytest
import torch

import fastpo
from fastpo.trainer.batch import make_token_batch, token_logprobs
from fastpo.trainer.cli import parse_config
from fastpo.trainer.errors import UserInputError
from fastpo.trainer.loop import Trainer
from fastpo.trainer.schedule import lr_factor

QUICK = ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "3", "--no-progress"]


def trainer_with(small_lm, tmp_path, *flags):
    return Trainer(parse_config(["--model", small_lm, *QUICK, "--output-dir", str(tmp_path), *flags]))


def batch_of(trainer):
    return make_token_batch([[5, 6, 7], [8, 9], [10]], [[11, 12], [13, 14, 15], [16]], 0, trainer.device)


def policy_gradients(trainer, batch):
    trainer.optimizer.zero_grad(set_to_none=True)
    logp = token_logprobs(trainer.policy, batch)
    weights = torch.linspace(-1.0, 1.0, logp.numel())
    (logp * weights).sum().backward()
    return logp.detach(), [p.grad.clone() for p in trainer.trainable]


def test_gradient_checkpointing_recomputes_and_keeps_the_gradients(small_lm, tmp_path):
    plain = trainer_with(small_lm, tmp_path / "a")
    ckpt = trainer_with(small_lm, tmp_path / "b", "--gradient-checkpointing")
    batch = batch_of(plain)
    calls = []
    layer = ckpt.lm.get_decoder().layers[0]
    forward = layer.forward
    layer.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)  # (hooks do not see recomputation)
    logp_a, grads_a = policy_gradients(plain, batch)
    logp_b, grads_b = policy_gradients(ckpt, batch)
    assert len(calls) == 2  # the forward, and its recomputation in the backward
    torch.testing.assert_close(logp_b, logp_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    calls.clear()
    with torch.no_grad():
        token_logprobs(ckpt.policy_eval, batch)
    assert len(calls) == 1 and not layer.training  # scoring passes: no recomputation, eval mode kept


def test_bf16_autocast_keeps_fp32_master_weights(small_lm, tmp_path, monkeypatch):
    fp32 = trainer_with(small_lm, tmp_path / "a")
    mixed = trainer_with(small_lm, tmp_path / "b", "--bf16")
    head32 = trainer_with(small_lm, tmp_path / "c", "--bf16", "--cast-lm-head-fp32")
    batch = batch_of(fp32)
    seen = []
    real = fastpo.linear_token_logprobs

    def spy(hidden, weight, labels, **kw):
        seen.append((hidden.dtype, weight.dtype))
        return real(hidden, weight, labels, **kw)

    monkeypatch.setattr(fastpo, "linear_token_logprobs", spy)
    logp32, grads32 = policy_gradients(fp32, batch)
    logp16, grads16 = policy_gradients(mixed, batch)
    logp_h, _ = policy_gradients(head32, batch)
    assert seen == [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                    (torch.float32, torch.float32)]
    assert all(p.dtype == torch.float32 for p in mixed.trainable)
    assert all(g.dtype == torch.float32 for g in grads16)
    err = float((logp16 - logp32).abs().max())
    assert 1e-6 < err < 0.1  # bf16 compute really ran, and stays close
    assert float((logp_h - logp32).abs().max()) < 0.1
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads16]),
                                                torch.cat([g.flatten() for g in grads32]), dim=0)
    assert cos > 0.99
    record, updated = mixed.train_step(1)
    assert updated
    assert all(s["exp_avg"].dtype == torch.float32 for s in mixed.optimizer.state.values())


def test_lr_schedules():
    assert [lr_factor(s, kind="constant", warmup=2, total=6) for s in range(1, 7)] == [0.5, 1, 1, 1, 1, 1]
    assert [lr_factor(s, kind="linear", warmup=2, total=6) for s in range(1, 7)] == [0.5, 1, 1, 0.75, 0.5, 0.25]
    cosine = [lr_factor(s, kind="cosine", warmup=0, total=4) for s in range(1, 5)]
    assert cosine == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2])
    assert all(lr_factor(s, kind=k, warmup=3, total=10) > 0 for k in ("linear", "cosine") for s in range(1, 11))


def test_schedule_in_a_run(small_lm, tmp_path):
    records = trainer_with(small_lm, tmp_path, "--max-steps", "3", "--lr", "1e-3", "--lr-scheduler", "linear",
                           "--warmup-steps", "1").train()
    assert [r["lr"] for r in records] == pytest.approx([1e-3, 1e-3, 5e-4])


@pytest.mark.parametrize("flags, message", [
    (["--lr-scheduler", "step"], "--lr-scheduler: unknown value 'step'"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--bf16", "--dtype", "bfloat16"], "use it with --dtype float32"),
])
def test_bad_memory_and_schedule_flags(flags, message):
    with pytest.raises(UserInputError, match=message):
        parse_config(flags)
