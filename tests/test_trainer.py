"""The bundled trainer (``fastpo train``) end to end on CPU with tiny models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastpo.trainer.cli import main as train_main
from fastpo.trainer.cli import parse_config
from fastpo.trainer.config import ALGORITHMS
from fastpo.trainer.loop import NonFiniteLossWarning, Trainer
from fastpo.trainer.reporting import REQUIRED_KEYS, TIMING_KEYS, read_metrics
from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "4", "--no-progress"]


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [("1+2=", "3", "4"), ("5+5=", "10", "11"), ("7-3=", "4", "3"), ("9+9=", "18", "81")]
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    return str(path)


def run(args, out):
    cfg = parse_config(args + ["--output-dir", str(out)])
    return Trainer(cfg).train()


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_algorithm_runs_a_few_steps(algo, small_lm, pairs_file, tmp_path):
    extra = ["--data", pairs_file] if algo in ("dpo", "rpo") else []
    records = run(["--algo", algo, "--model", small_lm, "--max-steps", "2", *QUICK, *extra], tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert len(lines) == 2
    for line in lines:
        assert set(REQUIRED_KEYS) <= set(line)
        assert line["loss"] is not None and line["tokens_per_s"] > 0 and not line["skipped"]
    assert (tmp_path / "checkpoint-2" / "policy" / "model.safetensors").is_file()
    assert (tmp_path / "reward.png").is_file() or algo in ("dpo", "rpo")
    if algo not in ("dpo", "rpo", "online_dpo"):  # sampled tokens scored by generate and by the trainer agree (same weights)
        assert lines[0]["rollout_logp_abs_diff"] < 1e-4


def test_training_changes_the_policy_and_the_checkpoint_reloads(small_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    run(["--model", small_lm, "--max-steps", "2", *QUICK], tmp_path)
    before = AutoModelForCausalLM.from_pretrained(small_lm).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-2" / "policy").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_resume_repeats_an_uninterrupted_run(small_lm, tmp_path):
    common = ["--model", small_lm, "--max-steps", "4", "--save-every", "2", *QUICK]
    run(common, tmp_path / "a")
    run(common[:3] + ["2"] + common[4:], tmp_path / "b")  # stopped after step 2
    resumed = run(common + ["--resume"], tmp_path / "b")
    assert [r["step"] for r in resumed] == [3, 4]
    timing = set(TIMING_KEYS)
    b_lines = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in b_lines] == [1, 2, 3, 4]
    for x, y in zip(read_metrics(tmp_path / "a" / "metrics.jsonl"), b_lines):
        assert {k: v for k, v in x.items() if k not in timing} == {k: v for k, v in y.items() if k not in timing}


def test_ppo_resume_restores_the_critic(small_lm, tmp_path):
    common = ["--algo", "ppo", "--model", small_lm, "--max-steps", "3", "--save-every", "1", *QUICK]
    whole = read_metrics_after(common, tmp_path / "a")
    run(common[:5] + ["1"] + common[6:], tmp_path / "b")
    run(common + ["--resume"], tmp_path / "b")
    resumed = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["vf_loss"] for r in whole] == [r["vf_loss"] for r in resumed]


def read_metrics_after(args, out):
    run(args, out)
    return read_metrics(out / "metrics.jsonl")


def test_non_finite_loss_skips_the_step_and_writes_no_checkpoint(small_lm, tmp_path, monkeypatch):
    cfg = parse_config(["--model", small_lm, "--max-steps", "2", "--save-every", "1", *QUICK,
                        "--output-dir", str(tmp_path)])
    trainer = Trainer(cfg)
    real_loss = trainer.algo.loss
    calls = []

    def poisoned(exp):
        loss, metrics = real_loss(exp)
        calls.append(1)
        return (loss * float("nan"), metrics) if len(calls) == 2 else (loss, metrics)

    monkeypatch.setattr(trainer.algo, "loss", poisoned)
    weights = {k: v.clone() for k, v in trainer.lm.state_dict().items()}
    with pytest.warns(NonFiniteLossWarning, match="step 2"):
        records = trainer.train()
    assert [r["skipped"] for r in records] == [False, True]
    assert (tmp_path / "checkpoint-1").is_dir() and not (tmp_path / "checkpoint-2").exists()
    assert all(torch.isfinite(v).all() for v in trainer.lm.state_dict().values())
    assert any(not torch.equal(weights[k], v) for k, v in trainer.lm.state_dict().items())  # step 1 applied


def test_no_vocab_sized_logits_in_the_training_step(small_lm, tmp_path):
    """Outside generation, no tensor of shape [..., T, V] (3+ dims ending in the vocabulary) is made,
    and the lm_head module's forward (which would build [B, T, V] logits) never runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    cfg = parse_config(["--model", small_lm, "--max-steps", "1", *QUICK, "--output-dir", str(tmp_path),
                        "--kl-coef", "0.05"])
    trainer = Trainer(cfg)
    vocab = trainer.lm.get_output_embeddings().weight.shape[0]
    state = {"generating": False}
    offending = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not state["generating"]:
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor) and t.dim() >= 3 and t.shape[-1] == vocab:
                        offending.append((str(func), tuple(t.shape)))
            return out

    head = trainer.lm.get_output_embeddings()
    real_head_forward = head.forward

    def head_forward(*a, **k):
        if not state["generating"]:
            raise AssertionError("lm_head.forward ran in the training step: it builds [B, T, V] logits")
        return real_head_forward(*a, **k)

    head.forward = head_forward
    real_generate = trainer.rollout.generate

    def generate(*a, **k):
        state["generating"] = True
        try:
            return real_generate(*a, **k)
        finally:
            state["generating"] = False

    trainer.rollout.generate = generate
    assert trainer.ref is not None  # the reference forward is checked too
    with Watch():
        record, updated = trainer.train_step(1)
    assert updated and record["loss"] is not None
    assert offending == []


def test_the_watch_catches_logits(small_lm):
    """The guard above is not vacuous: a plain HF forward does trip it."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(small_lm)
    logits = lm(torch.tensor([[5, 6, 7]])).logits
    assert logits.dim() == 3 and logits.shape[-1] == lm.get_output_embeddings().weight.shape[0]


def test_reward_rises_on_the_builtin_task(tiny_cache, tiny_dir, tmp_path, monkeypatch):
    """The default run's recipe (every default but the step count) on the built-in tiny model: the
    last 40 steps' mean reward is clearly above the first 40 steps' (seeded: one fixed trajectory).
    Measured on 2-core CPUs with seeds 0, 1, 2: a rise of 0.09-0.10 after 200 steps."""
    monkeypatch.setenv("FASTPO_CACHE", str(tiny_cache))
    records = run(["--max-steps", "200", "--no-progress"], tmp_path / "run")
    rewards = [r["reward_mean"] for r in records]
    first, last = sum(rewards[:40]) / 40, sum(rewards[-40:]) / 40
    assert last > first + 0.04, (first, last, rewards)


def torchrun(script_args, tmp_path, timeout=240):
    port = free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "tests" / "trainer_ddp_worker.py"), str(tmp_path), *script_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes(mode, small_lm, tmp_path):
    flags = ["--fsdp"] if mode == "fsdp" else []
    ranks = torchrun(["--model", small_lm, "--max-steps", "2", *QUICK, *flags, "--output-dir", str(tmp_path / "run")],
                     tmp_path)
    assert ranks[0]["world"] == 2
    assert ranks[0]["checksum"] == ranks[1]["checksum"]        # one model: gradients were averaged
    assert ranks[0]["prompts"] != ranks[1]["prompts"]          # each rank drew its own prompts
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2   # rank 0 alone reports
    assert (tmp_path / "run" / "checkpoint-2" / "policy" / "model.safetensors").is_file()
    if mode == "fsdp":
        assert sorted(p.name for p in (tmp_path / "run" / "checkpoint-2").glob("optimizer-rank*.pt")) == [
            "optimizer-rank0.pt", "optimizer-rank1.pt"]


def test_fsdp_resume_repeats_an_uninterrupted_run(small_lm, tmp_path):
    common = ["--model", small_lm, "--save-every", "1", "--fsdp", *QUICK]
    whole = torchrun(common + ["--max-steps", "3", "--output-dir", str(tmp_path / "a")], tmp_path / "w")
    torchrun(common + ["--max-steps", "2", "--output-dir", str(tmp_path / "b")], tmp_path / "p")
    resumed = torchrun(common + ["--max-steps", "3", "--resume", "--output-dir", str(tmp_path / "b")], tmp_path / "r")
    timing = set(TIMING_KEYS)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
    assert strip(read_metrics(tmp_path / "a" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    assert whole[0]["checksum"] == resumed[0]["checksum"]


# ---- the CLI's user errors: a message, exit status 2, no traceback ---------------------------------

def cli_error(args, capsys):
    code = train_main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    return err


def test_cli_unknown_algorithm(capsys):
    err = cli_error(["--algo", "ppo2"], capsys)
    assert "--algo" in err and "'ppo2'" in err and "grpo" in err


def test_cli_missing_model_path(capsys, tmp_path):
    err = cli_error(["--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path)], capsys)
    assert "no such directory" in err and "nope" in err


def test_cli_malformed_jsonl_names_the_line(capsys, tmp_path, small_lm):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": 4\n')
    err = cli_error(["--task", "jsonl", "--data", str(data), "--model", small_lm, "--output-dir", str(tmp_path)],
                    capsys)
    assert "prompts.jsonl:2" in err


def test_cli_bad_config_file(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_stepz: 3\n")
    err = cli_error(["--config", str(cfg)], capsys)
    assert "max_stepz" in err


def test_config_file_sets_flags_and_flags_win(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("algo: dapo\nmax-steps: 7\nlr: 0.01\n")
    parsed = parse_config(["--config", str(cfg), "--max-steps", "3"])
    assert (parsed.algo, parsed.max_steps, parsed.lr) == ("dapo", 3, 0.01)


def test_raising_reward_function_gives_zero_and_training_continues(small_lm, tmp_path, capsys):
    module = tmp_path / "my_reward.py"
    module.write_text("def reward(prompt, completion):\n    raise RuntimeError('boom')\n")
    with pytest.warns(UserWarning, match="boom"):
        records = run(["--model", small_lm, "--max-steps", "2", *QUICK, "--reward", f"{module}:reward"],
                      tmp_path / "run")
    assert len(records) == 2 and all(r["loss"] is not None for r in records)


def test_cli_run_without_traceback_in_a_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastpo", "train", "--algo", "nope"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown value 'nope'" in proc.stderr
