"""Segment statistics shared by the group-relative estimators (no Python loop over groups, no host sync).

Groups are dense indices g(i) ∈ [0, B): ``i // group_size`` for contiguous runs, or the rank of
``group_ids[i]`` among the distinct ids (a stable sort, a run-start flag and a cumulative sum: static
shapes, so ``torch.compile(dynamic=True, fullgraph=True)`` traces it without a data-dependent size).
Per-group sums are ``index_add`` into B bins (at most B groups).

NaN semantics (TRL's, ``trl.GRPOTrainer`` 1.16): an element whose ``valid`` flag is False (a NaN score:
"this reward does not apply to this sample") is left out of every statistic, by selection
(``torch.where``), never by multiplying with a 0 weight, so that its value, NaN or ±inf, cannot reach a
counted result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["dense_groups", "GroupMoments", "group_moments", "safe_div", "masked_std", "group_sum"]


def dense_groups(batch: int, group_ids: Optional[torch.Tensor], group_size: Optional[int], device) -> torch.Tensor:
    """g [B] int64: the dense group index of every element (ids need not be sorted or contiguous)."""
    if group_ids is None:
        return torch.arange(batch, device=device) // group_size
    ids = group_ids.reshape(-1)
    sorted_ids, perm = torch.sort(ids, stable=True)
    starts = torch.ones_like(sorted_ids, dtype=torch.int64)
    starts[1:] = (sorted_ids[1:] != sorted_ids[:-1]).to(torch.int64)
    rank = starts.cumsum(0) - 1
    return torch.empty_like(rank).scatter_(0, perm, rank)


def group_sum(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per element: the sum of ``x`` over its group (``x`` already 0 where it must not count)."""
    return x.new_zeros(g.shape[0]).index_add(0, g, x)[g]


@dataclass
class GroupMoments:
    """Per element of a group-structured batch (all ``[B]``)."""

    count: torch.Tensor    # valid members of its group
    centred: torch.Tensor  # x − group mean (0 where not valid)
    var: torch.Tensor      # Bessel-corrected group variance (0 with fewer than two valid members)
    x: torch.Tensor        # x where valid, else 0


def group_moments(x: torch.Tensor, valid: torch.Tensor, g: torch.Tensor, *,
                  singleton_raw: bool = False) -> GroupMoments:
    """Two-pass (mean, then centred squares) group moments over the valid elements.

    ``singleton_raw``: a group with one valid member gets mean 0 and variance 1 (verl's convention:
    the raw score survives); otherwise its member is centred to 0 (fastpo's: a group of one gives 0).
    """
    w = valid.to(x.dtype)
    xv = torch.where(valid, x, torch.zeros_like(x))
    count = group_sum(w, g)
    mean = group_sum(xv, g) / count.clamp(min=1.0)
    if singleton_raw:
        mean = torch.where(count == 1.0, torch.zeros_like(mean), mean)
    centred = torch.where(valid, xv - mean, torch.zeros_like(xv))
    var = group_sum(centred.square(), g) / (count - 1.0).clamp(min=1.0)
    if singleton_raw:
        var = torch.where(count == 1.0, torch.ones_like(var), var)
    return GroupMoments(count, centred, var, xv)


def safe_div(num: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """num / denom, and 0 where denom is 0 (a flat group with eps = 0: 0/0)."""
    ok = denom > 0
    return torch.where(ok, num / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(num))


def masked_std(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std (0-d) of the valid elements of ``x``; 0 with fewer than two."""
    w = valid.to(x.dtype)
    n = w.sum()
    xv = torch.where(valid, x, torch.zeros_like(x))
    mean = xv.sum() / n.clamp(min=1.0)
    centred = torch.where(valid, xv - mean, torch.zeros_like(xv))
    var = centred.square().sum() / (n - 1.0).clamp(min=1.0)
    return torch.where(n >= 2.0, var.sqrt(), torch.zeros_like(var))
