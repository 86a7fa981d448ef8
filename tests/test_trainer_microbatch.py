"""--micro-batch-size and --mini-batches: micro-batched gradients equal the unsplit ones."""

import pytest
import torch

from fastpo.trainer.batch import make_token_batch, score_in_chunks, token_logprobs
from fastpo.trainer.cli import parse_config
from fastpo.trainer.errors import UserInputError
from fastpo.trainer.loop import Trainer
from fastpo.trainer.microbatch import accumulate_gradients, split_experience

QUICK = ["--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "4", "--no-progress"]


def make_trainer(algo, small_lm, tmp_path, *extra):
    cfg = parse_config(["--algo", algo, "--model", small_lm, *QUICK, "--output-dir", str(tmp_path), *extra])
    return Trainer(cfg)


def gradients(trainer, minis):
    trainer.optimizer.zero_grad(set_to_none=True)
    losses = [accumulate_gradients(trainer.algo, micros, trainer.trainable)[0] for micros in minis]
    return sum(losses), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trainer.trainable]


def perturbed_experience(trainer, step=1):
    """A step's experience with random advantages, shifted old log-probs (so some ratios clip) and,
    for DAPO, one group dropped: a gradient with every term of the loss in it."""
    exp = trainer.algo.experience(step)
    g = torch.Generator().manual_seed(step)
    n = exp.batch.num_response_tokens
    t = exp.tensors
    t["advantages"] = torch.randn(n, generator=g)
    t["old_logp"] = t["old_logp"] + 0.3 * torch.randn(n, generator=g)
    if "returns" in t:
        t["returns"] = torch.randn(n, generator=g)
    if trainer.algo.name == "dapo":
        keep = torch.tensor([1.0] * 4 + [0.0] * 4)  # the second prompt's group filtered out
        t["mask"] = exp.batch.per_token(keep)
    return exp


@pytest.mark.parametrize("algo", ["grpo", "dapo", "dr_grpo", "ppo"])
def test_micro_batched_gradients_equal_the_unsplit_ones(algo, small_lm, tmp_path):
    trainer = make_trainer(algo, small_lm, tmp_path, "--kl-coef", "0.05")
    exp = perturbed_experience(trainer)
    assert trainer.algo.config.aggregation == {"grpo": "seq_mean_token_mean", "dapo": "token_mean",
                                               "dr_grpo": "token_sum_norm", "ppo": "token_mean"}[algo]
    whole_loss, whole = gradients(trainer, [[exp]])
    assert sum(float(g.abs().sum()) for g in whole) > 0
    if algo == "ppo":  # the critic's gradient is part of the comparison
        critic = {id(p) for p in trainer.critic_eval.parameters()}
        assert any(float(g.abs().sum()) > 0 for p, g in zip(trainer.trainable, whole) if id(p) in critic)
    for size in (1, 3):
        minis = split_experience(exp, mini_batches=1, micro_batch_size=size)
        assert len(minis) == 1 and len(minis[0]) == -(-8 // size)
        split_loss, split = gradients(trainer, minis)
        assert split_loss == pytest.approx(whole_loss, abs=1e-5)
        for a, b in zip(whole, split):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_unnormalised_micro_losses_would_differ(small_lm, tmp_path):
    """The check above can fail: averaging micro-batch means (no step totals) changes the gradient."""
    trainer = make_trainer("dapo", small_lm, tmp_path)
    exp = perturbed_experience(trainer)
    _, whole = gradients(trainer, [[exp]])
    micros = [m for m in split_experience(exp, mini_batches=1, micro_batch_size=3)[0]]
    for m in micros:
        m.totals = None  # each micro-batch normalised by its own token count
    _, naive = gradients(trainer, [micros])
    assert max(float((a - b).abs().max()) for a, b in zip(whole, naive)) > 1e-4


def test_scoring_passes_in_chunks_match(small_lm, tmp_path):
    trainer = make_trainer("ppo", small_lm, tmp_path, "--kl-coef", "0.05")
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    responses = [[5, 6], [7], [8, 9, 10], [11, 12]]
    batch = make_token_batch(prompts, responses, trainer.tokenizer.pad_token_id, trainer.device)
    with torch.no_grad():
        score = lambda b: token_logprobs(trainer.policy_eval, b, return_entropy=True)
        whole, chunked = score(batch), score_in_chunks(score, batch, 3)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    sub = batch.select(1, 3)
    assert sub.input_ids.shape == (2, 4) and sub.cu_seqlens.tolist() == [0, 1, 4]
    assert sub.labels.tolist() == [7, 8, 9, 10] and sub.rows.tolist() == [0, 1, 1, 1]


def test_mini_batches_take_several_optimiser_steps(small_lm, tmp_path):
    trainer = make_trainer("grpo", small_lm, tmp_path, "--mini-batches", "2", "--micro-batch-size", "3",
                           "--epochs-per-step", "2", "--max-steps", "1")
    records = trainer.train()
    assert not records[0]["skipped"] and records[0]["loss"] is not None
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {4}  # 2 epochs x 2 mini-batches
    exp = trainer.algo.experience(2)
    minis = split_experience(exp, mini_batches=2, micro_batch_size=3)
    assert [[m.batch.num_sequences for m in mini] for mini in minis] == [[3, 1], [3, 1]]


def test_micro_batched_run_matches_the_unsplit_run(tiny_dir, tmp_path):
    """Two optimiser steps of DAPO on the warm-started tiny model (its rewards differ within groups),
    end to end: the same weights with and without micro-batches, and not the initial ones."""
    weights = []
    for flags in ([], ["--micro-batch-size", "3"]):
        trainer = make_trainer("dapo", str(tiny_dir), tmp_path / str(len(flags)), "--max-steps", "2", *flags)
        initial = [p.detach().clone() for p in trainer.lm.parameters()]
        trainer.train()
        weights.append([p.detach().clone() for p in trainer.lm.parameters()])
    assert any(not torch.equal(a, b) for a, b in zip(initial, weights[0]))
    # Adam's step m/(sqrt(v) + eps) is about ±lr (2e-4) for any gradient far above eps, so an element whose
    # gradient is near 0 moves by a share of lr that the micro-batches' other summation order can shift:
    # seen 1.1e-5 on 1 of 16384 elements on an Intel Xeon (MKL's GEMMs round differently there). atol is a
    # quarter of one step; a wrong micro-batch split moves whole tensors by about lr.
    for a, b in zip(*weights):
        torch.testing.assert_close(b, a, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1"),
    (["--mini-batches", "0"], "--mini-batches must be >= 1"),
    (["--mini-batches", "9"], "exceeds the 8 sequences"),
    (["--algo", "online_dpo", "--micro-batch-size", "2"], "not supported with --algo online_dpo"),
])
def test_bad_micro_batch_flags(flags, message):
    with pytest.raises(UserInputError, match=message):
        parse_config([*QUICK, *flags])
