"""Vocab-parallel log-probs: ``token_logprobs`` / ``linear_token_logprobs`` over a vocabulary-sharded
lm_head (or logits) in the Megatron layout, rank r of ``process_group`` holding vocabulary rows
[r·V_r, (r+1)·V_r) (equal shards: Megatron pads V to a multiple of the tensor-parallel size).

Each rank runs the row kernels of its backend on its shard and all-gathers only per-row statistics
([tp, K, N] floats, one collective a call): with z the transformed logits, s = z/τ, and per shard r
the kernels' m_r = max z, ℓ_r = log Σ_{j∈r} e^{(z_j − m_r)/τ}, the local entropy H_r, log Σ p_r² and
mean s, the global ones are, with M = max_r m_r, c_r = (m_r − M)/τ + ℓ_r and L = log Σ_r e^{c_r}
(the global log-norm relative to M), δ_r = c_r − L = lse_r − lse (≤ 0), w_r = e^{δ_r}:
    logp    = logp_r(owner) + δ_owner                  (the owner holds the label)
    entropy = Σ_r w_r·(H_r − δ_r)                       (= lse − Σ p·s)
    log Σ p² = logsumexp_r(2·δ_r + log Σ p_r²)
    mean s  = Σ_r V_r·mean_r / V
    is_top1 = the owner's local first-argmax flag, and the owner is the first rank whose m_r = M
              (the transformed logits are bitwise those of one process, so ties resolve exactly as
              torch.argmax over the whole row).
Every rank computes these from the same gathered numbers, so the outputs are equal on every rank.
Labels are global ids; a rank that does not hold a row's label scores it at local id 0 and fixes
that column in the backward (an [N] correction), so no vocabulary is ever gathered.

Backward, local to each rank: the row kernels' backward with the global (M, L, entropy), which makes
their p_j = e^{(z_j − M)/τ − L} the global softmax. The upstream gradient must be the same on every
rank (the loss computed identically from the replicated outputs, as with Megatron's vocab-parallel
cross-entropy). ``vocab_parallel_linear_token_logprobs`` returns ∂hidden summed over the ranks
(all-reduce; hidden is replicated, each shard contributes G_r·W_r); pass ``reduce_grad_hidden=False``
when the caller's framework already does it (Megatron's copy_to_tensor_model_parallel_region).

``top_k`` / ``top_p`` (the single-process ops' vLLM truncation): the whole rows' raw-logit thresholds by
:mod:`fastpo.ops.vocab_parallel_truncation` (collectives of [tp, k, N] / [tp, 3, N] values, never the
vocabulary), then the kernels' ``threshold_rows``; off-owner rows are scored at the shard's argmax (kept
whenever any of the shard is) and a dropped label (logp = −inf) loses its g_l on every rank.

These run as plain ``torch.autograd.Function``s with c10d collectives and a data-dependent shard-size
check, so they are eager only: both entry points are ``torch.compiler.disable``d (a compiled caller gets a
graph break around them; ``fullgraph=True`` raises), lazily: importing torch._dynamo costs ~2.5 s, and
before it is imported nothing can be compiling.
"""

from __future__ import annotations

import functools
import sys
from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from fastpo import _validation as check
from fastpo._backend import select_backend
from fastpo.ops.lm_head import add_chunk_gradients, check_head_operands, chunk_logits, gradient_buffers
from fastpo.ops.row_kernels import (
    EXTRA_MEAN, EXTRA_SUM_SQ, EXTRA_TOP1, as_row_blocks, extras_mask, flat_labels, named_outputs, result_dtype,
    row_kernels, temperature_args, temperature_input,
)
from fastpo.ops.truncation import check_truncation, is_active
from fastpo.ops.vocab_parallel_rows import TorchRows
from fastpo.ops.vocab_parallel_truncation import shard_thresholds
from fastpo.reference.logprobs import check_logit_transform, check_outputs, transform_logits

__all__ = ["vocab_parallel_token_logprobs", "vocab_parallel_linear_token_logprobs"]

_LOCAL_IGNORE = -1  # local ids lie in [0, V_r): -1 never collides with a real label


def _kernels(backend: str):
    return TorchRows if backend == "reference" else row_kernels(backend)


def _temperature(temperature, rows=None):
    """(τ, the per-row keyword, 1/τ) of a float or per-token ``[N]`` temperature for the kernels' ``rows``: the
    kernels take (τ, inv_temperature_rows=1/τ_i), the statistics 1/τ as a float or ``[N]``."""
    tau, inv_rows = temperature_args(temperature, rows, checked=False)
    if inv_rows is None:
        return tau, {}, 1.0 / tau
    return tau, {"inv_temperature_rows": inv_rows}, inv_rows


def _eager_only(fn):
    """``fn`` behind ``torch.compiler.disable``, applied once torch._dynamo is imported (see the module docstring)."""
    disabled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call


# ---------------------------------------------------------------------------------------------- labels
def _group_info(process_group):
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab-parallel log-probs need torch.distributed initialised (init_process_group) and the "
                         "tensor-parallel process_group")
    group = process_group if process_group is not None else dist.group.WORLD
    return group, dist.get_rank(group), dist.get_world_size(group)


def _local_labels(labels: torch.Tensor, offset: int, vocab_local: int, ignore_index: int):
    """(ids, owner, valid, off) for global ``labels [N]``: ``ids`` the kernels' local labels (the local id
    where this rank holds the label, 0 where another rank does, see :func:`_fix_column0`, -1 ignored), the
    owning rank, the non-ignored rows, and the rows whose label another rank holds."""
    valid = labels != ignore_index
    local = labels - offset
    here = valid & (local >= 0) & (local < vocab_local)
    ids = torch.where(here, local, torch.zeros_like(local))
    ids = torch.where(valid, ids, torch.full_like(ids, _LOCAL_IGNORE))
    owner = torch.where(valid, labels // vocab_local, torch.zeros_like(labels))
    return ids.contiguous(), owner, valid, valid & ~here


# ------------------------------------------------------------------------------------ statistics
def _local_stats(results, extras: int, with_entropy: bool, vocab_local: int) -> torch.Tensor:
    """The rows a rank contributes: [K, N] (m_eff, ℓ, logp_local[, H][, log Σp²][, mean·V_r][, top1])."""
    logp, entropy, row_max, log_norm, sum_sq, top1, mean = results
    # a shard whose logits are all −inf has no mass: the kernel reports m = 0 there, which must not win the max
    empty = log_norm == float("-inf")
    m_eff = torch.where(empty, torch.full_like(row_max, float("-inf")), row_max)
    # ... and a label on it (dropped by truncation) scores −inf, not the kernel's −inf − (−inf)
    rows = [m_eff, log_norm, torch.where(empty, torch.full_like(logp, float("-inf")), logp)]
    if with_entropy:
        rows.append(entropy)
    if extras & EXTRA_SUM_SQ:
        rows.append(sum_sq)
    if extras & EXTRA_MEAN:
        rows.append(mean * vocab_local)
    if extras & EXTRA_TOP1:
        rows.append(top1)
    return torch.stack(rows)


def _gather(stats: torch.Tensor, vocab_local: int, group, world: int) -> torch.Tensor:
    """All-gather the [K, N] statistics (and each rank's shard size) into [tp, K, N]; unequal shards raise
    on every rank alike."""
    flat = torch.cat([stats.reshape(-1), stats.new_tensor([float(vocab_local)])])
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat, group=group)
    gathered = torch.stack(parts)
    sizes = [int(v) for v in gathered[:, -1].tolist()]
    if len(set(sizes)) != 1:
        raise ValueError(
            f"vocab-parallel log-probs need equal vocabulary shards on every rank of process_group (the Megatron "
            f"layout, V padded to a multiple of the tensor-parallel size); got shard sizes {sizes}")
    return gathered[:, :-1].reshape(world, *stats.shape)


def _combine(gathered, labels_owner, valid, inv, extras: int, with_entropy: bool, vocab_local: int):
    """The global 7 row results (logp, entropy, M, L, log Σp², is_top1, mean) from ``gathered [tp, K, N]``
    (``inv``: 1/τ, a float or per row)."""
    m, log_norm, logp_local = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    k = 3
    big_m = m.max(dim=0).values
    m_ref = torch.where(big_m == float("-inf"), torch.zeros_like(big_m), big_m)
    c = (m - m_ref) * inv + log_norm                       # lse_r − M/τ
    norm = torch.log(torch.exp(c).sum(dim=0))              # >= 0: the max shard has c = ℓ >= 0
    delta = c - norm                                       # lse_r − lse
    w = torch.exp(delta)
    owner = labels_owner.unsqueeze(0)
    zero = torch.zeros_like(norm)
    logp = torch.where(valid, (logp_local + delta).gather(0, owner).squeeze(0), zero)
    entropy = torch.zeros_like(norm)
    if with_entropy:
        h = gathered[:, k]
        k += 1
        entropy = torch.where(valid, torch.where(w > 0, w * (h - delta), torch.zeros_like(w)).sum(0), zero)
    sum_sq, top1, mean = (torch.zeros_like(norm) for _ in range(3))  # distinct tensors: autograd outputs
    if extras & EXTRA_SUM_SQ:
        terms = torch.where(w > 0, 2 * delta + gathered[:, k], torch.full_like(w, float("-inf")))
        sum_sq = torch.where(valid, torch.logsumexp(terms, dim=0), zero)
        k += 1
    if extras & EXTRA_MEAN:
        mean = torch.where(valid, gathered[:, k].sum(0) / (vocab_local * gathered.shape[0]), zero)
        k += 1
    if extras & EXTRA_TOP1:
        first = (m == big_m.unsqueeze(0)).to(torch.int8).argmax(dim=0)   # the first rank holding the max
        local = gathered[:, k].gather(0, owner).squeeze(0) != 0
        top1 = (valid & local & (labels_owner == first)).to(norm.dtype)
    return (logp, entropy, torch.where(valid, m_ref, zero), torch.where(valid, norm, zero), sum_sq, top1, mean)


def _fix_column0(grad2d, x0, off, row_max, log_norm, entropy, grad_logp, grad_entropy, inv, softcap, scale,
                 col=None, thr=None):
    """Rows whose label another rank holds were run with local label c (0, or ``col`` under truncation):
    rewrite their column c with the off-label gradient −(1/τ)·p_c·(g_l + g_H·(log p_c + H))·f'(x_c), from the
    [N] values x_c (p_c = 0 where x_c is below the truncation threshold ``thr``)."""
    if not bool(off.any()):
        return
    z = transform_logits(x0, softcap or None, scale)
    log_p = (z - row_max) * inv - log_norm
    if thr is not None:
        log_p = torch.where(transform_logits(x0) >= thr, log_p, torch.full_like(log_p, float("-inf")))
    p = torch.exp(log_p)
    coef = grad_logp.to(z.dtype) if grad_logp is not None else torch.zeros_like(z)
    if grad_entropy is not None:
        coef = coef + grad_entropy.to(z.dtype) * torch.where(p > 0, log_p + entropy, torch.zeros_like(p))
    g = -p * coef * inv * scale
    if softcap:
        g = g * (1 - (z / softcap) ** 2)
    if col is None:
        grad2d[:, 0].copy_(torch.where(off, g.to(grad2d.dtype), grad2d[:, 0]))
        return
    at = col.clamp_min(0).unsqueeze(1)
    grad2d.scatter_(1, at, torch.where(off, g.to(grad2d.dtype), grad2d.gather(1, at).squeeze(1)).unsqueeze(1))


def _truncate(x2d, ids, off, inv, truncation, softcap, scale, group, world):
    """Under top-k / top-p: the whole rows' thresholds of this shard's rows ``x2d`` (into the kernels'
    keywords), and the off rows' local label moved from 0 to the shard's argmax (kept whenever any of the
    shard is, so the kernels never take the row for a dropped label). {} when off."""
    top_k, top_p = truncation
    if not is_active(top_k, top_p):
        return {}
    thr, col = shard_thresholds(x2d, inv, top_k, top_p, softcap, scale, x2d.shape[-1] * world, group, world)
    ids.copy_(torch.where(off, col, ids))
    return {"threshold_rows": thr}


def _dropped_grad(grad_logp, logp, thr):
    """∂L/∂logp without the rows whose label truncation dropped (logp = −inf, a constant; thr finite), on
    every rank alike (the owner's kernel drops them itself, the others must too)."""
    if grad_logp is None or thr is None:
        return grad_logp
    return torch.where((logp == float("-inf")) & (thr > float("-inf")), torch.zeros_like(grad_logp), grad_logp)


def _forward_stats(results, owner, valid, inv, extras, with_entropy, vocab_local, group, world):
    gathered = _gather(_local_stats(results, extras, with_entropy, vocab_local), vocab_local, group, world)
    return _combine(gathered, owner, valid, inv, extras, with_entropy, vocab_local)


# ----------------------------------------------------------------------------------- token op
class _VocabParallelTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, with_entropy, extras, softcap, scale, truncation,
                group, backend):
        _, rank, world = _group_info(group)
        vocab_local = logits.shape[-1]
        ids, owner, valid, off = _local_labels(labels, rank * vocab_local, vocab_local, ignore_index)
        rows = as_row_blocks(logits) if backend != "reference" else logits.reshape(-1, vocab_local)
        tau, per_row, inv = _temperature(temperature)
        trunc = _truncate(logits.reshape(-1, vocab_local), ids, off, inv, truncation, softcap, scale, group, world)
        local = _kernels(backend).logprob_forward(rows, ids, tau, _LOCAL_IGNORE, with_entropy, extras, softcap, scale,
                                                  **per_row, **trunc)
        out = _forward_stats(local, owner, valid, inv, extras, with_entropy, vocab_local, group, world)
        ctx.save_for_backward(logits, ids, off, out[2], out[3], out[1],
                              *((trunc["threshold_rows"], out[0]) if trunc else ()))
        ctx.args = (temperature, with_entropy, softcap, scale, backend)
        ctx.mark_non_differentiable(*out[4:])
        ctx.set_materialize_grads(False)
        return (out[0], out[1], *out[4:])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy, *_):
        logits, ids, off, row_max, log_norm, entropy, *trunc = ctx.saved_tensors
        thr, logp = trunc if trunc else (None, None)
        temperature, with_entropy, softcap, scale, backend = ctx.args
        tau, per_row, inv = _temperature(temperature)
        grad_entropy = grad_entropy.contiguous() if (with_entropy and grad_entropy is not None) else None
        grad_logp = _dropped_grad(grad_logp.contiguous(), logp, thr) if grad_logp is not None else None
        if grad_logp is None and grad_entropy is None:
            return (None,) * 11
        vocab_local = logits.shape[-1]
        rows = as_row_blocks(logits) if backend != "reference" else logits.reshape(-1, vocab_local)
        grad = torch.empty(rows.shape, dtype=logits.dtype, device=logits.device)
        extra = {} if thr is None else {"threshold_rows": thr}
        _kernels(backend).logprob_backward(rows, ids, row_max, log_norm, entropy, grad_logp, grad_entropy, tau,
                                           _LOCAL_IGNORE, grad, softcap, scale, **per_row, **extra)
        x2d = logits.reshape(-1, vocab_local)
        x0 = x2d[:, 0] if thr is None else x2d.gather(1, ids.clamp_min(0).unsqueeze(1)).squeeze(1)
        _fix_column0(grad.view(-1, vocab_local), x0, off, row_max, log_norm, entropy, grad_logp, grad_entropy, inv,
                     softcap, scale, None if thr is None else ids, thr)
        return (grad.view(logits.shape),) + (None,) * 10


def _check_common(temperature, labels, dtype, ignore_index, return_entropy, outputs, logit_softcap, logit_scale,
                  top_k=None, top_p=None):
    temperature = temperature_input(temperature, labels, dtype)  # a float, or a per-token [N] tensor
    temperature_args(temperature)  # the values: finite, > 0
    ignore_index = check.check_int(ignore_index, "ignore_index")
    check.check_bool(return_entropy, "return_entropy")
    wanted = check_outputs(outputs, return_entropy)
    softcap, scale = check_logit_transform(logit_softcap, logit_scale)
    with_entropy = return_entropy if wanted is None else "entropy" in wanted
    truncation = check_truncation(top_k, top_p, scale)
    if is_active(*truncation) and wanted is not None and "mean_logits" in wanted:
        raise ValueError("outputs: mean_logits is not defined under top_k / top_p truncation")
    return temperature, ignore_index, wanted, softcap, scale, with_entropy, truncation


def _results(out, labels, wanted, return_entropy):
    logp, entropy, sum_sq, top1, mean = out
    if wanted is not None:
        return named_outputs((logp, entropy, None, None, sum_sq, top1, mean), labels.shape, wanted)
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp


@_eager_only
def vocab_parallel_token_logprobs(
    logits_shard: torch.Tensor, labels: torch.Tensor, process_group=None, *, temperature: float = 1.0,
    ignore_index: int = -100, return_entropy: bool = False, outputs=None, logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
):
    """:func:`fastpo.token_logprobs` of the full-vocabulary logits (``temperature`` a float or per-token tensor,
    ``top_k`` / ``top_p`` truncation, as there), given this rank's shard
    ``logits_shard [..., V/tp]`` (vocabulary ids [rank·V/tp, (rank+1)·V/tp)) and global ``labels [...]``;
    every rank gets the same results. Only the shard's gradient is computed, locally."""
    check.check_logits_labels(logits_shard, labels)
    tau, ignore_index, wanted, softcap, scale, with_entropy, truncation = _check_common(
        temperature, labels, logits_shard.dtype, ignore_index, return_entropy, outputs, logit_softcap, logit_scale,
        top_k, top_p)
    group, _, world = _group_info(process_group)
    check.check_label_range(labels, logits_shard.shape[-1] * world, ignore_index)
    out = _VocabParallelTokenLogprobs.apply(logits_shard, flat_labels(labels), tau, ignore_index, with_entropy,
                                            extras_mask(wanted), softcap, scale, truncation, group,
                                            select_backend(logits_shard))
    return _results(out, labels, wanted, return_entropy)


# ---------------------------------------------------------------------------------- linear op
def _chunks(n_tokens: int, chunk_size: Optional[int], vocab_local: int):
    from fastpo.ops.linear_token_logprobs import default_chunk_size
    rows = chunk_size or default_chunk_size(n_tokens, vocab_local)
    rows = max(1, min(rows, max(n_tokens, 1)))
    return [slice(s, min(s + rows, n_tokens)) for s in range(0, n_tokens, rows)]


class _VocabParallelLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, with_entropy, extras, softcap, scale,
                chunk_size, reduce_grad_hidden, truncation, group, backend):
        _, rank, world = _group_info(group)
        vocab_local = weight.shape[0]
        ids, owner, valid, off = _local_labels(labels, rank * vocab_local, vocab_local, ignore_index)
        kernels = _kernels(backend)
        n = hidden.shape[0]
        local = [hidden.new_empty(n, dtype=result_dtype(hidden.dtype)) for _ in range(7)]
        thr = hidden.new_empty(n, dtype=result_dtype(hidden.dtype)) if is_active(*truncation) else None
        for rows in _chunks(n, chunk_size, vocab_local):
            logits = chunk_logits(hidden[rows], weight, bias)
            tau, per_row, inv = _temperature(temperature, rows)
            trunc = _truncate(logits, ids[rows], off[rows], inv, truncation, softcap, scale, group, world)
            if trunc:
                thr[rows] = trunc["threshold_rows"]
            for buf, part in zip(local, kernels.logprob_forward(logits, ids[rows], tau, _LOCAL_IGNORE, with_entropy,
                                                                extras, softcap, scale, **per_row, **trunc)):
                buf[rows] = part
            del logits
        out = _forward_stats(local, owner, valid, _temperature(temperature)[2], extras, with_entropy, vocab_local,
                             group, world)
        ctx.save_for_backward(hidden, weight, bias, ids, off, out[2], out[3], out[1],
                              *((thr, out[0]) if thr is not None else ()))
        ctx.args = (temperature, with_entropy, softcap, scale, chunk_size, reduce_grad_hidden, group, backend)
        ctx.mark_non_differentiable(*out[4:])
        ctx.set_materialize_grads(False)
        return (out[0], out[1], *out[4:])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy, *_):
        hidden, weight, bias, ids, off, row_max, log_norm, entropy, *trunc = ctx.saved_tensors
        thr, logp = trunc if trunc else (None, None)
        temperature, with_entropy, softcap, scale, chunk_size, reduce_grad_hidden, group, backend = ctx.args
        grad_entropy = grad_entropy.contiguous() if (with_entropy and grad_entropy is not None) else None
        grad_logp = _dropped_grad(grad_logp.contiguous(), logp, thr) if grad_logp is not None else None
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grads = gradient_buffers(hidden, weight, bias, needs_hidden, needs_weight, needs_bias)
        if grad_logp is not None or grad_entropy is not None:
            kernels = _kernels(backend)
            for rows in _chunks(hidden.shape[0], chunk_size, weight.shape[0]):
                grad_logits = chunk_logits(hidden[rows], weight, bias)
                col = None if thr is None else ids[rows]
                # read before the in-place backward overwrites it
                x0 = (grad_logits[:, 0] if col is None else grad_logits.gather(1, col.clamp_min(0)[:, None])[:, 0]).clone()
                gl = None if grad_logp is None else grad_logp[rows]
                ge = None if grad_entropy is None else grad_entropy[rows]
                tau, per_row, inv = _temperature(temperature, rows)
                extra = {} if thr is None else {"threshold_rows": thr[rows]}
                kernels.logprob_backward(grad_logits, ids[rows], row_max[rows], log_norm[rows], entropy[rows], gl, ge,
                                         tau, _LOCAL_IGNORE, grad_logits, softcap, scale, **per_row, **extra)
                _fix_column0(grad_logits, x0, off[rows], row_max[rows], log_norm[rows], entropy[rows], gl, ge, inv,
                             softcap, scale, col, None if thr is None else thr[rows])
                add_chunk_gradients(grad_logits, hidden[rows], weight, rows, *grads)
                del grad_logits
        elif needs_hidden:
            grads[0].zero_()
        grad_hidden, grad_weight, grad_bias = grads
        if needs_hidden and reduce_grad_hidden:
            dist.all_reduce(grad_hidden, group=group)  # hidden is replicated: its gradient sums the shards'
        return (grad_hidden if needs_hidden else None, grad_weight.to(weight.dtype) if needs_weight else None,
                grad_bias.to(weight.dtype) if (needs_bias and bias is not None) else None) + (None,) * 12


@_eager_only
def vocab_parallel_linear_token_logprobs(
    hidden: torch.Tensor, weight_shard: torch.Tensor, labels: torch.Tensor, process_group=None, *,
    bias: Optional[torch.Tensor] = None, temperature: float = 1.0, ignore_index: int = -100,
    return_entropy: bool = False, outputs=None, logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None, chunk_size: Optional[int] = None, reduce_grad_hidden: bool = True,
    top_k: Optional[int] = None, top_p: Optional[float] = None,
):
    """:func:`fastpo.linear_token_logprobs` for a vocabulary-parallel lm_head: ``hidden [..., D]`` replicated,
    this rank's ``weight_shard [V/tp, D]`` (and ``bias`` shard), global ``labels``; one chunk of
    [chunk, V/tp] logits at a time (also for the ``top_k`` / ``top_p`` thresholds, found per chunk). ∂hidden is all-reduced over ``process_group`` unless
    ``reduce_grad_hidden=False``; ∂weight_shard and ∂bias are this shard's."""
    check_head_operands(hidden, weight_shard, bias)
    check.check_aligned_labels(labels, hidden, "hidden")
    check.check_same_device(hidden=hidden, weight=weight_shard, labels=labels, bias=bias)
    tau, ignore_index, wanted, softcap, scale, with_entropy, truncation = _check_common(
        temperature, labels, hidden.dtype, ignore_index, return_entropy, outputs, logit_softcap, logit_scale,
        top_k, top_p)
    check.check_bool(reduce_grad_hidden, "reduce_grad_hidden")
    if chunk_size is not None and (check.check_int(chunk_size, "chunk_size") < 1):
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    group, _, world = _group_info(process_group)
    check.check_label_range(labels, weight_shard.shape[0] * world, ignore_index)
    rows = hidden if hidden.dim() == 2 else hidden.reshape(labels.numel(), hidden.shape[-1])
    out = _VocabParallelLinearLogprobs.apply(
        rows, weight_shard, bias, flat_labels(labels), tau, ignore_index, with_entropy, extras_mask(wanted), softcap,
        scale, chunk_size, reduce_grad_hidden, truncation, group, select_backend(hidden))
    return _results(out, labels, wanted, return_entropy)
