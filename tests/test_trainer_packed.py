"""--padding-free: the packed decoder forward (sequences back to back, position_ids restarting)
gives the padded forward's log-probs, values and gradients, and attention stays inside each sequence."""

import warnings

import pytest
import torch

from fastpo.trainer.batch import make_token_batch, token_logprobs
from fastpo.trainer.cli import parse_config
from fastpo.trainer.config import TrainConfig
from fastpo.trainer.errors import UserInputError
from fastpo.trainer.loop import Trainer
from fastpo.trainer.microbatch import accumulate_gradients, split_experience
from fastpo.trainer.models import values_of
from fastpo.trainer import packing
from fastpo.trainer.packing import (PaddingFreeWarning, pack_inputs, padding_fraction, padding_free_warning,
                                    resolve_padding_free)

QUICK = ["--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "4", "--no-progress"]
PROMPTS = [[5, 6, 7], [8, 9], [6], [7, 8, 9, 10, 11, 12]]
RESPONSES = [[10, 11], [12, 13, 14, 4], [5, 6], []]


def make_trainer(small_lm, tmp_path, *flags):
    cfg = parse_config(["--model", small_lm, *QUICK, "--output-dir", str(tmp_path), *flags])
    return Trainer(cfg)


def test_pack_inputs_layout():
    batch = make_token_batch(PROMPTS, RESPONSES, 0, torch.device("cpu"))
    ids, position_ids, index = pack_inputs(batch.input_ids, batch.attention_mask, batch.rows, batch.positions)
    lengths = [len(p) + len(r) for p, r in zip(PROMPTS, RESPONSES)]
    assert ids.tolist() == [[t for p, r in zip(PROMPTS, RESPONSES) for t in p + r]]
    assert position_ids.tolist() == [[i for n in lengths for i in range(n)]]
    # each response token is scored by the packed position just before it
    assert ids[0, index + 1].tolist() == batch.labels.tolist()
    with pytest.raises(ValueError, match="right-padded"):
        pack_inputs(batch.input_ids, batch.attention_mask.flip(1), batch.rows, batch.positions)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        pack_inputs(batch.input_ids[0], batch.attention_mask[0], batch.rows, batch.positions)


def test_padding_fraction():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    assert padding_fraction(mask) == pytest.approx(1 - 10 / 16)
    # micro-batches of 2 are trimmed to their own longest: 2*4 + 2*3 positions
    assert padding_fraction(mask, 2) == pytest.approx(1 - 10 / 14)
    assert padding_fraction(mask, 1) == 0.0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_attention_does_not_leak_across_sequences(attn, small_lm):
    """Changing one sequence's tokens leaves the other packed sequences' hidden states as they were;
    the same row read as one sequence (no restart in position_ids) is changed (so the check can fail)."""
    from transformers import AutoModelForCausalLM

    decoder = AutoModelForCausalLM.from_pretrained(small_lm, attn_implementation=attn).get_decoder()
    assert decoder.config._attn_implementation == attn
    lengths = [4, 6, 3]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 16, (1, sum(lengths)), generator=g)
    other = ids.clone()
    other[0, :lengths[0]] = torch.randint(4, 16, (lengths[0],), generator=g)
    restart = torch.tensor([[i for n in lengths for i in range(n)]])
    run = lambda x, pos: decoder(input_ids=x, position_ids=pos, use_cache=False).last_hidden_state[0]
    rest = slice(lengths[0], None)
    with torch.no_grad():
        torch.testing.assert_close(run(other, restart)[rest], run(ids, restart)[rest], atol=1e-6, rtol=0)
        assert float((run(other, restart)[:lengths[0]] - run(ids, restart)[:lengths[0]]).abs().max()) > 1e-3
        one = torch.arange(sum(lengths))[None]
        assert float((run(other, one)[rest] - run(ids, one)[rest]).abs().max()) > 1e-3
        # and each packed sequence equals that sequence run alone
        start = 0
        for n in lengths:
            alone = run(ids[:, start:start + n], torch.arange(n)[None])
            torch.testing.assert_close(run(ids, restart)[start:start + n], alone, atol=2e-6, rtol=1e-5)
            start += n


@pytest.mark.parametrize("extra", [[], ["--gradient-checkpointing"], ["--lora-rank", "4"]],
                         ids=["full", "checkpointing", "lora"])
def test_packed_scores_equal_padded(extra, small_lm, tmp_path):
    packed = make_trainer(small_lm, tmp_path / "a", "--algo", "ppo", "--padding-free", "--micro-batch-size", "4",
                          *extra)
    padded = make_trainer(small_lm, tmp_path / "b", "--algo", "ppo", *extra)
    assert packed.precision.padding_free and not padded.precision.padding_free
    assert packed.critic_eval.precision.padding_free and packed.ref.precision.padding_free
    randomise(packed)
    padded.lm.load_state_dict(packed.lm.state_dict())
    padded.critic_eval.load_state_dict(packed.critic_eval.state_dict())
    batch = make_token_batch(PROMPTS, RESPONSES, 0, packed.device)
    seen = record_decoder_inputs(packed)
    with torch.no_grad():
        for a, b in zip(token_logprobs(packed.policy_eval, batch, return_entropy=True),
                        token_logprobs(padded.policy_eval, batch, return_entropy=True)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(token_logprobs(packed.ref, batch), token_logprobs(padded.ref, batch),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values_of(packed.critic_eval, batch), values_of(padded.critic_eval, batch),
                                   atol=1e-5, rtol=1e-5)
    tokens = int(batch.attention_mask.sum())
    assert seen == [((1, tokens), False)] * 3  # policy, reference, critic: each one packed forward


def record_decoder_inputs(trainer):
    """The (input_ids shape, attention_mask given) of every forward of the policy's, the reference's and
    the critic's decoders."""
    seen = []
    ref = trainer.ref.lm if trainer.ref is not None and trainer.ref.lm is not trainer.lm else None
    hook = lambda module, args, kwargs: seen.append((tuple(kwargs["input_ids"].shape),
                                                     kwargs.get("attention_mask") is not None))
    for decoder in (trainer.lm.get_decoder(), ref and ref.get_decoder(), getattr(trainer.critic_eval, "backbone", None)):
        if decoder is not None:
            decoder.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def randomise(trainer, seed=0):
    """Random LoRA B matrices and critic head (both start at zero, which would hide their gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trainer.lm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        if trainer.critic_eval is not None:
            trainer.critic_eval.head.weight.copy_(0.1 * torch.randn(trainer.critic_eval.head.weight.shape, generator=g))


def step_gradients(trainer, exp):
    trainer.optimizer.zero_grad(set_to_none=True)
    minis = split_experience(exp, mini_batches=1, micro_batch_size=trainer.cfg.micro_batch_size)
    loss = sum(accumulate_gradients(trainer.algo, micros, trainer.trainable)[0] for micros in minis)
    return loss, [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trainer.trainable]


@pytest.mark.parametrize("algo, extra", [
    ("grpo", []),
    ("ppo", []),
    ("dapo", ["--micro-batch-size", "3", "--gradient-checkpointing"]),
    ("grpo", ["--lora-rank", "4", "--micro-batch-size", "3"]),
], ids=["grpo", "ppo-critic", "dapo-micro-checkpointing", "grpo-lora-micro"])
def test_packed_gradients_equal_padded(algo, extra, small_lm, tmp_path):
    flags = ["--algo", algo, "--kl-coef", "0.05", *extra]
    padded = make_trainer(small_lm, tmp_path / "padded", *flags)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        packed = make_trainer(small_lm, tmp_path / "packed", "--padding-free", *flags)
    # a dense [T, T] mask over the whole step is warned about; micro-batches bound it
    warned = any(issubclass(w.category, PaddingFreeWarning) for w in caught)
    assert warned == ("--micro-batch-size" not in extra)
    for t in (padded, packed):
        randomise(t)
    exp = padded.algo.experience(1)
    assert exp.metrics["padding_frac"] > 0  # the step's sequences differ in length: there is padding to skip
    g = torch.Generator().manual_seed(3)
    n = exp.batch.num_response_tokens
    exp.tensors["advantages"] = torch.randn(n, generator=g)
    exp.tensors["old_logp"] = exp.tensors["old_logp"] + 0.3 * torch.randn(n, generator=g)  # some ratios clip
    with torch.no_grad():
        torch.testing.assert_close(packed.algo.old_policy(exp.batch)[0], padded.algo.old_policy(exp.batch)[0],
                                   atol=1e-5, rtol=1e-5)
    loss_padded, grads_padded = step_gradients(padded, exp)
    seen = record_decoder_inputs(packed)
    loss_packed, grads_packed = step_gradients(packed, exp)
    assert seen and all(shape[0] == 1 and not masked for shape, masked in seen)  # every forward was packed
    assert sum(float(g.abs().sum()) for g in grads_padded) > 0
    assert loss_packed == pytest.approx(loss_padded, abs=1e-5)
    for a, b in zip(grads_padded, grads_packed):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_packed_run_matches_the_padded_run(small_lm, tmp_path):
    """Two GRPO steps end to end (rollout, scoring, update): the same weights packed and padded."""
    weights = []
    for flags in (["--no-padding-free"], ["--padding-free"]):
        trainer = make_trainer(small_lm, tmp_path / flags[0], "--max-steps", "2", "--micro-batch-size", "4", *flags)
        initial = [p.detach().clone() for p in trainer.lm.parameters()]
        records = trainer.train()
        assert all(not r["skipped"] and 0 < r["padding_frac"] < 1 for r in records)
        weights.append([p.detach().clone() for p in trainer.lm.parameters()])
    assert any(not torch.equal(a, b) for a, b in zip(initial, weights[0]))
    for a, b in zip(*weights):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_default_and_flash_attention_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_padding_free(None, cpu, torch.float32) == (False, None)  # CPU: padded by default
    assert resolve_padding_free(True, cpu, torch.bfloat16) == (True, None)  # transformers' block-diagonal mask
    assert resolve_padding_free(None, cuda, torch.float32) == (False, None)  # flash-attn has no fp32 kernel
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: True)
    assert packing.varlen_attention_available(cuda, torch.bfloat16)
    assert resolve_padding_free(None, cuda, torch.bfloat16) == (True, "flash_attention_2")
    assert resolve_padding_free(False, cuda, torch.bfloat16) == (False, None)
    assert padding_free_warning(True, None, None) is not None
    assert padding_free_warning(True, None, 8) is None and padding_free_warning(True, "flash_attention_2", None) is None
    assert padding_free_warning(False, None, None) is None


@pytest.mark.parametrize("value", ["yes", 1, 0.5])
def test_bad_padding_free_values(value, tmp_path):
    with pytest.raises(UserInputError, match="--padding-free: expected true or false"):
        TrainConfig(padding_free=value).validate()
    config = tmp_path / "c.yaml"
    config.write_text(f"padding_free: {value!r}\n")
    with pytest.raises(UserInputError, match="padding_free: expected bool"):
        parse_config(["--config", str(config)])


def test_bad_padding_free_flag(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--padding-free=yes"])
    assert "--padding-free" in capsys.readouterr().err


def test_benchmark_configurations_parse(tmp_path):
    """benchmarks/trainer.py's 16 configurations are valid runs of the trainer, and its table has one
    line per configuration with the packed/padded ratios on the packed lines."""
    from benchmarks.trainer import CONFIGS, markdown, trainer_flags

    assert len(CONFIGS) == 16
    for config in CONFIGS:
        cfg = parse_config(trainer_flags(config, str(tmp_path), 3, 0))
        assert (cfg.padding_free, cfg.micro_batch_size, cfg.gradient_checkpointing, cfg.lora_rank) == tuple(config.values())
        assert cfg.task == "countdown"
    rows = [{**c, "step_s": 1.0, "update_s": 0.5 if c["padding_free"] else 1.0, "peak_mib": 2.0, "padding_frac": 0.1}
            for c in CONFIGS]
    lines = markdown(rows).splitlines()[2:]
    assert len(lines) == 16 and all(("0.50x" in line) == line.startswith("| packed") for line in lines)
