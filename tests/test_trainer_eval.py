"""--eval-every: held-out evaluation records in metrics.jsonl, eval.png, and the new reward.png panels."""

import pytest

from fastpo.trainer.cli import parse_config
from fastpo.trainer.errors import UserInputError
from fastpo.trainer.evaluation import EVAL_SEED, mean_std
from fastpo.trainer.loop import Trainer
from fastpo.trainer.plots import write_plots
from fastpo.trainer.reporting import read_metrics
from fastpo.trainer.tasks import ArithmeticTask

QUICK = ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--no-progress"]


def run(args, out):
    return Trainer(parse_config(args + ["--output-dir", str(out)])).train()


def test_an_eval_record_appears_every_n_steps(small_lm, tmp_path):
    records = run(["--model", small_lm, "--max-steps", "4", "--eval-every", "2", "--eval-size", "5", *QUICK],
                  tmp_path)
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    evaluated = [r["step"] for r in lines if "eval_accuracy" in r]
    assert evaluated == [2, 4]
    for r in lines:
        if r["step"] in (2, 4):
            assert 0.0 <= r["eval_accuracy"] <= 1.0
            assert r["eval_reward_mean"] is not None and r["eval_reward_std"] is not None
            # the arithmetic task's two terms, unweighted, under TRL's metric names
            assert set(r) >= {"eval_rewards/exact_answer_reward/mean", "eval_rewards/format_reward/std",
                              "eval_response_len", "eval_finished_frac", "eval_s"}
            assert 0 < r["eval_response_len"] <= 4
        else:
            assert not any(k.startswith("eval_") for k in r)
    assert records[1]["eval_accuracy"] == lines[1]["eval_accuracy"]
    assert (tmp_path / "eval.png").is_file() and (tmp_path / "reward.png").is_file()


def test_eval_scores_the_fixed_set_greedily(small_lm, tmp_path):
    """The reported numbers are those of greedy responses to the task's fixed eval set, rescored by hand."""
    trainer = Trainer(parse_config(["--model", small_lm, "--max-steps", "1", "--eval-every", "1",
                                    "--eval-size", "6", *QUICK, "--output-dir", str(tmp_path)]))
    examples = ArithmeticTask().eval_set(6, seed=EVAL_SEED)
    assert trainer.evaluator.examples == examples
    metrics = trainer.evaluator(1)
    from fastpo.rollout.base import SamplingSettings
    from fastpo.trainer.rewards import exact_answer_reward, format_reward

    greedy = trainer.rollout.generate([e.prompt for e in examples], SamplingSettings(temperature=0.0, max_new_tokens=4))
    exact = [exact_answer_reward(c, e.answer) for c, e in zip(greedy.completions, examples)]
    total = [x + 0.1 * format_reward(c) for x, c in zip(exact, greedy.completions)]
    assert metrics["eval_accuracy"] == sum(exact) / 6
    assert metrics["eval_reward_mean"] == pytest.approx(mean_std(total)[0])
    assert metrics["eval_rewards/exact_answer_reward/mean"] == pytest.approx(sum(exact) / 6)
    assert metrics["eval_response_len"] == sum(map(len, greedy.response_ids)) / 6


def test_countdown_has_an_eval_set():
    from fastpo.trainer.countdown import CountdownTask

    a, b = CountdownTask().eval_set(4), CountdownTask().eval_set(4)
    assert a == b and len(a) == 4


@pytest.mark.parametrize("flags,message", [
    (["--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--eval-every", "1", "--eval-temperature", "-0.5"], "--eval-temperature must be >= 0"),
    (["--eval-every", "1", "--eval-size", "0"], "--eval-size must be >= 1"),
    (["--eval-every", "1", "--task", "jsonl", "--data", "x.jsonl"], "no held-out set"),
    (["--eval-every", "1", "--task", "dataset", "--data", "x.jsonl"], "--eval-data or --eval-split"),
    (["--eval-every", "1", "--algo", "dpo", "--data", "x.jsonl"], "generates nothing to evaluate"),
])
def test_bad_eval_flags(flags, message):
    with pytest.raises(UserInputError, match=message):
        parse_config(flags)


def test_plots_draw_every_panel_and_skip_eval_without_evaluations(tmp_path):
    records = [{"step": s, "reward_mean": 0.1 * s, "kl": None, "entropy": 1.0, "response_len": 3.0}
               for s in range(1, 5)]
    assert write_plots(tmp_path, records) == tmp_path / "reward.png"
    assert (tmp_path / "reward.png").is_file() and not (tmp_path / "eval.png").exists()
    records[1]["eval_accuracy"] = 0.5
    write_plots(tmp_path, records)
    assert (tmp_path / "eval.png").is_file()
