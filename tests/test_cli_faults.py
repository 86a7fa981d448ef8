"""``fastpo train`` / ``fastpo bench`` / ``fastpo`` under faults (issue 20 §5): bad flags, a used or
bad ``--output-dir``, broken checkpoints and metrics on ``--resume``, changed settings on resume,
misbehaving reward functions, no matplotlib, a crash mid-save, and SIGINT followed by ``--resume``.

Every case ends in a clear message (exit status 2, no traceback) or a documented recovery."""

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing
import warnings
from pathlib import Path

import pytest

from fastpo.cli import main as fastpo_main
from fastpo.trainer.checkpoint import CheckpointWarning
from fastpo.trainer.config import NUMERIC_RANGES, ResumeWarning, TrainConfig, config_fields
from fastpo.trainer.errors import UserInputError
from fastpo.trainer.reporting import ReportWarning, read_metrics
from fastpo.trainer.rewards import RewardFunction, RewardTerm, RewardTimeout, RewardWarning, call_with_timeout
from test_trainer import QUICK, ROOT, cli_error, run

steps_of = lambda out: [r["step"] for r in read_metrics(Path(out) / "metrics.jsonl")]


# ---- flags ---------------------------------------------------------------------------------------

BAD_FLAGS = [("--top-p", "0"), ("--top-p", "1.5"), ("--gamma", "1.5"), ("--gamma", "-0.1"), ("--lam", "2"),
             ("--beta", "0"), ("--rollout-is-cap", "0"), ("--kl-coef", "-1"), ("--lr", "nan"), ("--lr", "0"),
             ("--temperature", "inf"), ("--weight-decay", "-1"), ("--max-grad-norm", "-1"), ("--vf-coef", "nan"),
             ("--critic-lr", "0"), ("--seed", "-1"), ("--max-steps", "0"), ("--reward-timeout", "-1"),
             ("--save-every", "-2")]


@pytest.mark.parametrize("flag,value", BAD_FLAGS, ids=[f"{f}={v}" for f, v in BAD_FLAGS])
def test_bad_numeric_flag_is_refused_before_any_model_loads(flag, value, capsys, tmp_path):
    # a missing --model would be reported if the flag were checked only after the model loads
    err = cli_error([flag, value, "--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "o")],
                    capsys)
    assert flag in err and "must be" in err and "no such directory" not in err


def test_every_numeric_setting_has_a_range_and_rejects_nan():
    hints = typing.get_type_hints(TrainConfig)
    numeric = {f.name for f in config_fields()
               if {int, float} & set(typing.get_args(hints[f.name]) or [hints[f.name]])}
    assert numeric == set(NUMERIC_RANGES)
    for f in config_fields():
        if f.name in numeric and float in (typing.get_args(hints[f.name]) or [hints[f.name]]):
            with pytest.raises(UserInputError, match=f"--{f.name.replace('_', '-')}"):
                dataclasses.replace(TrainConfig(), **{f.name: math.nan}).validate()


def test_fastpo_without_a_command_and_bench_without_cases_exit_non_zero(capsys):
    assert fastpo_main([]) == 2
    assert "usage: fastpo" in capsys.readouterr().err
    assert fastpo_main(["bench", "--max-cases", "0"]) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "--max-cases must be >= 1" in err


# ---- the output directory ------------------------------------------------------------------------

def test_output_dir_that_is_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        err = cli_error(["--output-dir", str(out), "--model", str(tmp_path / "no-model")], capsys)
        assert "--output-dir" in err and "not a directory" in err


def test_a_used_output_dir_is_refused_unless_resume_or_overwrite(small_lm, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--model", small_lm, *QUICK, "--save-every", "1", "--output-dir", str(out)]
    run(args + ["--max-steps", "2"], out)
    err = cli_error(args + ["--max-steps", "1"], capsys)
    assert "previous run" in err and "--resume" in err and "--overwrite" in err
    (out / "notes.txt").write_text("mine")
    run(args + ["--max-steps", "1", "--overwrite"], out)  # the old run's checkpoint-2 goes with it
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are deleted
    run(args + ["--max-steps", "2", "--resume"], out)
    assert steps_of(out) == [1, 2]  # was [1, 2, 4]-style mixing of two runs before
    assert "contradict" in cli_error(args + ["--resume", "--overwrite"], capsys)


# ---- --resume with broken files ------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_checkpoints(small_lm, tmp_path_factory):
    """A finished 2-step run with checkpoint-1 and checkpoint-2."""
    out = tmp_path_factory.mktemp("base") / "run"
    run(["--model", small_lm, "--max-steps", "2", "--save-every", "1", *QUICK], out)
    return out


def resume_args(small_lm, out, steps=2):
    return ["--model", small_lm, "--max-steps", str(steps), "--save-every", "1", *QUICK, "--resume",
            "--output-dir", str(out)]


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def empty_dir(path: Path):
    shutil.rmtree(path)
    path.mkdir()


FAULTS = {
    "truncated_safetensors": (lambda c: truncate(c / "policy" / "model.safetensors"), "model.safetensors"),
    "truncated_trainer_state": (lambda c: truncate(c / "trainer_state.pt"), "trainer_state.pt"),
    "deleted_trainer_state": (lambda c: (c / "trainer_state.pt").unlink(), "trainer_state.pt"),  # optimiser state
    "deleted_policy": (lambda c: shutil.rmtree(c / "policy"), "policy"),
    "empty_checkpoint_dir": (empty_dir, "is empty"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_resume_skips_a_broken_checkpoint_with_a_warning(fault, two_checkpoints, small_lm, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    breaks, named = FAULTS[fault]
    breaks(out / "checkpoint-2")
    with pytest.warns(CheckpointWarning, match=named):
        records = run(resume_args(small_lm, out), out)
    assert [r["step"] for r in records] == [2]  # redone from checkpoint-1
    assert steps_of(out) == [1, 2]
    assert (out / "checkpoint-2" / "trainer_state.pt").is_file()  # rewritten whole


def test_resume_with_no_usable_checkpoint_lists_each_problem(two_checkpoints, small_lm, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    truncate(out / "checkpoint-2" / "policy" / "model.safetensors")
    shutil.rmtree(out / "checkpoint-1" / "policy")
    with pytest.warns(CheckpointWarning, match="checkpoint-2"):
        err = cli_error(resume_args(small_lm, out), capsys)
    assert "no usable checkpoint" in err and "model.safetensors" in err and "checkpoint-1" in err


def test_resume_drops_a_torn_last_metrics_line(two_checkpoints, small_lm, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward_me')  # killed mid-write
    with pytest.warns(ReportWarning, match="metrics.jsonl:3"):
        run(resume_args(small_lm, out, steps=3), out)
    assert steps_of(out) == [1, 2, 3]


def test_resume_with_a_deleted_metrics_file_warns(two_checkpoints, small_lm, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    (out / "metrics.jsonl").unlink()
    with pytest.warns(ReportWarning, match="missing"):
        run(resume_args(small_lm, out, steps=3), out)
    assert steps_of(out) == [3]


def test_a_corrupt_metrics_line_before_the_last_names_path_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(UserInputError, match="metrics.jsonl:2"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_resume_with_another_algo_is_refused(two_checkpoints, small_lm, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    err = cli_error(resume_args(small_lm, out, steps=3) + ["--algo", "dapo"], capsys)
    assert "--algo 'grpo'" in err and "'dapo'" in err


def test_resume_with_changed_settings_warns_and_uses_them(two_checkpoints, small_lm, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    args = resume_args(small_lm, out, steps=3) + ["--group-size", "2", "--lr", "1e-3"]
    with pytest.warns(ResumeWarning, match=r"--group-size 4 -> 2.*--lr 0.0002 -> 0.001"):
        records = run(args, out)
    assert [r["step"] for r in records] == [3]


# ---- checkpoints are written atomically -----------------------------------------------------------

def test_a_crash_while_saving_leaves_the_previous_checkpoint(small_lm, tmp_path, monkeypatch):
    import fastpo.trainer.checkpoint as ckpt

    out = tmp_path / "run"
    real_save, calls = ckpt.torch.save, []

    def failing_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # step 2's trainer_state.pt: the disk fills up mid-save
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(UserInputError, match=r"checkpoint-2 .*No space left on device.*checkpoint-1\) is intact"):
        run(["--model", small_lm, "--max-steps", "2", "--save-every", "1", *QUICK], out)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / ".checkpoint-2.tmp").is_dir()  # the half-written one, never read
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # checkpoint-1 is whole: nothing is skipped
        records = run(resume_args(small_lm, out), out)
    assert [r["step"] for r in records] == [2] and steps_of(out) == [1, 2]
    assert not (out / ".checkpoint-2.tmp").exists()


# ---- reward functions ------------------------------------------------------------------------------

def test_call_with_timeout_interrupts_a_sleep_and_a_loop():
    def busy():
        end = time.monotonic() + 20
        while time.monotonic() < end:
            pass
        return 1.0

    for fn in (lambda: time.sleep(20), busy):
        with pytest.raises(RewardTimeout, match="--reward-timeout 0.2"):
            call_with_timeout(fn, (), 0.2)
    assert call_with_timeout(lambda x: x + 1, (1,), 0.2) == 2
    assert call_with_timeout(lambda x: x + 1, (1,), None) == 2


def test_call_with_timeout_off_the_main_thread_abandons_the_call():
    outcome = {}

    def worker():
        try:
            call_with_timeout(time.sleep, (20,), 0.2)
        except RewardTimeout as exc:
            outcome["error"] = str(exc)

    t = threading.Thread(target=worker)
    t.start()
    t.join(15)
    assert "background thread" in outcome.get("error", "")


@pytest.mark.parametrize("returns,message", [
    (lambda: None, "expected a float"), (lambda: "1.0", "expected a float"), (lambda: [1.0], "expected a float"),
    (lambda: math.nan, "non-finite"), (lambda: math.inf, "non-finite"), (lambda: sys.exit(3), "sys.exit(3)"),
    (lambda: time.sleep(20), "--reward-timeout"),
])
def test_a_misbehaving_reward_scores_zero_with_a_warning_and_a_count(returns, message):
    rf = RewardFunction([RewardTerm.user(lambda p, c: returns(), name="bad")], timeout=0.2)
    with pytest.warns(RewardWarning, match=re.escape(message)):
        assert rf(["p", "q"], ["a", "b"]) == [0.0, 0.0]
    assert rf.failures["bad"] == 2


def test_reward_failures_are_counted_in_metrics(small_lm, tmp_path):
    module = tmp_path / "always_fails.py"
    module.write_text("def reward(prompt, completion):\n    raise RuntimeError('down')\n")
    with pytest.warns(RewardWarning, match="down"):
        run(["--model", small_lm, "--max-steps", "2", *QUICK, "--reward", f"{module}:reward"], tmp_path / "run")
    assert [r["reward_failures"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [16, 16]


def test_a_hanging_or_exiting_reward_does_not_stop_training(small_lm, tmp_path):
    module = tmp_path / "rogue.py"
    module.write_text("import sys, time\n"
                      "def reward(prompt, completion):\n"
                      "    if len(completion) % 2:\n"
                      "        sys.exit(3)\n"
                      "    time.sleep(10 ** 6)\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fastpo", "train", "--model", small_lm, "--max-steps", "1", *QUICK,
                           "--reward", f"{module}:reward", "--reward-timeout", "0.3", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "--reward-timeout 0.3" in proc.stderr or "sys.exit(3)" in proc.stderr
    assert read_metrics(out / "metrics.jsonl")[0]["reward_failures"] == 16


# ---- the plot --------------------------------------------------------------------------------------

def test_without_matplotlib_the_run_succeeds_without_a_plot(small_lm, tmp_path, monkeypatch, capsys):
    from fastpo.trainer.cli import main as train_main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.warns(ReportWarning, match="matplotlib"):
        code = train_main(["--model", small_lm, "--max-steps", "1", *QUICK, "--output-dir", str(tmp_path / "r")])
    assert code == 0
    assert not (tmp_path / "r" / "reward.png").exists()
    assert "reward.png" not in capsys.readouterr().out


# ---- data ------------------------------------------------------------------------------------------

def test_non_utf8_data_names_the_line(capsys, tmp_path, small_lm):
    data = tmp_path / "prompts.jsonl"
    data.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "\xff", "answer": "2"}\n')
    err = cli_error(["--task", "jsonl", "--data", str(data), "--model", small_lm, "--output-dir", str(tmp_path / "o")],
                    capsys)
    assert "prompts.jsonl:2" in err and "UTF-8" in err


@pytest.mark.parametrize("algo,line", [
    ("grpo", {"prompt": " ", "answer": "2"}), ("dpo", {"prompt": "", "chosen": "2", "rejected": "3"})])
def test_an_empty_prompt_names_the_line(algo, line, capsys, tmp_path, small_lm):
    data = tmp_path / "data.jsonl"
    good = {"prompt": "1+1=", "answer": "2"} if algo == "grpo" else {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    data.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    task = ["--task", "jsonl"] if algo == "grpo" else []
    err = cli_error(["--algo", algo, *task, "--data", str(data), "--model", small_lm, "--output-dir",
                     str(tmp_path / "o")], capsys)  # was an IndexError deep in generate()
    assert "data.jsonl:2" in err and "empty" in err


# ---- SIGINT, then --resume -------------------------------------------------------------------------

def test_sigint_then_resume_loses_no_step_and_repeats_no_line(small_lm, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastpo", "train", "--model", small_lm, "--max-steps", "500", "--save-every", "0",
           *QUICK, "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 300
        while len(steps_of(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    done = steps_of(out)
    assert done == list(range(1, len(done) + 1)) and len(done) >= 2
    assert (out / f"checkpoint-{done[-1]}" / "trainer_state.pt").is_file()  # the last completed step
    records = run(["--model", small_lm, "--max-steps", str(done[-1] + 1), "--save-every", "0", *QUICK, "--resume"],
                  out)
    assert [r["step"] for r in records] == [done[-1] + 1]
    assert steps_of(out) == list(range(1, done[-1] + 2))
