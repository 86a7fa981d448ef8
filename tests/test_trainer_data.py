"""--task dataset (datasets inputs, field mapping, chat templates), --task countdown and the
verifiable / batched rewards."""

import json
import warnings

import pytest

from fastpo.trainer.cli import parse_config
from fastpo.trainer.countdown import CountdownTask, countdown_reward, evaluate
from fastpo.trainer.data import PromptFormatter, load_examples, open_dataset
from fastpo.trainer.errors import UserInputError
from fastpo.trainer.rewards import RewardFunction, RewardTerm, RewardWarning
from fastpo.trainer.verifiers import is_batched, math_reward, regex_reward, reward_terms, think_format_reward

ROWS = [
    {"question": "1+2=", "solution": "3", "level": 1},
    {"question": "10-4=", "solution": "6", "level": 2},
    {"question": "7+7=", "solution": "14", "level": 1},
]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def write_formats(tmp_path):
    import datasets
    import pandas as pd

    paths = {}
    paths["jsonl"] = tmp_path / "d.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(ROWS))
    paths["csv"] = tmp_path / "d.csv"
    pd.DataFrame(ROWS).to_csv(paths["csv"], index=False)
    paths["parquet"] = tmp_path / "d.parquet"
    pd.DataFrame(ROWS).to_parquet(paths["parquet"])
    paths["disk"] = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(paths["disk"]))
    return paths


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def test_every_file_format_with_field_mapping(tmp_path):
    for kind, path in write_formats(tmp_path).items():
        examples = load_examples(str(path), "train", "question", "solution")
        assert [e.prompt for e in examples] == [r["question"] for r in ROWS], kind
        assert [e.answer for e in examples] == ["3", "6", "14"], kind  # csv numbers become strings too
        assert [e.columns["level"] for e in examples] == [1, 2, 1], kind
        assert [e.columns["solution"] for e in examples] == ["3", "6", "14"] or kind == "csv"
    test = load_examples(str(tmp_path / "saved"), "test", "question", "solution")
    assert [e.prompt for e in test] == ["1+2="]


def test_hub_id_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config=None, **kwargs):
        calls.append((name, config))
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    examples = load_examples("openai/gsm8k", "test", "question", "solution", "main")
    assert calls == [("openai/gsm8k", "main")] and len(examples) == 3
    with pytest.raises(UserInputError, match="no split 'train'; it has test"):
        load_examples("openai/gsm8k", "train", "question", "solution", "main")


@pytest.mark.parametrize("args, message", [
    (("missing.jsonl", "train", "question", "solution"), "no such file or directory"),
    (("{jsonl}", "train", "prompt", "solution"), "no field 'prompt' \\(--prompt-field\\); the data has question"),
    (("{jsonl}", "train", "question", "answer"), "no field 'answer' \\(--answer-field\\)"),
    (("{jsonl}", "test", "question", "solution"), "a single file has one split"),
    (("{txt}", "train", "question", "solution"), "unknown file type '.txt'"),
])
def test_bad_data_names_the_problem(tmp_path, args, message):
    paths = write_formats(tmp_path)
    (tmp_path / "d.txt").write_text("x")
    source = args[0].format(jsonl=paths["jsonl"], txt=tmp_path / "d.txt")
    with pytest.raises(UserInputError, match=message):
        load_examples(source, *args[1:])


def test_bad_row_names_the_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n" + json.dumps({"prompt": 5, "answer": "2"}) + "\n")
    with pytest.raises(UserInputError, match="row 1, field 'prompt'"):
        load_examples(str(path), "train", "prompt", "answer")


def tokenizer_with_template():
    from fastpo.trainer.tiny_model import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_chat_template_on_conversations_and_strings(tmp_path):
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2="}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": conversation, "answer": 3}) + "\n")
    [example] = load_examples(str(path), "train", "messages", "answer")
    assert example.prompt == conversation and example.answer == "3"
    fmt = PromptFormatter(tokenizer_with_template(), "auto")
    assert fmt(example.prompt) == "<system>be brief</system><user>1+2=</user><assistant>"
    assert fmt("7+7=") == "<user>7+7=</user><assistant>"
    plain = PromptFormatter(tokenizer_with_template(), "none")
    assert plain("7+7=") == "7+7="
    with pytest.raises(UserInputError, match="conversational prompts"):
        plain.check([example])
    template_file = tmp_path / "t.jinja"
    template_file.write_text(TEMPLATE.replace("<assistant>", "A:"))
    from fastpo.trainer.tiny_model import build_tokenizer

    tok = build_tokenizer()
    assert getattr(tok, "chat_template", None) is None
    assert PromptFormatter(tok, "none")("1+2=") == "1+2="  # no template: plain strings pass through
    assert PromptFormatter(tok, str(template_file))("1+2=") == "<user>1+2=</user>A:"


@pytest.mark.parametrize("completion, answer, expected", [
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("so 40 + 2 = 42", "Natalia sold 48/2 = 24 clips.\n#### 42", 1.0),
    ("First 12, then 30, so 42.0", "42", 1.0),
    ("I get \\boxed{41}", "42", 0.0),
    ("no idea", "42", 0.0),
    ("$x = \\sqrt{4}$ so \\boxed{2}", "\\sqrt{4}", 1.0),
])
def test_math_reward_on_hand_written_completions(completion, answer, expected):
    assert math_reward(completion, answer) == expected


def test_math_reward_unparseable_answer_is_a_failure_not_a_zero():
    with pytest.raises(ValueError, match="cannot parse the reference answer"):
        math_reward("\\boxed{1}", "Natalia sold clips.\n#### ")


def test_format_and_regex_rewards():
    assert think_format_reward("<think>add them</think> 42") == 1.0
    assert think_format_reward("<think>a</think><think>b</think> 4") == 0.0
    assert think_format_reward("42") == 0.0
    assert regex_reward(r"\d+$")("it is 42") == 1.0 and regex_reward(r"^\d+$")("it is 42") == 0.0


def test_batched_reward_gets_the_columns():
    seen = {}

    def batched(prompts, completions, **columns):
        seen.update(columns, prompts=prompts)
        return [float(len(c)) * lv for c, lv in zip(completions, columns["level"])]

    assert is_batched(batched) and not is_batched(lambda prompt, completion: 0.0)
    terms = reward_terms(None, [RewardTerm("batched", lambda p, c, a, cols: batched(p, c, **cols), batched=True)])
    rf = RewardFunction(terms)
    out = rf(["p1", "p2"], ["ab", "abc"], ["3", "6"], {"level": [1, 2], "solution": ["3", "6"]})
    assert out == [2.0, 6.0] and seen["solution"] == ["3", "6"] and seen["prompts"] == ["p1", "p2"]


def test_failing_batched_reward_scores_zero_with_a_warning():
    rf = RewardFunction([RewardTerm("short", lambda p, c, a, cols: [1.0], batched=True)])
    with pytest.warns(RewardWarning, match="must return 2 values"):
        assert rf(["a", "b"], ["x", "y"], ["1", "2"]) == [0.0, 0.0]
    assert rf.failures["short"] == 2
    nan = RewardFunction([RewardTerm("nan", lambda p, c, a, cols: [1.0, float("nan")], batched=True)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RewardWarning)
        assert nan(["a", "b"], ["x", "y"]) == [1.0, 0.0]


def test_countdown_task_is_solvable_and_checked():
    import random

    task = CountdownTask()
    for ex in task.sample(50, random.Random(0)):
        numbers, target = [int(x) for x in ex.answer.split("=")[0].split()], int(ex.answer.split("=")[1])
        assert 3 <= len(numbers) <= 4 and ex.prompt == ex.answer + " "
        assert set(ex.prompt) <= set(CountdownTask.alphabet)
        # brute force over signs of every order: a solution exists
        import itertools

        assert any(order[0] + sum(s * x for s, x in zip(signs, order[1:])) == target
                   for order in itertools.permutations(numbers)
                   for signs in itertools.product((1, -1), repeat=len(numbers) - 1))
    assert countdown_reward("7+5-3", "7 3 5=9") == 1.0
    assert countdown_reward(" 5 - 3 + 7 ", "7 3 5=9") == 1.0
    assert countdown_reward("7+5+3", "7 3 5=9") == 0.1      # the numbers, the wrong target
    assert countdown_reward("7+5", "7 3 5=9") == 0.0        # a number left out
    assert countdown_reward("7+5-3-0", "7 3 5=9") == 0.0    # an extra number
    assert countdown_reward("9", "7 3 5=9") == 0.0
    assert evaluate("7*5") is None


@pytest.mark.parametrize("flags, message", [
    (["--task", "dataset"], "--task dataset needs --data"),
    (["--task", "dataset", "--data", "x.jsonl", "--prompt-field", ""], "--prompt-field: must not be empty"),
    (["--eval-split", "test"], "held-out sets are read with --task dataset"),
    (["--chat-template", "missing.jinja"], "no such file: missing.jinja"),
    (["--reward", "regex:(("], "invalid regular expression"),
    (["--reward", "regex:"], "the pattern is empty"),
    (["--reward", "exact"], "expected math, format, regex:PATTERN"),
    (["--task", "sudoku"], "unknown task 'sudoku'"),
])
def test_bad_data_flags(flags, message):
    with pytest.raises(UserInputError, match=message):
        parse_config(flags)


def test_dataset_run_with_template_math_and_batched_reward(small_lm, tmp_path):
    """One GRPO step on a conversational JSONL with a template file: the model sees templated prompts,
    the batched reward receives the extra column, the eval split loads."""
    from fastpo.trainer.loop import Trainer

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["question"]}],
                                        "solution": r["solution"], "level": r["level"]}) + "\n" for r in ROWS))
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE.replace("<assistant>", "="))
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text("CALLS = []\n"
                           "def reward(prompts, completions, **columns):\n"
                           "    CALLS.append((list(prompts), dict(columns)))\n"
                           "    return [0.5 * lv for lv in columns['level']]\n")
    cfg = parse_config(["--task", "dataset", "--data", str(data), "--prompt-field", "messages",
                        "--answer-field", "solution", "--eval-data", str(data), "--chat-template", str(template),
                        "--reward", f"{reward_file}:reward", "--model", small_lm, "--max-steps", "1",
                        "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "3", "--no-progress",
                        "--output-dir", str(tmp_path / "run")])
    trainer = Trainer(cfg)
    assert len(trainer.eval_examples) == 3
    seen = []
    real_generate = trainer.rollout.generate
    trainer.rollout.generate = lambda prompts, settings: seen.extend(prompts) or real_generate(prompts, settings)
    records = trainer.train()
    assert not records[0]["skipped"]
    assert seen and all(p.startswith("<user>") and p.endswith("</user>=") for p in seen)
    import sys

    module = next(m for n, m in sys.modules.items()   # this test's file: other tests load a my_reward.py too
                  if n.startswith("fastpo_user_reward_my_reward") and getattr(m, "__file__", None) == str(reward_file))
    prompts, columns = module.CALLS[0]
    assert prompts[0].startswith("<user>") and set(columns) == {"solution", "level"}
    assert len(columns["level"]) == 4


def test_countdown_run(small_lm, tmp_path):
    from fastpo.trainer.loop import Trainer

    cfg = parse_config(["--task", "countdown", "--model", small_lm, "--max-steps", "1", "--prompts-per-step", "2",
                        "--group-size", "2", "--max-new-tokens", "12", "--no-progress",
                        "--output-dir", str(tmp_path)])
    records = Trainer(cfg).train()
    assert records[0]["reward_mean"] is not None and not records[0]["skipped"]
