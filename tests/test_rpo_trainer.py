"""``fastpo train --algo rpo``: offline pairs as ``dpo``, plus --rpo-alpha x the chosen responses' token-mean NLL."""

import json

import pytest

from fastpo.trainer.cli import parse_config
from fastpo.trainer.errors import UserInputError
from fastpo.trainer.loop import Trainer
from fastpo.trainer.reporting import read_metrics

QUICK = ["--prompts-per-step", "3", "--max-steps", "2", "--no-progress", "--seed", "3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fastpo.trainer.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("rpo")
    build_tiny_model(root / "lm", seed=0, steps=0, log=None, eval_examples=0)
    pairs = root / "pairs.jsonl"
    rows = [("1+2=", "3", "4"), ("5+5=", "10", "11"), ("7-3=", "4", "3"), ("9+9=", "18", "81")]
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    return str(root / "lm"), str(pairs)


def _run(setup, tmp_path, name, *args):
    lm, pairs = setup
    cfg = parse_config(["--model", lm, "--data", pairs, *QUICK, *args, "--output-dir", str(tmp_path / name)])
    Trainer(cfg).train()
    return read_metrics(tmp_path / name / "metrics.jsonl")


def test_rpo_is_dpo_plus_alpha_nll(setup, tmp_path):
    """Same pairs (same seed): step 1's RPO loss = DPO loss + α·NLL; α = 0 is DPO; the NLL is logged."""
    dpo = _run(setup, tmp_path, "dpo", "--algo", "dpo")
    rpo = _run(setup, tmp_path, "rpo", "--algo", "rpo", "--rpo-alpha", "0.5")
    rpo0 = _run(setup, tmp_path, "rpo0", "--algo", "rpo", "--rpo-alpha", "0")
    first, d = rpo[0], dpo[0]
    assert first["nll_loss"] > 0 and "nll_loss" not in d
    assert first["loss"] == pytest.approx(d["loss"] + 0.5 * first["nll_loss"], rel=1e-5)
    assert rpo0[0]["loss"] == pytest.approx(d["loss"], rel=1e-6)
    assert [r["step"] for r in rpo] == [1, 2]
    # the NLL term pulls the chosen responses up: after a step their NLL is lower than under plain DPO
    assert rpo[1]["nll_loss"] < rpo0[1]["nll_loss"]


@pytest.mark.parametrize("args,fragment", [
    (["--rpo-alpha", "-1"], "--rpo-alpha"), (["--rpo-alpha", "nan"], "--rpo-alpha"),
    (["--rollout", "vllm"], "offline rpo"),
])
def test_rpo_flag_errors(setup, tmp_path, args, fragment):
    lm, pairs = setup
    with pytest.raises(UserInputError, match=fragment):
        parse_config(["--algo", "rpo", "--model", lm, "--data", pairs, *args, "--output-dir", str(tmp_path)])


def test_rpo_needs_pairs(tmp_path):
    with pytest.raises(UserInputError, match="--algo rpo trains on preference pairs"):
        parse_config(["--algo", "rpo", "--output-dir", str(tmp_path)])
