"""Verifiable rewards (``--reward math | format | regex:PATTERN``) and batched user rewards.

- ``math``: the final answer of a completion, extracted and compared by the ``math-verify`` package
  (as TRL's ``accuracy_reward``): a ``\\boxed{...}`` answer first, else the last LaTeX expression or
  number in the text; equivalence is symbolic and numeric (``\\frac{1}{2}`` = ``0.5``, ``72.0`` = ``72``).
  The reference answer may be GSM8K's ``"... #### 72"`` (the part after ``####`` is the answer). An
  answer math-verify cannot parse is a data problem: the term fails (0 with a warning), it never
  scores 1. It replaces the task's exact-number check.
- ``format``: 1.0 when the completion opens with one ``<think>...</think>`` block and goes on after it
  (TRL's ``think_format_reward`` pattern), else 0.0. Added to the task's reward.
- ``regex:PATTERN``: 1.0 when ``re.search(PATTERN, completion)`` matches (``re.DOTALL``), else 0.0.
  Added to the task's reward.
- ``module:function`` / ``file.py:function``: a user function, added to the task's reward. Per sample,
  ``reward(prompt, completion) -> float``; or batched, TRL's convention,
  ``reward(prompts, completions, **columns) -> list[float]`` (chosen when the function has a
  ``completions`` parameter or takes ``**kwargs``), where ``columns`` are the dataset's other fields,
  one list entry per sample (the answer under its field name, e.g. ``answer`` or ``solution``).
  Prompts are the text the model continued (chat template applied), completions plain strings.

A batched call that raises, overruns ``--reward-timeout`` or returns the wrong number of values
scores every sample of the batch 0 (with the warning and failure count of ``rewards.py``); a single
non-finite value scores its own sample 0."""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any, Callable, Dict, List, Optional, Sequence

from .errors import UserInputError

THINK_FORMAT = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.+$", re.DOTALL)
NAMED_KINDS = ("math", "format")


def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise UserInputError("--reward math needs the math-verify package: pip install math-verify "
                             "(or pip install -e .[train])") from None
    # fastpo's --reward-timeout bounds the call: math-verify's own SIGALRM timers are switched off,
    # and so is its warning about that
    logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
    logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
    return math_verify


def reference_answer(answer: str) -> str:
    """The answer part of a reference solution: what follows GSM8K's last ``####``, else all of it."""
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()


def math_reward(completion: str, answer: Optional[str]) -> float:
    """1.0 when math-verify finds the completion's final answer equivalent to ``answer``, else 0.0.
    Raises ``ValueError`` when ``answer`` is missing or cannot be parsed."""
    mv = _math_verify()
    if answer is None:
        raise ValueError("the math reward needs a reference answer (--answer-field)")
    ref = reference_answer(str(answer))
    # a bare LaTeX answer (``\frac{1}{2}``, no ``$``) parses once it is delimited as math
    gold = mv.parse(ref, parsing_timeout=None) or mv.parse(f"${ref}$", parsing_timeout=None)
    if not gold:
        raise ValueError(f"math-verify cannot parse the reference answer {answer!r:.80}")
    extraction = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
    guess = mv.parse(completion, extraction_config=extraction, parsing_timeout=None)
    return 1.0 if guess and mv.verify(gold, guess, timeout_seconds=None) else 0.0


def think_format_reward(completion: str, answer: Optional[str] = None) -> float:
    """1.0 for ``<think>reasoning</think>answer`` (one think block, something after it), else 0.0."""
    return 1.0 if THINK_FORMAT.match(completion.strip()) else 0.0


def regex_reward(pattern: str) -> Callable[[str, Optional[str]], float]:
    """A check that is 1.0 when ``pattern`` is found in the completion (``re.DOTALL``)."""
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise UserInputError(f"--reward regex:{pattern}: invalid regular expression ({exc})") from None

    def regex(completion: str, answer: Optional[str] = None) -> float:
        return 1.0 if compiled.search(completion) else 0.0

    regex.__name__ = f"regex:{pattern}"
    return regex


def check_reward_spec(spec: Optional[str]) -> None:
    """Raise ``UserInputError`` for a bad named ``--reward`` (before any model loads). User functions
    (``module:function``) are checked when they are imported."""
    if spec is None or spec == "format":
        return
    if spec == "math":
        _math_verify()
    elif spec.startswith("regex:"):
        if not spec[len("regex:"):]:
            raise UserInputError("--reward regex:PATTERN: the pattern is empty")
        regex_reward(spec[len("regex:"):])
    elif ":" not in spec:
        raise UserInputError(f"--reward {spec!r}: expected math, format, regex:PATTERN, MODULE:FUNCTION or "
                             "PATH.py:FUNCTION")


def is_batched(fn: Callable) -> bool:
    """TRL-style ``reward(prompts, completions, **columns)``: a ``completions`` parameter or ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "completions" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def reward_terms(spec: Optional[str], task_terms: list) -> list:
    """The run's reward terms: the task's, with ``--reward`` added (or, for ``math``, in place of the
    task's answer check, the first term)."""
    from .rewards import RewardTerm, load_reward_fn

    if spec is None:
        return list(task_terms)
    if spec == "math":
        return [RewardTerm.builtin(math_reward, name="math")] + list(task_terms[1:])
    if spec == "format":
        return list(task_terms) + [RewardTerm.builtin(think_format_reward, name="format")]
    if spec.startswith("regex:"):
        return list(task_terms) + [RewardTerm.builtin(regex_reward(spec[len("regex:"):]), name=spec)]
    fn = load_reward_fn(spec)
    if is_batched(fn):
        return list(task_terms) + [RewardTerm(spec, lambda prompts, completions, answers, columns:
                                              fn(prompts, completions, **columns), batched=True)]
    return list(task_terms) + [RewardTerm.user(fn, name=spec)]


def batched_term_values(reward_function, term, prompts: Sequence[str], completions: Sequence[str],
                        answers: Sequence[Optional[str]], columns: Optional[Dict[str, List[Any]]]) -> List[float]:
    """One call of a batched term for the whole batch, under the reward timeout; each value then goes
    through the per-sample checks of ``RewardFunction`` (finite number, failure warning and count)."""
    from .rewards import RewardTerm, call_with_timeout

    n = len(completions)
    cols = dict(columns) if columns else {"answer": list(answers)}
    try:
        values = call_with_timeout(term.fn, (list(prompts), list(completions), list(answers), cols),
                                   reward_function.timeout)
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != n:
            raise TypeError(f"a batched reward must return {n} values (one per completion), got "
                            f"{type(values).__name__} {values!r:.80}")
        outcome: Any = list(values)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit and timeouts too: re-raised per sample below
        outcome = exc

    def item(prompt, completion, index):
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome[index]

    per_sample = RewardTerm(term.name, item, term.weight)
    return [reward_function._term_value(per_sample, p, c, i) for i, (p, c) in enumerate(zip(prompts, completions))]
