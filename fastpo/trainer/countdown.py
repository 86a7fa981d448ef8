"""The second built-in task, ``--task countdown``: reach a target with 3 or 4 given numbers.

A prompt lists the numbers, then ``=`` and the target, then a space: ``"7 3 5=9 "``; the example's
answer field holds the problem itself (``"7 3 5=9"``, so the check needs no prompt). A right
completion is an expression that uses every given number exactly once, in any order, joined by ``+``
and ``-`` (the first one unsigned), and equals the target: ``"7+5-3"``. Several answers may be right; the reward
checks the expression, not a reference string. Every prompt has a solution: the target is made by
signing a shuffled draw of the numbers (redrawn while it is negative). With 3-4 numbers of up to two
digits, a completion is 5-11 tokens for the character-level tiny model, whose alphabet
(``0-9 + - =`` and space) holds every prompt and completion, so ``--max-new-tokens 16`` leaves room.

Countdown proper (TinyZero's) also allows ``*``, ``/`` and parentheses; here only ``+`` and ``-``,
so that the tiny model's vocabulary covers the task and an answer is checked without ``eval``.

Reward (:func:`countdown_reward`): 1.0 for a right expression; 0.1 for a well-formed expression over
exactly the given numbers that misses the target; 0.0 otherwise."""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import List, Optional, Tuple

from .errors import UserInputError
from .tasks import Example

_EXPRESSION = re.compile(r"\s*(\d+)((?:\s*[-+]\s*\d+)*)\s*")
_TERM = re.compile(r"([-+])\s*(\d+)")
FORMAT_CREDIT = 0.1


class CountdownTask:
    """``sample(n, rng)`` draws ``count`` in ``counts`` and that many numbers from
    ``[1, max_number]``; deterministic given ``rng``'s state."""

    name = "countdown"
    alphabet = "0123456789+-= "

    def __init__(self, *, max_number: int = 20, counts: Tuple[int, ...] = (3, 4)):
        if not isinstance(max_number, int) or isinstance(max_number, bool) or max_number < 1:
            raise UserInputError(f"countdown task: max_number must be an integer >= 1, got {max_number!r}")
        if not counts or any(not isinstance(c, int) or c < 2 for c in counts):
            raise UserInputError(f"countdown task: counts must be integers >= 2, got {counts!r}")
        self.max_number = max_number
        self.counts = tuple(counts)

    def __repr__(self) -> str:
        return f"CountdownTask(max_number={self.max_number}, counts={self.counts})"

    def make(self, numbers: List[int], target: int) -> Example:
        problem = f"{' '.join(map(str, numbers))}={target}"
        return Example(prompt=problem + " ", answer=problem)  # the reward checks against the problem

    def sample(self, n: int, generator: random.Random) -> List[Example]:
        out = []
        for _ in range(n):
            count = self.counts[generator.randrange(len(self.counts))]
            numbers = [generator.randint(1, self.max_number) for _ in range(count)]
            while True:
                order = generator.sample(numbers, len(numbers))
                target = order[0] + sum(x if generator.random() < 0.5 else -x for x in order[1:])
                if target >= 0:
                    break
            out.append(self.make(numbers, target))
        return out

    def eval_set(self, n: int, seed: int = 1234) -> List[Example]:
        """A fixed evaluation set: ``n`` examples from ``random.Random(seed)`` (as ``ArithmeticTask``'s)."""
        return self.sample(n, random.Random(seed))


def parse_problem(problem: str) -> Tuple[List[int], int]:
    """``(numbers, target)`` of a countdown problem (``"7 3 5=9"``: an example's answer field)."""
    head, sep, tail = problem.strip().rpartition("=")
    if not sep or not head.split() or not all(x.isdigit() for x in head.split()) or not tail.strip().isdigit():
        raise ValueError(f"not a countdown problem: {problem!r}")
    return [int(x) for x in head.split()], int(tail)


def evaluate(expression: str) -> Optional[Tuple[List[int], int]]:
    """``(numbers used, value)`` of a ``+``/``-`` expression of non-negative integers, or None when
    the text is anything else."""
    m = _EXPRESSION.fullmatch(expression)
    if m is None:
        return None
    numbers, value = [int(m.group(1))], int(m.group(1))
    for sign, digits in _TERM.findall(m.group(2)):
        numbers.append(int(digits))
        value += int(digits) if sign == "+" else -int(digits)
    return numbers, value


def countdown_reward(completion: str, answer: str) -> float:
    """1.0 when ``completion`` uses the problem's numbers (``answer``: ``"7 3 5=9"``) exactly once
    each and equals its target; 0.1 when it uses them exactly but misses; else 0.0."""
    numbers, target = parse_problem(answer)
    got = evaluate(completion)
    if got is None or Counter(got[0]) != Counter(numbers):
        return 0.0
    return 1.0 if got[1] == target else FORMAT_CREDIT
