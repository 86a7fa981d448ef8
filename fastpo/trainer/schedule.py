"""The learning-rate schedule (``--lr-scheduler constant|linear|cosine``, ``--warmup-steps``).

The rate is a function of the training step ``s`` (1-based, of ``T = --max-steps``) alone, set on every
parameter group before the step's update (its ``--mini-batches`` x ``--epochs-per-step`` optimiser
steps share it), so ``--resume`` needs no scheduler state::

    s <= W:   lr = base · s / W                              (linear warm-up, W = --warmup-steps)
    s >  W:   p = (s − W − 1) / (T − W)  in [0, 1)
              constant  lr = base
              linear    lr = base · (1 − p)
              cosine    lr = base · (1 + cos(π·p)) / 2

Transformers' schedules (TRL's ``lr_scheduler_type``) have the same shapes but count optimiser steps
from 0, so their first warm-up step and their last step have lr 0; here no step has lr 0. TRL's default
is ``linear``; fastpo's is ``constant``, the setting the bundled trainer's reward tests were tuned at."""

from __future__ import annotations

import math

SCHEDULERS = ("constant", "linear", "cosine")


def lr_factor(step: int, *, kind: str, warmup: int, total: int) -> float:
    """The multiplier of the base learning rate at training step ``step`` (see the module docstring)."""
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown lr scheduler {kind!r}; choose from {', '.join(SCHEDULERS)}")
    if warmup > 0 and step <= warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    progress = min(max((step - warmup - 1) / max(total - warmup, 1), 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer, factor: float) -> float:
    """Set every parameter group's rate to its base rate (``--lr``, ``--critic-lr``) times ``factor``;
    the first group's new rate."""
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
