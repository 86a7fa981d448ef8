"""Mini-batches and micro-batches of one step's experience (``--mini-batches``, ``--micro-batch-size``).

A rollout batch of B sequences is cut into ``--mini-batches`` consecutive parts, one optimiser step
each (PPO-style; ``--epochs-per-step`` repeats the whole pass). Each mini-batch is cut again into
micro-batches of ``--micro-batch-size`` sequences, one forward and backward each, the gradients
accumulating. Every micro-batch carries its mini-batch's :class:`~.algos.base.StepTotals`, which the
algorithms normalise their losses by, so the accumulated gradient equals the unsplit mini-batch's
(up to float rounding) whatever the aggregation: token means get the mini-batch's token count as
``num_tokens``, sequence means and Dr.GRPO's ``Σ/(B·L)`` a share factor.

Metrics of the micro-batches combine as their sum for the loss and its parts (names ending in
``loss``: they add up to the mini-batch's) and as a token-weighted mean for the rest."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch

from .algos.base import Experience, StepTotals
from .batch import even_chunks, sequence_chunks


def split_experience(exp: Experience, *, mini_batches: int, micro_batch_size: Optional[int],
                     dist=None) -> List[List[Experience]]:
    """The mini-batches of ``exp``, each a list of micro-batch experiences. Unsplit (one mini-batch,
    no micro-batch size) it is ``[[exp]]`` itself. Every tensor in ``exp.tensors`` must be per
    response token (``[N]``)."""
    if exp.empty or (mini_batches == 1 and micro_batch_size is None):
        return [[exp]]
    batch = exp.batch
    n = batch.num_response_tokens
    for key, value in exp.tensors.items():
        if value.shape[:1] != (n,):
            raise ValueError(f"micro-batches split per-token tensors [N={n}]; experience tensor {key!r} has "
                             f"shape {tuple(value.shape)}")
    mask = exp.tensors.get("mask")
    minis = []
    for start, stop in even_chunks(batch.num_sequences, min(mini_batches, batch.num_sequences)):
        t0, t1 = batch.token_span(start, stop)
        totals = StepTotals.of(batch.select(start, stop), None if mask is None else mask[t0:t1], dist)
        minis.append([_select(exp, a, b, totals) for a, b in sequence_chunks(start, stop, micro_batch_size)])
    return minis


def _select(exp: Experience, start: int, stop: int, totals: StepTotals) -> Experience:
    t0, t1 = exp.batch.token_span(start, stop)
    return dataclasses.replace(exp, batch=exp.batch.select(start, stop),
                               tensors={k: v[t0:t1] for k, v in exp.tensors.items()}, metrics={},
                               num_tokens=0, totals=totals)


def accumulate_gradients(algo, micro_batches: List[Experience],
                         params: List[torch.Tensor]) -> Tuple[float, Dict[str, Optional[float]]]:
    """Forward and backward every micro-batch (gradients accumulate in ``.grad``); the mini-batch's
    loss (the sum of the micro-batches') and its metrics. A micro-batch with no response token
    backpropagates a zero loss through ``params``, so every data-parallel rank runs as many
    backward passes."""
    if len(micro_batches) == 1:  # unsplit: the loss and metrics as the algorithm gives them
        micro = micro_batches[0]
        loss, metrics = (sum(p.sum() * 0.0 for p in params), {}) if micro.empty else algo.loss(micro)
        loss.backward()
        return float(loss.detach()), metrics
    total = 0.0
    sums: Dict[str, float] = {}
    weights: Dict[str, float] = {}
    seen: Dict[str, None] = {}
    for micro in micro_batches:
        if micro.empty:
            loss, metrics = sum(p.sum() * 0.0 for p in params), {}
        else:
            loss, metrics = algo.loss(micro)
        loss.backward()
        total += float(loss.detach())
        weight = float(micro.batch.num_response_tokens) if micro.batch is not None else 0.0
        for key, value in metrics.items():
            seen[key] = None
            if value is None:
                continue
            additive = key.endswith("loss")
            sums[key] = sums.get(key, 0.0) + (value if additive else value * weight)
            weights[key] = weights.get(key, 0.0) + (1.0 if additive else weight)
    merged: Dict[str, Optional[float]] = {}
    for key in seen:
        if key not in sums:
            merged[key] = None
        elif key.endswith("loss"):
            merged[key] = sums[key]
        else:
            merged[key] = sums[key] / weights[key] if weights[key] > 0 else None
    return total, merged
