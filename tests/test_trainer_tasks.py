"""The trainer's data and rewards: the arithmetic task, the JSONL loaders (and every error they report),
the built-in answer checks, loading user reward functions, and RewardFunction's failure handling."""

import json
import math
import random
import warnings

import pytest

from fastpo.trainer.errors import UserInputError
from fastpo.trainer.rewards import (
    RewardFunction,
    RewardTerm,
    RewardWarning,
    default_reward_function,
    exact_answer_reward,
    format_reward,
    load_reward_fn,
)
from fastpo.trainer.tasks import (
    ArithmeticTask,
    Example,
    PreferencePair,
    load_preferences_jsonl,
    load_prompts_jsonl,
)

# ----------------------------------------------------------------------------------------------------
# Arithmetic task


def test_arithmetic_examples_are_correct_and_in_range():
    task = ArithmeticTask(max_operand=99)
    examples = task.sample(500, random.Random(0))
    ops = set()
    for ex in examples:
        for op in "+-":
            if op in ex.prompt[1:]:  # the operator is never the first character
                a_text, b_text = ex.prompt[:-1].split(op)
                ops.add(op)
                break
        a, b = int(a_text), int(b_text)
        assert ex.prompt == f"{a}{op}{b}="
        assert 0 <= a <= 99 and 0 <= b <= 99
        assert ex.answer == str(a + b if op == "+" else a - b)
        assert set(ex.prompt + ex.answer) <= set(task.alphabet)
    assert ops == {"+", "-"}


def test_arithmetic_sample_is_deterministic_given_the_generator():
    task = ArithmeticTask()
    assert task.sample(50, random.Random(7)) == task.sample(50, random.Random(7))
    assert task.sample(50, random.Random(7)) != task.sample(50, random.Random(8))
    rng = random.Random(3)
    first, second = task.sample(10, rng), task.sample(10, rng)
    assert first != second  # the generator's state advances


def test_arithmetic_eval_set_is_fixed_and_stream_reproducible():
    task = ArithmeticTask()
    assert task.eval_set(20) == task.eval_set(20)
    assert task.eval_set(20, seed=1) != task.eval_set(20, seed=2)
    s1, s2 = task.stream(4, seed=5), task.stream(4, seed=5)
    assert [next(s1) for _ in range(3)] == [next(s2) for _ in range(3)]


def test_arithmetic_options():
    only_add = ArithmeticTask(max_operand=9, ops="+")
    for ex in only_add.sample(100, random.Random(0)):
        assert "-" not in ex.prompt and 0 <= int(ex.answer) <= 18
    assert ArithmeticTask().make(3, "-", 8) == Example("3-8=", "-5")
    for bad in [{"max_operand": 0}, {"max_operand": 2.5}, {"ops": "*"}, {"ops": ""}, {"ops": "++"}]:
        with pytest.raises(UserInputError, match="arithmetic task"):
            ArithmeticTask(**bad)


# ----------------------------------------------------------------------------------------------------
# JSONL loaders


def _write(tmp_path, text, name="data.jsonl"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_load_prompts(tmp_path):
    p = _write(
        tmp_path,
        '{"prompt": "1+1=", "answer": "2"}\n'
        "\n"
        '{"prompt": "what is 6*7?", "answer": 42, "extra": true}\n'
        "   \n"
        '{"prompt": "half", "answer": 0.5}\n',
    )
    assert load_prompts_jsonl(p) == [
        Example("1+1=", "2"),
        Example("what is 6*7?", "42"),
        Example("half", "0.5"),
    ]
    assert load_prompts_jsonl(str(p)) == load_prompts_jsonl(p)


def test_load_preferences(tmp_path):
    rows = [
        {"prompt": "p1", "chosen": "good", "rejected": "bad"},
        {"prompt": "p2", "chosen": "", "rejected": "x"},
    ]
    p = _write(tmp_path, "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_preferences_jsonl(p) == [PreferencePair("p1", "good", "bad"), PreferencePair("p2", "", "x")]


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    for loader in (load_prompts_jsonl, load_preferences_jsonl):
        with pytest.raises(UserInputError, match=f"^no such file: {missing}$"):
            loader(missing)
    with pytest.raises(UserInputError, match="is a directory"):
        load_prompts_jsonl(tmp_path)


@pytest.mark.parametrize("text", ["", "\n\n   \n"])
def test_empty_file(tmp_path, text):
    p = _write(tmp_path, text)
    with pytest.raises(UserInputError, match=f"^{p}: empty file"):
        load_prompts_jsonl(p)
    with pytest.raises(UserInputError, match=f"^{p}: empty file"):
        load_preferences_jsonl(p)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a" "answer": "1"}', r"invalid JSON \(Expecting ',' delimiter at column 16\)$"),
        ("not json", r"invalid JSON \(Expecting value"),
        ('["prompt", "answer"]', "expected a JSON object, got an array"),
        ('"just a string"', "expected a JSON object, got a string"),
        ("17", "expected a JSON object, got a number"),
        ('{"answer": "1"}', 'missing key "prompt"'),
        ('{"prompt": "1+0="}', 'missing key "answer"'),
        ('{"prompt": 5, "answer": "1"}', 'key "prompt" must be a string, got a number'),
        ('{"prompt": null, "answer": "1"}', 'key "prompt" must be a string, got null'),
        ('{"prompt": "p", "answer": null}', 'key "answer" must be a string or a number, got null'),
        ('{"prompt": "p", "answer": true}', 'key "answer" must be a string or a number, got a boolean'),
        ('{"prompt": "p", "answer": [1]}', 'key "answer" must be a string or a number, got an array'),
        ('{"prompt": "p", "answer": NaN}', 'key "answer" must be a finite number, got nan'),
    ],
)
def test_prompt_errors_name_path_and_line(tmp_path, line, message):
    # Two good lines and a blank one before the bad one: the bad line is line 4.
    good = '{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2=", "answer": 4}\n'
    p = _write(tmp_path, good + line + "\n")
    with pytest.raises(UserInputError, match=f"^{p}:4: {message}"):
        load_prompts_jsonl(p)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "chosen": "a", "rejected": "b"', r"invalid JSON \(Expecting ',' delimiter"),
        ("[]", "expected a JSON object, got an array"),
        ('{"chosen": "a", "rejected": "b"}', 'missing key "prompt"'),
        ('{"prompt": "p", "rejected": "b"}', 'missing key "chosen"'),
        ('{"prompt": "p", "chosen": "a"}', 'missing key "rejected"'),
        ('{"prompt": "p", "chosen": 1, "rejected": "b"}', 'key "chosen" must be a string, got a number'),
        ('{"prompt": "p", "chosen": "a", "rejected": {}}', 'key "rejected" must be a string, got an object'),
    ],
)
def test_preference_errors_name_path_and_line(tmp_path, line, message):
    p = _write(tmp_path, '{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(UserInputError, match=f"^{p}:2: {message}"):
        load_preferences_jsonl(p)


# ----------------------------------------------------------------------------------------------------
# Built-in rewards


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("42", "42", 1.0),
        (" 42\n", "42", 1.0),
        ("42.0", "42", 1.0),
        ("the answer is 42.", "42", 1.0),
        ("-5", "-5", 1.0),
        ("+7", "7", 1.0),
        ("2.50", "2.5", 1.0),
        (".5", "0.5", 1.0),
        ("0", "0", 1.0),
        ("42+1", "42", 1.0),  # the first number counts
        ("41", "42", 0.0),
        ("5", "-5", 0.0),
        ("424242", "42", 0.0),  # a run-on answer is a different number
        ("", "42", 0.0),
        ("no digits", "42", 0.0),
        ("1 42", "42", 0.0),
    ],
)
def test_exact_answer_reward(completion, answer, expected):
    assert exact_answer_reward(completion, answer) == expected


def test_exact_answer_reward_rejects_non_numeric_answer():
    with pytest.raises(ValueError, match="not a number"):
        exact_answer_reward("42", "forty-two")


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("42", 1.0),
        (" 42 \n", 1.0),
        ("-5", 1.0),
        ("0", 1.0),
        ("", 0.0),
        ("042", 0.0),
        ("-0", 0.0),
        ("+5", 0.0),
        ("4 2", 0.0),
        ("42=", 0.0),
        ("42.0", 0.0),
        ("answer: 42", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


# ----------------------------------------------------------------------------------------------------
# RewardFunction


def test_default_reward_function():
    rf = default_reward_function()
    prompts = ["1+1="] * 4
    got = rf(prompts, ["2", "2+", "3", "x"], ["2"] * 4)
    assert got == pytest.approx([1.1, 1.0, 0.1, 0.0])
    assert rf.breakdown(prompts[:1], ["2"], ["2"]) == {"exact_answer_reward": [1.0], "format_reward": [1.0]}
    assert default_reward_function(format_weight=0.0)(["p"], ["2"], ["2"]) == [1.0]
    assert "exact_answer_reward" in repr(rf)


def test_user_and_builtin_terms_combine():
    def length_penalty(prompt, completion):
        return -0.01 * len(completion)

    rf = RewardFunction([RewardTerm.builtin(exact_answer_reward, 2.0), RewardTerm.user(length_penalty, 0.5)])
    assert rf(["1+1=", "1+1="], ["2", "abc"], ["2", "2"]) == pytest.approx([2 - 0.005, -0.015])


def test_failing_user_reward_gives_zero_and_warns_once_per_message():
    calls = []

    def flaky(prompt, completion):
        calls.append(completion)
        if completion == "boom":
            raise RuntimeError("kaboom")
        if completion == "nan":
            return math.nan
        if completion == "str":
            return "1.0"
        return 1.0

    rf = RewardFunction([RewardTerm.user(flaky), RewardTerm.builtin(format_reward, 0.5)])
    with pytest.warns(RewardWarning) as record:
        got = rf(["p"] * 5, ["7", "boom", "nan", "str", "boom"])
    assert got == pytest.approx([1.5, 0.0, 0.0, 0.0, 0.0])
    assert len(calls) == 5
    messages = [str(w.message) for w in record]
    assert len(messages) == 3  # boom twice -> one warning
    assert any("flaky" in m and "RuntimeError: kaboom" in m for m in messages)
    assert any("flaky" in m and "non-finite" in m for m in messages)
    assert any("flaky" in m and "expected a float" in m for m in messages)
    assert rf.failures["flaky"] == 4
    # The same failure again: counted, not warned again.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rf(["p"], ["boom"]) == [0.0]
    assert rf.failures["flaky"] == 5


def test_builtin_term_without_answers_warns():
    rf = default_reward_function()
    with pytest.warns(RewardWarning, match="exact_answer_reward"):
        assert rf(["p"], ["42"]) == pytest.approx([0.1])


def test_reward_function_validation():
    with pytest.raises(UserInputError, match="at least one term"):
        RewardFunction([])
    with pytest.raises(UserInputError, match="distinct names"):
        RewardFunction([RewardTerm.builtin(format_reward), RewardTerm.builtin(format_reward)])
    with pytest.raises(UserInputError, match="weight must be finite"):
        RewardFunction([RewardTerm.builtin(format_reward, math.inf)])
    with pytest.raises(ValueError, match="batch sizes differ"):
        default_reward_function()(["p"], ["1", "2"], ["1", "2"])


# ----------------------------------------------------------------------------------------------------
# load_reward_fn


def test_load_reward_fn_from_module():
    assert load_reward_fn("fastpo.trainer.rewards:format_reward") is format_reward
    assert load_reward_fn("os.path:join") is __import__("os").path.join


def test_load_reward_fn_from_file(tmp_path):
    (tmp_path / "helper_mod_for_reward.py").write_text("BONUS = 0.25\n")
    f = tmp_path / "my_reward.py"
    f.write_text(
        "from helper_mod_for_reward import BONUS\n"
        "def reward(prompt, completion):\n"
        "    return float(len(completion)) + BONUS\n"
        "class R:\n"
        "    @staticmethod\n"
        "    def score(prompt, completion):\n"
        "        return 2.0\n"
        "NOT_CALLABLE = 3\n"
    )
    fn = load_reward_fn(f"{f}:reward")
    assert fn("p", "abc") == 3.25
    assert load_reward_fn(f"{f}:R.score")("p", "c") == 2.0
    rf = RewardFunction([RewardTerm.from_spec(f"{f}:reward", 2.0)])
    assert rf(["p"], ["ab"]) == [4.5]
    with pytest.raises(UserInputError, match="NOT_CALLABLE is not callable"):
        load_reward_fn(f"{f}:NOT_CALLABLE")
    with pytest.raises(UserInputError, match="has no attribute 'missing'"):
        load_reward_fn(f"{f}:missing")


def test_load_reward_fn_errors(tmp_path):
    with pytest.raises(UserInputError, match="expected MODULE:FUNCTION"):
        load_reward_fn("no_colon_here")
    with pytest.raises(UserInputError, match="expected MODULE:FUNCTION"):
        load_reward_fn("module_only:")
    with pytest.raises(UserInputError, match="no module named 'surely_not_a_module_xyz'"):
        load_reward_fn("surely_not_a_module_xyz:f")
    with pytest.raises(UserInputError, match="no such file: .*missing.py"):
        load_reward_fn(f"{tmp_path}/missing.py:f")
    with pytest.raises(UserInputError, match="has no attribute 'nope'"):
        load_reward_fn("fastpo.trainer.rewards:nope")
    with pytest.raises(UserInputError, match="is not callable"):
        load_reward_fn("fastpo.trainer.rewards:DEFAULT_FORMAT_WEIGHT")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('bad import')\n")
    with pytest.raises(UserInputError, match="importing .*broken.py failed: RuntimeError: bad import"):
        load_reward_fn(f"{broken}:f")
    imports_missing = tmp_path / "imports_missing.py"
    imports_missing.write_text("import surely_not_a_module_abc\n")
    with pytest.raises(UserInputError, match="importing .*imports_missing.py failed: ModuleNotFoundError"):
        load_reward_fn(f"{imports_missing}:f")
