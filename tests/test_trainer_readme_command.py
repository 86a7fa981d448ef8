"""The README's real-model command (GRPO + LoRA + micro-batches + a GSM8K-format file + the math reward +
evaluation), run as written but at tiny scale: the tiny model on CPU, a few steps, short answers."""

import json
import re
import shlex
from pathlib import Path

import pytest

from fastpo.trainer.cli import parse_config
from fastpo.trainer.loop import Trainer
from fastpo.trainer.reporting import read_metrics

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
# what changes for the tiny scale: the model, the device, the sizes; every other flag is the README's
TINY = {"--device": "cpu", "--max-new-tokens": "4", "--micro-batch-size": "2", "--lora-rank": "4",
        "--eval-every": "2", "--lr": "1e-3", "--warmup-steps": "1"}


def readme_command():
    section = README.split("### Real models: data, rewards, micro-batches, LoRA, evaluation", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    command = block.split("\nfastpo train --task countdown", 1)[0].replace("\\\n", " ")
    argv = shlex.split(command)
    assert argv[:2] == ["fastpo", "train"]
    return argv[2:]


def tiny_scale(argv, model, out):
    args, i = [], 0
    while i < len(argv):
        flag = argv[i]
        takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        value = argv[i + 1] if takes_value else None
        if flag == "--model":
            value = model
        elif flag in TINY:
            value = TINY[flag]
        args += [flag] + ([value] if value is not None else [])
        i += 2 if takes_value else 1
    return args + ["--max-steps", "4", "--prompts-per-step", "2", "--group-size", "2", "--no-progress",
                   "--output-dir", str(out)]


def test_the_readme_command_runs_at_tiny_scale(small_lm, tmp_path, monkeypatch):
    argv = readme_command()
    for flag in ("--lora-rank", "--micro-batch-size", "--reward", "--eval-every", "--eval-data", "--task"):
        assert flag in argv, f"the README command lost {flag}"
    rows = [{"question": f"{a}+{b}=", "answer": f"{a} plus {b} #### {a + b}"} for a, b in ((1, 2), (3, 4), (5, 1))]
    for name in ("gsm8k_train.jsonl", "gsm8k_test.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)                       # the README names the data files relative to the cwd
    cfg = parse_config(tiny_scale(argv, small_lm, tmp_path / "run"))
    assert cfg.lora_rank == 4 and cfg.micro_batch_size == 2 and cfg.eval_every == 2
    records = Trainer(cfg).train()
    assert len(records) == 4
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [m["step"] for m in metrics if "eval_accuracy" in m]
    assert evals == [2, 4]
    assert (tmp_path / "run" / "eval.png").is_file() or pytest.importorskip("matplotlib") is None
