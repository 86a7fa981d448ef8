"""Token selection over the whole batch: Clip-Cov and KL-Cov (Cui et al. 2025, "The Entropy Mechanism of
Reinforcement Learning for Reasoning Language Models", arXiv 2505.22617) as verl 0.9 implements them, and
TRL 1.16's high-entropy token mask (``top_entropy_quantile``, Wang et al. 2025, "Beyond the 80/20 Rule")
and off-policy sequence mask (``off_policy_mask_threshold``, DeepSeek-V3.2's OPSM).

Both rank tokens by the centred covariance cov_t = (A_t − mean A)·(logp_t − mean logp) over the counted
tokens of the batch (one pass; the means are the batch's, so pass the whole data-parallel batch for a
global selection). The selection is detached: it feeds ``fastpo.policy_loss`` as per-token weights
(Clip-Cov) or as the tokens that carry KL-Cov's |logp − old_logp| term, and the loss stays one fused pass.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

try:
    from fastpo import _C
except ImportError:  # no C++ build: the torch path below
    _C = None

__all__ = ["clip_cov_weights", "kl_cov_tokens", "kl_cov_index", "high_entropy_mask", "off_policy_sequence_mask"]


class _TopK(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


def _fused(*ts: torch.Tensor) -> bool:
    """The C++ selection pass applies: contiguous CPU tensors of one dtype, float32 or float64, eager."""
    if _C is None or torch.compiler.is_compiling():  # traced: the torch path (no NumPy views)
        return False
    return all(t.device.type == "cpu" and t.is_contiguous() and t.dtype == ts[0].dtype
               for t in ts) and ts[0].dtype in (torch.float32, torch.float64)


def _np(t: torch.Tensor):
    """A flat NumPy view (the tensor is contiguous: see ``_fused``)."""
    return t.detach().reshape(-1).numpy()


def _as(v: float, like: torch.Tensor) -> float:
    """``v`` rounded to ``like``'s dtype, as torch rounds a Python scalar operand."""
    return float(torch.tensor(v, dtype=like.dtype))


def _world(group):
    import torch.distributed as dist
    return dist.get_world_size(group), dist.get_rank(group)


def _all_gather(x: torch.Tensor, group) -> list:
    import torch.distributed as dist
    parts = [torch.empty_like(x) for _ in range(_world(group)[0])]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def _means_and_count(a: torch.Tensor, x: torch.Tensor, m: torch.Tensor, group):
    """(mean A, mean logp, count) over the counted tokens, of every rank of ``group`` when given; the sums in
    float64 on either path (one C++ pass when it applies), so both paths give the same means."""
    if _fused(x, a) and m.is_contiguous() and m.dtype in (torch.bool, torch.uint8):
        sums = torch.tensor(_C.masked_sums(_np(x), _np(a), _np(m)), dtype=torch.float64)
    else:
        zero = torch.zeros((), dtype=a.dtype, device=a.device)
        sums = torch.stack([torch.where(m, a, zero).sum(dtype=torch.float64),
                            torch.where(m, x, zero.to(x.dtype)).sum(dtype=torch.float64),
                            torch.count_nonzero(m).double()])
    if group is not None:
        import torch.distributed as dist
        dist.all_reduce(sums, group=group)
    n = sums[2].clamp(min=1)
    return (sums[0] / n).to(a.dtype), (sums[1] / n).to(x.dtype), int(sums[2].item())


def _check(logp, old_logp, advantages, mask, ratio, name):
    for n, t in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{n} must have logp's shape {tuple(logp.shape)}, got {tuple(t.shape)}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {ratio}")


@torch.no_grad()
def clip_cov_weights(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                     clip_low: float = 0.2, clip_high: float = 0.2, clip_cov_ratio: float = 2e-4,
                     clip_cov_lb: float = 1.0, clip_cov_ub: float = 5.0,
                     generator: Optional[torch.Generator] = None, group=None) -> torch.Tensor:
    """Clip-Cov's per-token weight [B, T] (1 = kept, 0 = its gradient is cut), as verl's ``clip_cov``.

    Candidates are counted tokens that PPO's clip has not already clipped (−A·clip(r) > −A·r) with
    clip_cov_lb < cov_t < clip_cov_ub; max(1, ⌊clip_cov_ratio·Σmask⌋) of them, drawn uniformly at random
    with ``generator`` (``torch.randperm``: the global generator when None, as verl), get weight 0.
    With a process ``group`` the means, the count and the draw are global: the candidates of all ranks are
    numbered rank by rank and one permutation of them is drawn; every rank must hold a generator in the
    same state (e.g. seeded alike) so that they draw the same one. Multiply the result into
    ``policy_loss``'s ``is_weights``.
    """
    _check(logp, old_logp, advantages, mask, clip_cov_ratio, "clip_cov_ratio")
    m = mask if mask.dtype == torch.bool else mask != 0
    x, a = logp.detach(), advantages.detach()
    mean_a, mean_x, count = _means_and_count(a, x, m, group)
    num = max(int(clip_cov_ratio * count), 1)
    if _fused(x, old_logp, a):  # one C++ pass (selection.h); flat indices in torch.nonzero's order
        idx = torch.from_numpy(_C.clip_cov_candidates(
            _np(x), _np(old_logp), _np(a), _np(m), float(mean_a), float(mean_x),
            _as(1 - clip_low, x), _as(1 + clip_high, x), _as(clip_cov_lb, x), _as(clip_cov_ub, x)))
    else:
        ratio = torch.exp(x - old_logp)
        clipped = (-a * torch.clamp(ratio, 1 - clip_low, 1 + clip_high) > -a * ratio) & m
        cov = (a - mean_a) * (x - mean_x)
        cov = torch.where(m & ~clipped, cov, torch.full_like(cov, -float("inf")))
        idx = torch.nonzero(((cov < clip_cov_ub) & (cov > clip_cov_lb) & m).reshape(-1), as_tuple=True)[0]
    keep = torch.ones(a.shape, dtype=a.dtype, device=a.device)
    offset, total = 0, len(idx)
    if group is not None:
        counts = [int(c) for c in _all_gather(torch.tensor([len(idx)], device=a.device), group)]
        offset, total = sum(counts[:_world(group)[1]]), sum(counts)
    if total > 0:
        pick = torch.randperm(total, generator=generator)[:min(num, total)] - offset
        pick = pick[(pick >= 0) & (pick < len(idx))].to(idx.device)
        if pick.numel():
            keep.view(-1)[idx[pick]] = 0
    return keep


@torch.no_grad()
def kl_cov_tokens(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                  kl_cov_ratio: float = 2e-4, group=None) -> torch.Tensor:
    """KL-Cov's selected tokens, bool [B, T]: the max(1, ⌊kl_cov_ratio·Σmask⌋) counted tokens of largest
    cov_t (``torch.topk``, as verl's ``kl_cov``); none when nothing is counted. With a process ``group``
    the means, the count and the top-k are global (each rank's top-k candidates are all-gathered)."""
    index, _ = kl_cov_index(logp, advantages, mask, kl_cov_ratio=kl_cov_ratio, group=group)
    selected = torch.zeros(logp.shape, dtype=torch.bool, device=logp.device)
    selected.view(-1)[index] = True
    return selected


@torch.no_grad()
def kl_cov_index(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                 kl_cov_ratio: float = 2e-4, group=None):
    """(flat indices into ``logp``'s elements, ascending, int64; count of counted tokens, global with a
    ``group``) of :func:`kl_cov_tokens`'s selection, without a pass over the batch to find them (this rank's
    share of the k = max(1, ⌊kl_cov_ratio·count⌋) selected tokens)."""
    _check(logp, None, advantages, mask, kl_cov_ratio, "kl_cov_ratio")
    m = mask if mask.dtype == torch.bool else mask != 0
    a_all, x_all = advantages.detach(), logp.detach()
    mean_a, mean_x, count = _means_and_count(a_all, x_all, m, group)
    if count == 0:
        return torch.zeros(0, dtype=torch.int64, device=logp.device), 0
    k = max(1, int(count * kl_cov_ratio))
    if _fused(x_all, a_all):  # one C++ pass with a size-k heap (selection.h): (values, flat indices), best first
        vals, top = (torch.from_numpy(t) for t in _C.cov_topk(_np(x_all), _np(a_all), _np(m), float(mean_a),
                                                               float(mean_x), min(k, count)))
        if group is None:
            return top.sort().values, count
        local = _TopK(vals, top)
        flat = torch.arange(m.numel())
    else:
        flat = torch.nonzero(m.reshape(-1), as_tuple=True)[0]
        cov = (a_all.reshape(-1)[flat] - mean_a) * (x_all.reshape(-1)[flat] - mean_x)
        if group is None:
            return flat[torch.topk(cov, k, largest=True).indices].sort().values, count
        local = torch.topk(cov, min(k, cov.numel()), largest=True)
    vals = torch.full((k,), -float("inf"), dtype=local.values.dtype, device=m.device)
    vals[:local.values.numel()] = local.values
    top = torch.topk(torch.cat(_all_gather(vals, group)), k, largest=True).indices
    mine = top[(top // k) == _world(group)[1]] % k
    mine = mine[mine < local.indices.numel()]
    return flat[local.indices[mine]].sort().values, count


@torch.no_grad()
def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float, *,
                      threshold: Optional[torch.Tensor] = None, group=None) -> torch.Tensor:
    """TRL's high-entropy mask, bool [B, T]: counted tokens whose entropy is >= the (1 − top_entropy_quantile)
    quantile of the counted entropies (``torch.quantile``, linear interpolation). Global over data-parallel
    ranks: pass the ``threshold`` computed elsewhere, or a process ``group`` (the counted entropies of every
    rank are all-gathered, as TRL does). Multiply the result into ``policy_loss``'s ``is_weights``."""
    if entropy.shape != mask.shape:
        raise ValueError(f"mask must have entropy's shape {tuple(entropy.shape)}, got {tuple(mask.shape)}")
    if not 0.0 < top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must lie in (0, 1], got {top_entropy_quantile}")
    m = mask != 0
    if threshold is None:
        local = entropy.detach()[m].float()
        if group is not None:
            import torch.distributed as dist
            sizes = [torch.zeros((), dtype=torch.long, device=local.device) for _ in range(dist.get_world_size(group))]
            dist.all_gather(sizes, torch.tensor(local.numel(), device=local.device), group=group)
            padded = torch.full((int(max(sizes)),), float("nan"), device=local.device)
            padded[:local.numel()] = local
            parts = [torch.empty_like(padded) for _ in sizes]
            dist.all_gather(parts, padded, group=group)
            local = torch.cat([p[:int(n)] for p, n in zip(parts, sizes)])
        if local.numel() == 0:
            return torch.zeros_like(m)
        threshold = torch.quantile(local, 1.0 - top_entropy_quantile)
    return (torch.where(m, entropy.detach(), torch.zeros_like(entropy)) >= threshold) & m


@torch.no_grad()
def off_policy_sequence_mask(logp: torch.Tensor, sampling_logp: torch.Tensor, advantages: torch.Tensor,
                             mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """TRL's OPSM, [B, 1] of 0/1 in the mask's dtype: a sequence is kept when its advantage is >= 0 or the
    mean over its counted tokens of sampling_logp − logp is <= threshold; NaN sampling log-probs (tokens
    vLLM could not score) count as 0. ``advantages`` is [B] or [B, T] (its first token per row then)."""
    m = (mask != 0).to(logp.dtype)
    kl = torch.nan_to_num(sampling_logp - logp.detach(), nan=0.0)
    avg = (kl * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    adv = advantages.detach()
    adv = adv[:, None] if adv.dim() == 1 else adv[:, :1]
    return ((adv >= 0) | (avg <= threshold)).to(mask.dtype if mask.dtype.is_floating_point else logp.dtype)
