"""Rewards: the built-in answer checks, user reward functions loaded from ``module:function``, and
``RewardFunction``, the weighted sum of reward terms applied to a batch of completions.

Two signatures meet here:

- built-in checks take ``(completion, answer)`` (they compare against the task's reference answer);
- user functions take ``(prompt, completion)`` and return a float.

``RewardTerm`` adapts both to one form, ``fn(prompt, completion, answer) -> float``, and
``RewardFunction`` sums ``weight * fn(...)`` over its terms for every sample:

    r_i = sum_k  w_k * f_k(prompt_i, completion_i, answer_i)

A term that raises (``sys.exit`` included), takes longer than the ``timeout`` (``--reward-timeout``),
or returns something that is not a finite number (NaN, inf, None, a string, a list) contributes 0.0 for
that sample; a ``RewardWarning`` names the term and the error (once per distinct message), the failure
is counted in ``RewardFunction.failures`` (and, per step, in ``metrics.jsonl``'s ``reward_failures``),
and training goes on. Only Ctrl-C (``KeyboardInterrupt``) stops it.

The timeout: on the main thread of a POSIX process, a ``SIGALRM`` timer interrupts the call (a sleep, a
blocking read or a Python loop); elsewhere the call runs in a daemon thread that is abandoned when it
overruns (Python cannot stop a thread, so it keeps running in the background). Code that holds the
GIL inside one C call (a catastrophic regular expression) cannot be interrupted by either. A reward
that sets its own alarm (``signal.alarm``, as timeout decorators do) replaces this one for the rest of
that call. The limit is per call: a term that never returns costs ``timeout`` seconds per sample.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import re
import signal
import sys
import threading
import warnings
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import UserInputError

# An int or a decimal with an optional sign: "42", "-5", "+3", "2.50", ".5", "7."
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
# The built-in task's completion format: a bare integer in canonical form (no sign on zero, no leading
# zeros, '-' only for negatives), surrounding whitespace allowed.
_BARE_INTEGER = re.compile(r"\s*(?:0|-?[1-9]\d*)\s*")


class RewardWarning(UserWarning):
    """A reward term failed on a sample (its reward for that sample was set to 0.0)."""


def _parse_number(text: str) -> Fraction | None:
    """The first number in ``text`` as an exact ``Fraction``, or None when there is none."""
    m = _NUMBER.search(text)
    return None if m is None else Fraction(m.group())


def exact_answer_reward(completion: str, answer: str) -> float:
    """1.0 when the first number in ``completion`` (int or decimal, optional sign) equals ``answer``
    numerically (``"42.0"`` matches ``"42"``), else 0.0.

    Raises ``ValueError`` when ``answer`` itself is not a number (a data problem, reported by
    ``RewardFunction`` as a warning rather than silently scoring 0)."""
    answer = answer.strip()
    if _NUMBER.fullmatch(answer) is None:
        raise ValueError(f"reference answer {answer!r} is not a number")
    got = _parse_number(completion)
    return 1.0 if got is not None and got == Fraction(answer) else 0.0


def format_reward(completion: str, answer: str | None = None) -> float:
    """1.0 when ``completion`` is exactly the built-in task's answer format, else 0.0.

    Format: a bare integer in canonical decimal form, ``0 | -?[1-9][0-9]*``, optionally surrounded by
    whitespace; nothing else (no '=', no second number, no text). ``answer`` is ignored (it is there so
    every built-in check has the ``(completion, answer)`` signature)."""
    return 1.0 if _BARE_INTEGER.fullmatch(completion) else 0.0


# ----------------------------------------------------------------------------------------------------
# Loading user reward functions


def _load_file_module(path_text: str, spec: str) -> Any:
    path = Path(path_text)
    if not path.is_file():
        raise UserInputError(f"reward function {spec!r}: no such file: {path_text}")
    resolved = path.resolve()
    # A stable, unique module name per file, registered in sys.modules so the functions pickle.
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    name = f"fastpo_user_reward_{resolved.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise UserInputError(f"reward function {spec!r}: cannot load {path_text} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    # Let the file import its sibling modules while it is executed.
    sys.path.insert(0, str(resolved.parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise UserInputError(
            f"reward function {spec!r}: importing {path_text} failed: {type(e).__name__}: {e}"
        ) from e
    finally:
        sys.path.remove(str(resolved.parent))
    return module


def _import_module(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise UserInputError(
                f"reward function {spec!r}: no module named {e.name!r} "
                "(give an importable module or a path ending in .py)"
            ) from None
        raise UserInputError(f"reward function {spec!r}: importing {module_name} failed: {e}") from e
    except Exception as e:
        raise UserInputError(
            f"reward function {spec!r}: importing {module_name} failed: {type(e).__name__}: {e}"
        ) from e


def load_reward_fn(spec: str) -> Callable[..., float]:
    """Loads the callable named by ``spec``: ``"package.module:function"`` (imported normally) or
    ``"path/to/file.py:function"`` (loaded from the file). ``function`` may be dotted
    (``"mod:Class.method"``). Raises ``UserInputError`` when it cannot be found or is not callable."""
    if not isinstance(spec, str) or ":" not in spec:
        raise UserInputError(f"reward function {spec!r}: expected MODULE:FUNCTION or PATH.py:FUNCTION")
    module_part, _, attr_path = spec.rpartition(":")
    if not module_part or not attr_path:
        raise UserInputError(f"reward function {spec!r}: expected MODULE:FUNCTION or PATH.py:FUNCTION")
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        module = _load_file_module(module_part, spec)
    else:
        module = _import_module(module_part, spec)
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UserInputError(f"reward function {spec!r}: {module_part} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserInputError(
            f"reward function {spec!r}: {attr_path} is not callable (it is a {type(obj).__name__})"
        )
    return obj


# ----------------------------------------------------------------------------------------------------
# Combining terms


@dataclass(frozen=True)
class RewardTerm:
    """One weighted reward term in the common form ``fn(prompt, completion, answer) -> float``."""

    name: str
    fn: Callable[[str, str, str | None], Any]
    weight: float = 1.0
    # batched: ``fn(prompts, completions, answers, columns) -> list`` called once per batch (verifiers.py)
    batched: bool = False

    @classmethod
    def builtin(
        cls, fn: Callable[[str, str], Any], weight: float = 1.0, name: str | None = None
    ) -> "RewardTerm":
        """Wraps an answer check ``fn(completion, answer)``."""
        return cls(name or fn.__name__, lambda prompt, completion, answer: fn(completion, answer), weight)

    @classmethod
    def user(
        cls, fn: Callable[[str, str], Any], weight: float = 1.0, name: str | None = None
    ) -> "RewardTerm":
        """Wraps a user reward ``fn(prompt, completion)``."""
        name = name or getattr(fn, "__name__", repr(fn))
        return cls(name, lambda prompt, completion, answer: fn(prompt, completion), weight)

    @classmethod
    def from_spec(cls, spec: str, weight: float = 1.0) -> "RewardTerm":
        """A user term loaded with ``load_reward_fn(spec)``, named by the spec."""
        return cls.user(load_reward_fn(spec), weight, name=spec)


class RewardTimeout(BaseException):
    """A reward call overran ``--reward-timeout`` (a ``BaseException``, so that a reward's own
    ``except Exception`` does not swallow it)."""


def call_with_timeout(fn: Callable[..., Any], args: tuple, timeout: float | None) -> Any:
    """``fn(*args)``, or :class:`RewardTimeout` after ``timeout`` seconds (None or 0: no limit)."""
    if not timeout:
        return fn(*args)
    if (threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
            and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)):  # no one else's timer is running
        return _call_with_alarm(fn, args, timeout)
    return _call_in_thread(fn, args, timeout)


def _call_with_alarm(fn, args, timeout: float):
    def overran(signum, frame):
        raise RewardTimeout(f"took longer than --reward-timeout {timeout:g} s")

    previous = signal.signal(signal.SIGALRM, overran)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)


def _call_in_thread(fn, args, timeout: float):
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="fastpo-reward", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RewardTimeout(f"took longer than --reward-timeout {timeout:g} s (left running in a background thread)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _as_finite_float(value: Any) -> float:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"returned {type(value).__name__} {value!r:.80}, expected a float")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"returned non-finite value {out}")
    return out


class RewardFunction:
    """``r_i = sum_k w_k * f_k(prompt_i, completion_i, answer_i)`` over a batch.

    A failing term (raises, calls ``sys.exit``, overruns ``timeout`` seconds, or returns a non-number /
    non-finite value) contributes 0.0 to that sample, warns once per distinct ``(term, message)`` with
    ``RewardWarning``, and is counted in ``failures``. ``timeout`` None or 0: no limit."""

    def __init__(self, terms: Sequence[RewardTerm], timeout: float | None = None):
        if not terms:
            raise UserInputError("a reward function needs at least one term")
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise UserInputError(f"reward terms must have distinct names, got {names}")
        for t in terms:
            if not math.isfinite(t.weight):
                raise UserInputError(f"reward term {t.name!r}: weight must be finite, got {t.weight}")
        if timeout is not None and not (math.isfinite(timeout) and timeout >= 0):
            raise UserInputError(f"reward timeout must be >= 0 seconds, got {timeout}")
        self.terms = list(terms)
        self.timeout = timeout
        self.failures: Counter[str] = Counter()
        self._warned: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        return "RewardFunction(" + " + ".join(f"{t.weight:g}*{t.name}" for t in self.terms) + ")"

    def _term_value(self, term: RewardTerm, prompt: str, completion: str, answer: str | None) -> float:
        try:
            return _as_finite_float(call_with_timeout(term.fn, (prompt, completion, answer), self.timeout))
        except SystemExit as e:
            message = f"called sys.exit({e.code!r})"
        except RewardTimeout as e:
            message = str(e)
        except Exception as e:
            message = f"{type(e).__name__}: {e}"
        self.failures[term.name] += 1
        if (term.name, message) not in self._warned:
            self._warned.add((term.name, message))
            warnings.warn(
                f"reward function {term.name} failed ({message}); that sample's term is set to 0.0",
                RewardWarning,
                stacklevel=3,
            )
        return 0.0

    def breakdown(
        self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str | None] | None = None,
        columns: dict[str, list] | None = None,
    ) -> dict[str, list[float]]:
        """Unweighted per-term values: ``{term name: [f_k(sample_i) for i]}`` (for logging)."""
        n = len(completions)
        if len(prompts) != n or (answers is not None and len(answers) != n):
            raise ValueError(
                f"batch sizes differ: {len(prompts)} prompts, {n} completions, "
                f"{'no' if answers is None else len(answers)} answers"
            )
        ans = [None] * n if answers is None else answers
        rows = list(zip(prompts, completions, ans))
        from .verifiers import batched_term_values  # batched terms: one call per batch, with the columns

        return {t.name: batched_term_values(self, t, prompts, completions, ans, columns) if t.batched
                else [self._term_value(t, p, c, a) for p, c, a in rows] for t in self.terms}

    def total(self, breakdown: dict[str, list[float]]) -> list[float]:
        """Weighted sum of a ``breakdown``."""
        columns = [[t.weight * v for v in breakdown[t.name]] for t in self.terms]
        return [math.fsum(vals) for vals in zip(*columns)]

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str | None] | None = None,
        columns: dict[str, list] | None = None,
    ) -> list[float]:
        """The total reward of every sample (``columns``: extra dataset fields for batched terms)."""
        return self.total(self.breakdown(prompts, completions, answers, columns))


# Default for the built-in arithmetic task: exact answer (weight 1.0) plus a small bonus for the clean
# format (0.1), so a right answer is worth 1.1, a right number followed by junk 1.0, a well-formed wrong
# answer 0.1. The format bonus keeps completions short and eos-terminated without dominating the signal.
DEFAULT_FORMAT_WEIGHT = 0.1


def default_reward_function(format_weight: float = DEFAULT_FORMAT_WEIGHT) -> RewardFunction:
    """``1.0 * exact_answer_reward + format_weight * format_reward`` (the built-in task's reward)."""
    terms = [RewardTerm.builtin(exact_answer_reward, 1.0)]
    if format_weight:
        terms.append(RewardTerm.builtin(format_reward, format_weight))
    return RewardFunction(terms)
