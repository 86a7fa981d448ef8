"""DAPO's dynamic sampling (``--dynamic-sampling``, on by default for ``--algo dapo``), as verl's
``algorithm.filter_groups``: a group whose G responses all got the same reward has zero advantage and
no signal, so the step draws further rounds of ``--prompts-per-step`` prompts (other prompts, other
samples) until ``--prompts-per-step`` groups with non-zero reward variance are collected, or
``--max-sampling-rounds`` rounds were generated (verl's ``max_num_gen_batches``). Surplus informative
groups are dropped (verl keeps the first ``train_batch_size`` too).

Where verl raises once the cap is reached, here the batch is filled up with the first rounds'
uninformative groups and those are masked out of the loss (they leave every count, denominators
included, as before); ``sampling_rounds`` and ``kept_frac`` in ``metrics.jsonl`` show how often that
happens. Under torchrun every rank draws the same number of rounds (until every rank is full), so
that FSDP ranks generate in lock step. With ``--max-sampling-rounds 1`` the step only masks out
the uninformative groups of its one round."""

from __future__ import annotations

from typing import List, Tuple

import torch

from ..rollout.base import Rollout
from .distributed import all_sum


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[P]`` bool: the groups whose rewards are not all equal."""
    groups = rewards.view(-1, group_size)
    return groups.max(dim=1).values > groups.min(dim=1).values


def take_groups(rounds: List[Rollout], group_size: int, groups: List[Tuple[int, int]]) -> Rollout:
    """One rollout of the groups ``(round, group)`` in order, from each round's rollout in ``rounds``."""
    out = Rollout([], [], [], [], [], [])
    for new_index, (r, g) in enumerate(groups):
        src = rounds[r]
        for i in range(g * group_size, (g + 1) * group_size):
            out.prompt_ids.append(src.prompt_ids[i])
            out.response_ids.append(src.response_ids[i])
            out.rollout_logp.append(src.rollout_logp[i])
            out.completions.append(src.completions[i])
            out.group_index.append(new_index)
            out.finished.append(src.finished[i])
    return out


def sample_informative_groups(algo, step: int, *, max_rounds: int):
    """``(examples, rollout, rewards [B], terms [B, K], rounds, generated tokens)``: the step's
    ``prompts_per_step`` groups, informative ones first (see the module docstring)."""
    cfg, trainer = algo.cfg, algo.trainer
    p, g = cfg.prompts_per_step, cfg.group_size
    rounds, kept, filler = [], [], []
    tokens = 0
    for r in range(max_rounds):
        examples, rollout, rewards, terms, _ = algo.scored_rollout(step, g, round_=r)
        rounds.append((examples, rollout, rewards, terms))
        tokens += rollout.num_tokens
        for index, good in enumerate(informative_groups(rewards, g).tolist()):
            (kept if good else filler).append((r, index))
        if all_sum(max(p - len(kept), 0), trainer.dist) == 0:
            break
    chosen = kept[:p]
    chosen += filler[:p - len(chosen)]
    rollout = take_groups([rd[1] for rd in rounds], g, chosen)
    examples = [rounds[r][0][index] for r, index in chosen]
    rows = [torch.arange(index * g, (index + 1) * g) for _, index in chosen]
    rewards = torch.cat([rounds[r][2][rows[k]] for k, (r, _) in enumerate(chosen)])
    terms = torch.cat([rounds[r][3][rows[k]] for k, (r, _) in enumerate(chosen)])
    return examples, rollout, rewards, terms, len(rounds), tokens
