"""Reference log-probs: full ``[N, V]`` log-softmax, eager and float64-capable."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from fastpo._layout import accumulation_dtype as _accumulation_dtype
from fastpo._validation import is_tracing
from fastpo.reference.truncation import keep_mask

__all__ = ["token_logprobs", "linear_token_logprobs", "LogProbOutputs", "OUTPUT_NAMES", "check_outputs"]

OUTPUT_NAMES = ("logp", "entropy", "log_sum_sq_probs", "is_top1", "mean_logits")


class LogProbOutputs(NamedTuple):
    """Per-token results of ``token_logprobs(..., outputs=...)``, each shaped like the labels; an output
    that was not asked for is ``None``. ``logp`` and ``entropy`` are differentiable, the others detached."""
    logp: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None


def check_outputs(outputs, return_entropy) -> Optional[frozenset]:
    """``outputs`` (None, or a non-empty sequence of names from :data:`OUTPUT_NAMES`) as a frozenset;
    ``return_entropy=True`` with ``outputs`` is a ValueError (ask for ``"entropy"`` instead)."""
    if outputs is None:
        return None
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list, set, frozenset)):
        raise TypeError(f"outputs must be a tuple of names from {OUTPUT_NAMES}, got {type(outputs).__name__}")
    unknown = [name for name in outputs if name not in OUTPUT_NAMES]
    if unknown or not outputs:
        raise ValueError(f"outputs must be a non-empty tuple of names from {OUTPUT_NAMES}, got {tuple(outputs)}")
    if return_entropy:
        raise ValueError("return_entropy=True cannot be combined with outputs=...: add 'entropy' to outputs")
    return frozenset(outputs)


def check_logit_transform(logit_softcap, logit_scale):
    """``logit_softcap`` None or a finite real > 0, ``logit_scale`` None (1) or a finite non-zero real
    (the public defaults are None, not 1.0: torch.compile(dynamic=True) would make a float default
    symbolic and then restart to specialise it); returned as
    the kernels take them: (softcap, 0.0 for none; scale) floats. While tracing (torch.compile) only
    the types are checked: the values are constants of the traced code, checked again in C++."""
    if logit_softcap is not None:
        if isinstance(logit_softcap, bool) or not isinstance(logit_softcap, (int, float)):
            raise TypeError(f"logit_softcap must be a float or None, got {type(logit_softcap).__name__}")
        if not is_tracing() and (not math.isfinite(logit_softcap) or logit_softcap <= 0):
            raise ValueError(f"logit_softcap must be finite and > 0 (or None), got {logit_softcap}")
    if logit_scale is None:
        logit_scale = 1.0
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise TypeError(f"logit_scale must be a float, got {type(logit_scale).__name__}")
    if not is_tracing() and (not math.isfinite(logit_scale) or logit_scale == 0):
        raise ValueError(f"logit_scale must be finite and non-zero, got {logit_scale}")
    if is_tracing():
        return (0.0 if logit_softcap is None else logit_softcap), logit_scale
    return (0.0 if logit_softcap is None else float(logit_softcap)), float(logit_scale)


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    outputs=None,
    logit_softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
):
    """Per-token log-probabilities (and entropies) of ``labels`` under ``softmax(logits / temperature)``.

    The logits are first transformed as TRL does: x ← k·x with ``logit_scale`` k, then x ← c·tanh(x/c)
    with ``logit_softcap`` c (Gemma), so z below is the transformed logit.

    With s = z/τ and p = softmax(s):  logp = s_y − logsumexp(s);  entropy = logsumexp(s) − Σ_j p_j·s_j;
    log_sum_sq_probs = log Σ_j p_j²;  is_top1 = (argmax_j z_j == y), the first maximum winning a tie
    (torch.argmax, TRL);  mean_logits = mean_j s_j. ``outputs`` (a tuple of those names) returns a
    :class:`LogProbOutputs`; otherwise logp, or (logp, entropy) with ``return_entropy``.
    Rows whose label is ``ignore_index`` give 0 (False) everywhere, with zero gradient.
    ``temperature`` may be a per-token tensor broadcastable to ``labels`` (τ_i for row i; not differentiated).
    ``top_k`` (0: off) / ``top_p`` (1.0: off): score under vLLM's truncated, renormalised sampling distribution
    (``fastpo.reference.truncation.keep_mask``: temperature, then top-k, then top-p); a label outside the
    kept set gets logp = −inf with no gradient from it (the entropy is the truncated distribution's).
    """
    temperature = _per_row(temperature, labels)
    wanted = check_outputs(outputs, return_entropy)
    if wanted is not None:
        return _named_outputs(logits, labels, temperature, ignore_index, wanted, logit_softcap, logit_scale,
                              top_k, top_p)
    s = transform_logits(logits, logit_softcap, logit_scale) / temperature
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    kept = None
    if top_k > 0 or top_p < 1.0:
        keep = keep_mask(transform_logits(logits), s, top_k, top_p)
        s = s.masked_fill(~keep, float("-inf"))
        kept = keep.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    lse = torch.logsumexp(s, dim=-1)
    logp = s.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1) - lse
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if kept is not None:  # a dropped label: the constant −inf
        logp = torch.where(kept, logp, torch.full((), float("-inf"), dtype=s.dtype, device=s.device))
    logp = torch.where(valid, logp, zero)
    if not return_entropy:
        return logp
    p = torch.softmax(s, dim=-1)
    # −inf logits (a masked-out vocabulary) have p = 0 and contribute 0, not 0·(−inf)
    entropy = lse - (p * s.masked_fill(p == 0, 0)).sum(dim=-1)
    return logp, torch.where(valid, entropy, zero)


def _per_row(temperature, labels):
    """A per-token temperature tensor as a ``[..., 1]`` column against the logits (detached); a float as is."""
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() and temperature.shape[-1:] == (1,) and temperature.dim() == labels.dim() + 1:
            return temperature.detach()  # already a column
        return temperature.detach().expand(labels.shape).unsqueeze(-1)
    return temperature


def transform_logits(logits, logit_softcap=None, logit_scale=1.0):
    """The logits in the accumulation dtype, times ``logit_scale``, then soft-capped (c·tanh(x/c))."""
    z = logits.to(_accumulation_dtype(logits.dtype))
    if logit_scale is not None and logit_scale != 1.0:
        z = z * logit_scale
    if logit_softcap is not None:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    return z


def _named_outputs(logits, labels, temperature, ignore_index, wanted, logit_softcap, logit_scale, top_k=0,
                   top_p=1.0):
    logp, entropy = token_logprobs(logits, labels, temperature, ignore_index, True, None, logit_softcap, logit_scale,
                                   top_k, top_p)
    valid = labels != ignore_index
    result = {"logp": logp, "entropy": entropy}
    with torch.no_grad():
        z = transform_logits(logits.detach(), logit_softcap, logit_scale)
        s = z / temperature
        if top_k > 0 or top_p < 1.0:
            if "mean_logits" in wanted:
                raise ValueError("outputs: mean_logits is not defined under top_k / top_p truncation")
            keep = keep_mask(transform_logits(logits.detach()), s, top_k, top_p)
            s = s.masked_fill(~keep, float("-inf"))
            # is_top1: the first argmax of the kept set, as the kernels (a saturated softcap can tie a dropped
            # raw entry with the row's maximum)
            z = z.masked_fill(~keep, float("-inf"))
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        if "log_sum_sq_probs" in wanted:
            result["log_sum_sq_probs"] = torch.where(valid, torch.logsumexp(2 * torch.log_softmax(s, -1), -1), zero)
        if "is_top1" in wanted:
            result["is_top1"] = valid & (z.argmax(-1) == labels)
        if "mean_logits" in wanted:
            result["mean_logits"] = torch.where(valid, s.mean(-1), zero)
    return LogProbOutputs(**{name: result.get(name) for name in OUTPUT_NAMES if name in wanted})


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    outputs=None,
    logit_softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
):
    """``token_logprobs(hidden @ weight.T + bias, labels)``, building the full logits tensor."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return token_logprobs(logits, labels, temperature, ignore_index, return_entropy, outputs, logit_softcap,
                          logit_scale, top_k, top_p)
