"""``scripts/gpu_check.sh``: the parts that run without a GPU (arguments, dry run, the no-GPU exit)."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


def run(*args, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env, timeout=60)


def test_help_exits_zero_and_lists_the_options():
    proc = run("--help")
    assert proc.returncode == 0
    for word in ("--out", "--only", "--dry-run", "GPU_CHECK_TESTS_S"):
        assert word in proc.stdout


@pytest.mark.parametrize("args, env, message", [
    (("--bogus",), None, "unknown argument '--bogus'"),
    (("--only", "tests,lint"), None, "unknown phase 'lint'"),
    (("--only",), None, "--only needs a list of phases"),
    (("--out",), None, "--out needs a directory"),
    (("--dry-run",), {"GPU_CHECK_BENCH_S": "0"}, "GPU_CHECK_BENCH_S must be a positive whole number"),
    (("--dry-run",), {"GPU_CHECK_TRAIN_S": "1m"}, "GPU_CHECK_TRAIN_S must be a positive whole number"),
])
def test_bad_arguments_exit_two_with_a_message(args, env, message):
    proc = run(*args, env=env)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_dry_run_prints_each_phase_with_its_limit(tmp_path):
    out = tmp_path / "res"
    proc = run("--dry-run", "--out", str(out), env={"GPU_CHECK_TESTS_S": "123"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    tests = next(line for line in lines if line.startswith("tests"))
    assert "(123s, TRITON_INTERPRET unset)" in tests and "-m pytest" in tests
    assert "--ignore-glob=tests/test_trainer*" in tests
    bench = next(line for line in lines if line.startswith("bench"))
    assert "fastpo bench --quick --device cuda" in bench and str(out) in bench
    train = next(line for line in lines if line.startswith("train"))
    assert "fastpo train" in train and "--max-steps 20" in train and "--device cuda" in train
    assert lines[-1] == f"results: {out}/gpu_check.md"
    assert not out.exists(), "a dry run writes nothing"


def test_only_selects_phases_in_the_dry_run():
    proc = run("--dry-run", "--only", "bench")
    assert proc.returncode == 0
    phases = [line.split()[0] for line in proc.stdout.splitlines()]
    assert phases == ["setup", "bench", "results:"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_it_exits_three_before_any_work(tmp_path):
    out = tmp_path / "res"
    proc = run("--out", str(out))
    assert proc.returncode == 3
    assert "no CUDA device is visible" in proc.stderr
    assert not out.exists(), "nothing is built or written without a GPU"
