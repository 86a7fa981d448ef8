"""Several weighted rewards in the bundled trainer: --reward (repeated), --reward-weights,
--multi-objective, and the per-reward metrics."""

import pytest
import torch

import fastpo
from fastpo.trainer.cli import parse_config
from fastpo.trainer.errors import UserInputError
from fastpo.trainer.loop import Trainer
from fastpo.trainer.reporting import read_metrics
from fastpo.trainer.rewards import exact_answer_reward, format_reward

QUICK = ["--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "4", "--no-progress"]
REWARDS = ["--reward", "regex:1", "--reward", "regex:[02468]", "--reward-weights", "1,0.5"]


def by_hand(completions, answers):
    """The four terms of the arithmetic task with REWARDS, unweighted, [B, 4]."""
    rows = [[exact_answer_reward(c, a), format_reward(c), float("1" in c), float(any(d in c for d in "02468"))]
            for c, a in zip(completions, answers)]
    return torch.tensor(rows)


def spy_rollout(trainer):
    seen = {}
    inner = trainer.algo.scored_rollout

    def scored(*args, **kwargs):
        seen["out"] = inner(*args, **kwargs)
        return seen["out"]

    trainer.algo.scored_rollout = scored
    return seen


def test_flags_parse_and_terms_get_their_weights():
    cfg = parse_config(REWARDS)
    assert cfg.reward == ["regex:1", "regex:[02468]"] and cfg.reward_weights == "1,0.5"
    from fastpo.trainer.multi_reward import run_reward_terms
    from fastpo.trainer.rewards import default_reward_function

    terms = run_reward_terms(cfg.reward, cfg.reward_weights, default_reward_function().terms)
    assert [(t.name, t.weight) for t in terms] == [("exact_answer_reward", 1.0), ("format_reward", 0.1),
                                                   ("regex:1", 1.0), ("regex:[02468]", 0.5)]
    # math replaces the answer check, and its weight applies there
    math_terms = run_reward_terms(["format", "math"], "2,3", default_reward_function().terms) \
        if _has_math_verify() else None
    if math_terms is not None:
        assert [(t.name, t.weight) for t in math_terms] == [("math", 3.0), ("format_reward", 0.1), ("format", 2.0)]


def _has_math_verify():
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


def test_one_reward_from_yaml_is_a_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("reward: format\n")
    assert parse_config(["--config", str(path)]).reward == ["format"]


@pytest.mark.parametrize("flags,message", [
    (["--reward", "format", "--reward-weights", "1,2"], "2 weight"),
    (["--reward-weights", "1"], "1 weight"),
    (["--reward", "format", "--reward-weights", "x"], "comma-separated numbers"),
    (["--reward", "format", "--reward-weights", "nan"], "finite"),
    (["--reward", "format", "--reward", "format"], "given once"),
    (["--multi-objective", "max"], "unknown value 'max'"),
    (["--multi-objective", "gdpo", "--algo", "rloo"], "only with --algo"),
])
def test_bad_multi_reward_flags(flags, message):
    with pytest.raises(UserInputError, match=message):
        parse_config(flags)


@pytest.mark.parametrize("aggregation", [None, "sum_then_normalize", "normalize_then_sum", "gdpo"])
def test_advantages_come_from_the_weighted_terms(aggregation, small_lm, tmp_path):
    extra = [] if aggregation is None else ["--multi-objective", aggregation]
    trainer = Trainer(parse_config(["--model", small_lm, *QUICK, *REWARDS, *extra, "--output-dir", str(tmp_path)]))
    seen = spy_rollout(trainer)
    exp = trainer.algo.experience(1)
    examples, rollout, rewards, terms, _ = seen["out"]
    answers = [examples[g].answer for g in rollout.group_index]
    expected_terms = by_hand(rollout.completions, answers)
    torch.testing.assert_close(terms, expected_terms)
    weights = torch.tensor([1.0, 0.1, 1.0, 0.5])
    torch.testing.assert_close(rewards, expected_terms @ weights)
    if aggregation is None:
        adv = fastpo.group_advantages(expected_terms @ weights, group_size=4, method="grpo")
    else:
        adv = fastpo.multi_reward_advantages(expected_terms, reward_weights=weights, group_size=4,
                                             aggregation=aggregation)
    torch.testing.assert_close(exp.tensors["advantages"], exp.batch.per_token(adv))
    for k, name in enumerate(["exact_answer_reward", "format_reward", "regex:1", "regex:[02468]"]):
        assert exp.metrics[f"rewards/{name}/mean"] == pytest.approx(float(expected_terms[:, k].mean()))
        assert exp.metrics[f"rewards/{name}/std"] == pytest.approx(float(expected_terms[:, k].std()))


def test_per_reward_metrics_reach_metrics_jsonl(small_lm, tmp_path):
    Trainer(parse_config(["--model", small_lm, *QUICK, *REWARDS, "--multi-objective", "gdpo", "--max-steps", "2",
                          "--output-dir", str(tmp_path)])).train()
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert len(lines) == 2
    for line in lines:
        for name in ("exact_answer_reward", "format_reward", "regex:1", "regex:[02468]"):
            assert line[f"rewards/{name}/mean"] is not None and line[f"rewards/{name}/std"] is not None
