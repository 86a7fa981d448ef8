"""Several weighted rewards (``--reward`` given more than once, ``--reward-weights``,
``--multi-objective``).

A run's reward terms are the task's (arithmetic: the exact-number check, weight 1, and the format
bonus, weight 0.1; countdown: its check; a data file: the exact-number check), then one term per
``--reward`` in the order given (``math`` takes the place of the task's answer check instead).
``--reward-weights 1,0.5`` gives one weight per ``--reward`` (default 1 each); the task's own terms
keep their weights. Each term's unweighted mean and std over the step's responses go into
``metrics.jsonl`` as ``rewards/NAME/mean`` and ``rewards/NAME/std`` (TRL's names), beside
``reward_mean``, the weighted sum's.

Advantages. Without ``--multi-objective`` the terms are summed into one reward and the algorithm's
own estimator normalises it (as before). With it, the scores ``[B, K]`` and weights ``[K]`` go to
:func:`fastpo.multi_reward_advantages` (grpo, dapo, gspo, dr_grpo):

  sum_then_normalize    Σ_k w_k·s_k, then normalised within the group        (TRL's default)
  normalize_then_sum    each term normalised within its group, Σ_k w_k·a_k, then over the batch (TRL)
  gdpo                  each term normalised within its group, Σ_k w_k·a_k, then whitened (verl's GDPO)

with ``scale_rewards='group'`` (TRL's default; ``'none'`` for dr_grpo, which does not divide by the
std) and the library's eps (TRL's 1e-4, verl's 1e-6 for gdpo)."""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence

import torch

from .errors import UserInputError

MULTI_OBJECTIVE = ("sum_then_normalize", "normalize_then_sum", "gdpo")
# --algo -> multi_reward_advantages' scale_rewards (the algorithms whose advantages are group-normalised)
SCALE_REWARDS = {"grpo": "group", "dapo": "group", "gspo": "group", "dr_grpo": "none"}


def parse_reward_weights(text: Optional[str], specs: Optional[Sequence[str]]) -> Optional[List[float]]:
    """The floats of ``--reward-weights "1,0.5"``, one per ``--reward`` (None: none given)."""
    if text is None:
        return None
    n = len(specs or [])
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise UserInputError(f"--reward-weights: expected comma-separated numbers, got {text!r}") from None
    if len(weights) != n:
        raise UserInputError(f"--reward-weights: {len(weights)} weight(s) for {n} --reward (one per --reward, "
                             "in order; the task's own reward terms keep their weights)")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise UserInputError(f"--reward-weights must be finite numbers, got {text!r}")
    return weights


def check_reward_specs(specs: Optional[Sequence[str]]) -> None:
    from .verifiers import check_reward_spec

    for spec in specs or []:
        check_reward_spec(spec)
    if specs and len(set(specs)) != len(specs):
        raise UserInputError(f"--reward: each reward may be given once, got {', '.join(specs)}")


def run_reward_terms(specs: Optional[Sequence[str]], weights_text: Optional[str], task_terms: list) -> list:
    """The run's reward terms (see the module docstring)."""
    from .verifiers import reward_terms

    weights = parse_reward_weights(weights_text, specs)
    terms = list(task_terms)
    for i, spec in enumerate(specs or []):
        terms = reward_terms(spec, terms)
        if weights is not None:
            index = 0 if spec == "math" else len(terms) - 1  # math replaces the answer check
            terms[index] = dataclasses.replace(terms[index], weight=weights[i])
    return terms


def term_matrix(breakdown: Dict[str, List[float]], names: Sequence[str], device=None) -> torch.Tensor:
    """The unweighted term values ``[B, K]`` float32, columns in ``names`` order."""
    columns = [torch.tensor(breakdown[name], dtype=torch.float32) for name in names]
    return torch.stack(columns, dim=1).to(device)


def mean_std(values) -> tuple:
    """Mean and Bessel-corrected std (0 for fewer than two values), as ``reward_mean``/``reward_std``."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if t.numel() == 0:
        return None, None
    return float(t.mean()), float(t.std()) if t.numel() > 1 else 0.0


def term_statistics(breakdown: Dict[str, List[float]], prefix: str = "") -> Dict[str, Optional[float]]:
    """``{prefix}rewards/NAME/mean`` and ``/std`` of each reward term's values (TRL's metric names)."""
    out = {}
    for name, values in breakdown.items():
        out[f"{prefix}rewards/{name}/mean"], out[f"{prefix}rewards/{name}/std"] = mean_std(values)
    return out


def multi_objective_advantages(scores: torch.Tensor, weights: Sequence[float], *, group_size: int,
                               aggregation: str, algo: str) -> torch.Tensor:
    """Per-sequence advantages ``[B]`` of the term scores ``[B, K]`` (see the module docstring)."""
    import fastpo

    w = torch.tensor(list(weights), dtype=torch.float32, device=scores.device)
    return fastpo.multi_reward_advantages(scores, reward_weights=w, group_size=group_size, aggregation=aggregation,
                                          scale_rewards=SCALE_REWARDS[algo])
