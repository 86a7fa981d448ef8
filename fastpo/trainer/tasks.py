"""Training data: the built-in arithmetic task and the JSONL loaders for user prompts and preferences.

Built-in task (generated in code, no downloads): a prompt is ``"{a}{op}{b}="`` with integer operands
``0 <= a, b <= max_operand`` and ``op`` in ``ops`` (``+`` and/or ``-``); the answer is the integer
``a op b`` written in decimal (a leading ``-`` when negative), e.g. ``"17+25="`` -> ``"42"``,
``"3-8="`` -> ``"-5"``. The completion the model should produce is the bare answer.

JSONL formats (one object per line, blank lines skipped):

- prompts:     ``{"prompt": str, "answer": str | number}``  (a number answer is kept as its string)
- preferences: ``{"prompt": str, "chosen": str, "rejected": str}``
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import UserInputError


@dataclass(frozen=True)
class Example:
    """One prompt and its reference answer text."""

    prompt: str  # text given to the model, e.g. "17+25="
    answer: str  # reference answer text, e.g. "42"


@dataclass(frozen=True)
class PreferencePair:
    """One preference: the same prompt with a preferred (chosen) and a dispreferred (rejected) completion."""

    prompt: str
    chosen: str
    rejected: str


class ArithmeticTask:
    """Built-in task generated in code: ``"{a}{op}{b}="`` -> ``str(a op b)``.

    ``sample(n, rng)`` draws ``a, b`` uniformly from ``[0, max_operand]`` and ``op`` uniformly from
    ``ops``; it depends only on ``rng``'s state. ``eval_set(n, seed)`` is a fixed held-out set (same
    distribution, its own seeded generator: independent draws, not disjoint from training).

    The defaults (operands up to 20, ``+`` and ``-``: 882 problems, answers -20..40) are the built-in
    task, the one the tiny default model is warm-started on.
    """

    name = "arithmetic"
    # Every character a prompt or an answer of this task can contain (the tiny model's vocabulary).
    alphabet = "0123456789+-="

    def __init__(self, *, max_operand: int = 20, ops: str = "+-"):
        if not isinstance(max_operand, int) or isinstance(max_operand, bool) or max_operand < 1:
            raise UserInputError(f"arithmetic task: max_operand must be an integer >= 1, got {max_operand!r}")
        if not ops or any(op not in "+-" for op in ops) or len(set(ops)) != len(ops):
            raise UserInputError(f"arithmetic task: ops must be distinct characters from '+-', got {ops!r}")
        self.max_operand = max_operand
        self.ops = ops

    def __repr__(self) -> str:
        return f"ArithmeticTask(max_operand={self.max_operand}, ops={self.ops!r})"

    def make(self, a: int, op: str, b: int) -> Example:
        """The example for ``a op b``."""
        value = a + b if op == "+" else a - b
        return Example(prompt=f"{a}{op}{b}=", answer=str(value))

    def sample(self, n: int, generator: random.Random) -> list[Example]:
        """``n`` examples drawn with ``generator`` (deterministic given its state)."""
        out = []
        for _ in range(n):
            a = generator.randint(0, self.max_operand)
            op = self.ops[generator.randrange(len(self.ops))]
            b = generator.randint(0, self.max_operand)
            out.append(self.make(a, op, b))
        return out

    def eval_set(self, n: int, seed: int = 1234) -> list[Example]:
        """A fixed evaluation set: ``n`` examples from ``random.Random(seed)``."""
        return self.sample(n, random.Random(seed))

    def stream(self, batch_size: int, seed: int = 0) -> Iterator[list[Example]]:
        """An endless, reproducible stream of batches."""
        rng = random.Random(seed)
        while True:
            yield self.sample(batch_size, rng)


def _read_jsonl(path: str | Path, kind: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Yields ``(where, lineno, object)`` for each non-blank line; ``where`` is ``"PATH:LINENO"``."""
    p = Path(path)
    if not p.exists():
        raise UserInputError(f"no such file: {path}")
    if p.is_dir():
        raise UserInputError(f"{path}: is a directory, expected a JSONL file of {kind}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserInputError(f"{path}: cannot read ({e.strerror or e})") from None
    found = False
    for lineno, raw_line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserInputError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line)") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            # e.lineno is always 1 here (one line is parsed at a time): report the column only.
            raise UserInputError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserInputError(f"{where}: expected a JSON object, got {_json_type(obj)}")
        found = True
        yield where, lineno, obj
    if not found:
        raise UserInputError(f"{path}: empty file, expected one JSON object of {kind} per line")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _string_key(obj: dict[str, Any], key: str, where: str) -> str:
    if key not in obj:
        raise UserInputError(f'{where}: missing key "{key}"')
    value = obj[key]
    if not isinstance(value, str):
        raise UserInputError(f'{where}: key "{key}" must be a string, got {_json_type(value)}')
    return value


def _prompt(obj: dict[str, Any], where: str) -> str:
    prompt = _string_key(obj, "prompt", where)
    if not prompt.strip():  # nothing to condition on: generate() cannot start from zero tokens
        raise UserInputError(f'{where}: key "prompt" is empty')
    return prompt


def load_prompts_jsonl(path: str | Path) -> list[Example]:
    """Reads ``{"prompt": str, "answer": str | number}`` lines; a number answer becomes its string
    (``42`` -> ``"42"``, ``2.5`` -> ``"2.5"``). Extra keys are ignored; an empty prompt is an error."""
    out = []
    for where, _, obj in _read_jsonl(path, 'prompts ({"prompt": ..., "answer": ...})'):
        prompt = _prompt(obj, where)
        if "answer" not in obj:
            raise UserInputError(f'{where}: missing key "answer"')
        answer = obj["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise UserInputError(
                f'{where}: key "answer" must be a string or a number, got {_json_type(answer)}'
            )
        if isinstance(answer, float) and not math.isfinite(answer):
            raise UserInputError(f'{where}: key "answer" must be a finite number, got {answer}')
        out.append(Example(prompt=prompt, answer=answer if isinstance(answer, str) else str(answer)))
    return out


def load_preferences_jsonl(path: str | Path) -> list[PreferencePair]:
    """Reads ``{"prompt": str, "chosen": str, "rejected": str}`` lines. Extra keys are ignored; an empty
    prompt is an error."""
    out = []
    for where, _, obj in _read_jsonl(path, 'preferences ({"prompt": ..., "chosen": ..., "rejected": ...})'):
        out.append(
            PreferencePair(
                prompt=_prompt(obj, where),
                chosen=_string_key(obj, "chosen", where),
                rejected=_string_key(obj, "rejected", where),
            )
        )
    return out
