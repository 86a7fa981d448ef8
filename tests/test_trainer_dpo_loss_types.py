"""--dpo-loss-type: every loss type of fastpo.dpo_loss (TRL 1.16's) trains in the bundled trainer."""

import json
import math

import pytest
import torch

import fastpo
from fastpo.dpo import DPO_LOSS_TYPES
from fastpo.trainer.batch import token_logprobs
from fastpo.trainer.cli import parse_config
from fastpo.trainer.errors import UserInputError
from fastpo.trainer.loop import Trainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fastpo.trainer.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("dpo_types")
    build_tiny_model(root / "lm", seed=0, steps=0, log=None, eval_examples=0)
    pairs = root / "pairs.jsonl"
    rows = [("1+2=", "3", "4"), ("5+5=", "10", "11"), ("7-3=", "4", "13")]
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    return str(root / "lm"), str(pairs)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_every_loss_type_trains(loss_type, setup, tmp_path):
    lm, pairs = setup
    smoothing = ["--label-smoothing", "0.001"] if loss_type == "exo_pair" else []
    trainer = Trainer(parse_config(["--algo", "dpo", "--model", lm, "--data", pairs, "--prompts-per-step", "3",
                                    "--dpo-loss-type", loss_type, *smoothing, "--no-progress",
                                    "--output-dir", str(tmp_path)]))
    exp = trainer.algo.experience(1)
    loss, _ = trainer.algo.loss(exp)
    # the same loss from fastpo.dpo_loss called directly, with the inputs the type needs
    batch = exp.batch
    token_logp = token_logprobs(trainer.policy, batch)
    seq = fastpo.sequence_logprobs(token_logp, cu_seqlens=batch.cu_seqlens, average=loss_type == "ipo")
    ref = exp.tensors["ref_logp"]
    extra = {}
    if loss_type == "sft":
        chosen = torch.zeros_like(token_logp, dtype=torch.bool)
        chosen[:int(batch.cu_seqlens[3])] = True
        extra["nll"] = -token_logp[chosen].mean()
    if loss_type == "sigmoid_norm":
        extra.update(chosen_lengths=batch.lengths[:3], rejected_lengths=batch.lengths[3:])
    expected = fastpo.dpo_loss(seq[:3], seq[3:], ref[:3], ref[3:], beta=0.1, loss_type=loss_type,
                               label_smoothing=0.001 if smoothing else 0.0, **extra).loss
    torch.testing.assert_close(loss, expected)
    record, updated = trainer.train_step(1)
    assert updated and math.isfinite(record["loss"])


def test_exo_pair_needs_label_smoothing():
    with pytest.raises(UserInputError, match="--label-smoothing > 0"):
        parse_config(["--algo", "dpo", "--data", "x.jsonl", "--dpo-loss-type", "exo_pair"])
    with pytest.raises(UserInputError, match="--label-smoothing must be in"):
        parse_config(["--label-smoothing", "0.5"])
    with pytest.raises(UserInputError, match="unknown value 'kto'"):
        parse_config(["--dpo-loss-type", "kto"])
