"""DAPO's data-side tricks in the bundled trainer: dynamic sampling (resampling until the groups have
reward variance, with a cap) and --mask-truncated-completions."""

from types import SimpleNamespace

import pytest
import torch

from fastpo.rollout.base import Rollout
from fastpo.trainer.cli import parse_config
from fastpo.trainer.dynamic_sampling import informative_groups, sample_informative_groups
from fastpo.trainer.errors import UserInputError
from fastpo.trainer.loop import Trainer

QUICK = ["--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "4", "--no-progress"]


class FakeAlgo:
    """Rounds of 2 groups of 2 with given rewards; examples and completions name their round and group."""

    def __init__(self, rounds):
        self.rounds = rounds
        self.calls = []
        self.cfg = SimpleNamespace(prompts_per_step=2, group_size=2)
        self.trainer = SimpleNamespace(dist=SimpleNamespace(enabled=False))

    def scored_rollout(self, step, n, round_=0):
        self.calls.append(round_)
        rewards = torch.tensor(self.rounds[round_], dtype=torch.float32)
        names = [f"r{round_}g{i // 2}s{i % 2}" for i in range(4)]
        rollout = Rollout([[1]] * 4, [[2, 3]] * 4, [[0.0, 0.0]] * 4, names, [0, 0, 1, 1], [True, False] * 2)
        return [f"r{round_}p0", f"r{round_}p1"], rollout, rewards, torch.stack([rewards, -rewards], 1), {}


def test_informative_groups():
    assert informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2).tolist() == [False, True, False]


def test_resamples_until_every_group_is_informative():
    algo = FakeAlgo([[1, 1, 0, 1], [0, 0, 0, 0], [3, 2, 5, 4], [9, 8, 7, 6]])
    examples, rollout, rewards, terms, rounds, tokens = sample_informative_groups(algo, 1, max_rounds=10)
    assert algo.calls == [0, 1, 2] and rounds == 3 and tokens == 3 * 4 * 3
    assert examples == ["r0p1", "r2p0"]  # informative groups first, in order; surplus (r2p1) dropped
    assert rollout.completions == ["r0g1s0", "r0g1s1", "r2g0s0", "r2g0s1"]
    assert rollout.group_index == [0, 0, 1, 1]
    assert rewards.tolist() == [0, 1, 3, 2] and terms[:, 1].tolist() == [0, -1, -3, -2]


def test_the_cap_fills_up_with_uninformative_groups():
    algo = FakeAlgo([[1, 1, 0, 0], [0, 1, 2, 2], [5, 6, 7, 8]])
    examples, rollout, rewards, _, rounds, _ = sample_informative_groups(algo, 1, max_rounds=2)
    assert algo.calls == [0, 1] and rounds == 2
    assert examples == ["r1p0", "r0p0"]  # the one informative group, then the first filler
    assert informative_groups(rewards, 2).tolist() == [True, False]


def odd_prompt_setup(tmp_path):
    """Prompts whose answer is never produced, and a reward that is 1 for a '1' in the completion of
    a prompt with an odd first digit and 0 for the others: the even prompts' groups never vary."""
    import json

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "999"}) + "\n"
                            for p in ["1+1=", "3+1=", "2+2=", "4+0=", "5+5=", "6+1="]))
    reward = tmp_path / "odd_reward.py"
    reward.write_text("def reward(prompt, completion):\n    return float('1' in completion) if int(prompt[0]) % 2 else 0.0\n")
    return ["--task", "jsonl", "--data", str(data), "--reward", f"{reward}:reward"]


@pytest.mark.parametrize("rounds", [1, 4])
def test_dapo_resamples_and_masks_exactly_the_uninformative_groups(rounds, small_lm, tmp_path):
    trainer = Trainer(parse_config(["--algo", "dapo", "--model", small_lm, *QUICK, *odd_prompt_setup(tmp_path),
                                    "--max-sampling-rounds", str(rounds), "--output-dir", str(tmp_path / "o")]))
    calls = []
    inner = trainer.algo.scored_rollout
    trainer.algo.scored_rollout = lambda *a, **k: calls.append(inner(*a, **k)) or calls[-1]
    exps = [trainer.algo.experience(step) for step in (1, 2, 3)]
    assert len(calls) > 3 if rounds > 1 else len(calls) == 3  # some step needed a second round
    for exp in exps:
        assert exp.batch.num_sequences == 8
        per_seq = torch.zeros(8).index_add_(0, torch.repeat_interleave(torch.arange(8), exp.batch.lengths),
                                            exp.tensors["mask"])
        kept = (per_seq > 0).view(2, 4)
        assert (kept.all(1) | ~kept.any(1)).all()  # whole groups in or out
        assert exp.metrics["kept_frac"] == pytest.approx(float(kept.float().mean()))
        if rounds > 1:
            assert 1 <= exp.metrics["sampling_rounds"] <= rounds
            if exp.metrics["sampling_rounds"] < rounds:  # stopped early: both groups informative
                assert kept.all()
    # every kept group's rewards differ (the advantages of a masked-out group are 0 anyway)
    for exp in exps:
        adv = exp.tensors["advantages"] * exp.tensors["mask"]
        assert (adv != 0).any() or exp.metrics["kept_frac"] == 0


def test_mask_truncated_completions(small_lm, tmp_path):
    trainer = Trainer(parse_config(["--model", small_lm, *QUICK, "--mask-truncated-completions",
                                    "--output-dir", str(tmp_path)]))
    seen = {}
    inner = trainer.algo.scored_rollout
    trainer.algo.scored_rollout = lambda *a, **k: seen.setdefault("out", inner(*a, **k))
    exp = trainer.algo.experience(1)
    finished = torch.tensor(seen["out"][1].finished, dtype=torch.float32)
    torch.testing.assert_close(exp.tensors["mask"], exp.batch.per_token(finished))


@pytest.mark.parametrize("flags,message", [
    (["--max-sampling-rounds", "0"], "--max-sampling-rounds must be >= 1"),
    (["--algo", "ppo", "--dynamic-sampling"], "--dynamic-sampling: only with the group algorithms"),
    (["--algo", "ppo", "--mask-truncated-completions"], "--mask-truncated-completions: only with"),
])
def test_bad_flags(flags, message):
    with pytest.raises(UserInputError, match=message):
        parse_config(flags)


def test_distributed_ranks_agree_on_the_round_count(monkeypatch):
    """A rank that is full keeps drawing while another is short (FSDP ranks generate in lock step)."""
    import fastpo.trainer.dynamic_sampling as ds

    algo = FakeAlgo([[1, 2, 3, 4], [1, 2, 3, 4], [0, 1, 2, 3]])
    algo.trainer.dist = SimpleNamespace(enabled=True)
    others_short = iter([1.0, 0.0])  # the other rank is short after round 0, full after round 1
    monkeypatch.setattr(ds, "all_sum", lambda value, dist: value + next(others_short))
    *_, rounds, _ = ds.sample_informative_groups(algo, 1, max_rounds=10)
    assert algo.calls == [0, 1] and rounds == 2
