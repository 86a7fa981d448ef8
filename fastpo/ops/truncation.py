"""Top-k / top-p truncation for the log-prob ops: the per-row threshold pass.

The sampler's kept set of a row is {x_j >= t} for one threshold t (see
``fastpo.reference.truncation``). The threshold pass finds t per row without sorting: top-k takes the
k-th largest raw logit (``topk``, ties kept); top-p then finds the smallest raw value t (an entry)
whose mass strictly above is < p, with q = softmax(z/τ) over the top-k survivors:
    pred(t) = Σ_{x_l > t} e_l < p · Σ_l e_l,   e_l = e^{s_l − max s}·1[x_l >= t_k]
(monotone in t; true at the row maximum), from the row's M largest entries only (``topk(M)``, sorted:
their cumulative mass gives pred at each of them, a tie group taking the mass above its first entry);
rows whose boundary is not among them retry with 4M, up to V. A nucleus of a few hundred tokens costs
one ``topk(64)`` or ``topk(256)`` per row, not a sort of V. Rows are processed in chunks of about 2^22
logits (the chunk's e is the largest temporary). The row kernels then treat x_j < t as −inf.
"""

from __future__ import annotations

import torch

from fastpo._validation import is_tracing
from fastpo.reference.logprobs import transform_logits

_CHUNK_ELEMENTS = 1 << 22
_FIRST_CANDIDATES = 64
# The step cap of a snapping value bisection (the vocabulary-parallel threshold pass,
# fastpo.ops.vocab_parallel_truncation, searches sharded rows that way).
_MAX_STEPS = 4096


def check_truncation(top_k, top_p, logit_scale) -> tuple[int, float]:
    """``top_k`` None / 0 (off) or an int >= 1; ``top_p`` None (off) or a real in (0, 1]; returned as
    (k, p) with 0 and 1.0 for off. Truncation needs an increasing logit transform (``logit_scale`` > 0)."""
    if top_k is None:
        top_k = 0
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: off), got {top_k}")
    if top_p is None:
        top_p = 1.0
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError(f"top_p must be a float or None, got {type(top_p).__name__}")
    if not is_tracing() and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1 or None: off), got {top_p}")
    if (top_k or top_p < 1.0) and logit_scale < 0:
        raise ValueError(f"top_k / top_p need logit_scale > 0 (the kept set follows the raw logits' order), got "
                         f"{logit_scale}")
    return top_k, float(top_p)


def _top_p_threshold(x: torch.Tensor, e: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest entry t of each row of ``x`` with Σ_{x > t} e < top_p · Σ e (see the module docstring),
    from the row's M largest entries (``topk``, M = 64, x4 for the rows whose boundary lies further down)."""
    target = top_p * e.sum(-1, dtype=torch.float64)  # e in the accumulation dtype, its sums in float64
    n, vocab = x.shape
    thr = torch.empty(n, dtype=x.dtype, device=x.device)
    todo = torch.arange(n, device=x.device)
    m = min(vocab, _FIRST_CANDIDATES)
    while todo.numel():
        vals, idx = x[todo].topk(m, dim=-1, sorted=True)  # descending
        es = e[todo].gather(-1, idx).double()
        before = torch.cumsum(es, dim=-1) - es  # the mass of the entries sorted before each one
        first = torch.searchsorted(-vals, -vals, side="left")  # the first entry of each tie group
        ok = before.gather(-1, first) < target[todo, None]  # mass strictly above < p·Z: true, then false
        n_ok = ok.sum(-1)
        done = (n_ok < m) | (m == vocab)  # the boundary is among the M (or M is the whole row)
        thr[todo[done]] = vals[done].gather(-1, (n_ok[done] - 1).clamp(min=0)[:, None])[:, 0]
        todo = todo[~done]
        m = min(vocab, 4 * m)
    return thr


def row_thresholds(x: torch.Tensor, inv_t, top_k: int, top_p: float, logit_softcap: float = 0.0,
                   logit_scale: float = 1.0) -> torch.Tensor:
    """``[n]`` thresholds on the raw logits ``x [n, V]`` (in the accumulation dtype; −inf: nothing dropped).
    ``inv_t``: 1/τ, a float or an ``[n]`` tensor."""
    xa = transform_logits(x.detach())  # the raw values, widened
    thr = torch.full(xa.shape[:1], float("-inf"), dtype=xa.dtype, device=xa.device)
    vocab = xa.shape[-1]
    cand = xa_all = xa
    if 0 < top_k < vocab:
        top = xa.topk(top_k, dim=-1).values
        thr = top[:, -1]
        if not bool(((xa >= thr[:, None]).sum(-1) > top_k).any()):
            cand = top  # no tie at the k-th value: the kept set is exactly these k, top-p searches them only
    if top_p < 1.0 and vocab > 1:
        xa = cand
        s = transform_logits(xa, logit_softcap or None, logit_scale)
        s = s * (inv_t[:, None].to(s.dtype) if isinstance(inv_t, torch.Tensor) else inv_t)
        if cand is xa_all and bool(torch.isfinite(thr).any()):  # (top-k with ties: mask below its threshold)
            s = s.masked_fill(xa < thr[:, None], float("-inf"))
        m = s.max(-1, keepdim=True).values
        e = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
        thr = torch.maximum(thr, _top_p_threshold(xa, e, top_p))
    return thr


def logits_thresholds(logits: torch.Tensor, inv_t, top_k: int, top_p: float, logit_softcap: float = 0.0,
                      logit_scale: float = 1.0) -> torch.Tensor:
    """``[N]`` thresholds for ``[N, V]`` rows or ``[B, T, V]`` blocks (``fastpo.ops.row_kernels.as_row_blocks``),
    one chunk of rows at a time. ``inv_t``: a float or ``[N]``."""
    rows = logits.reshape(-1, logits.shape[-1]) if logits.dim() == 3 else logits
    n, vocab = rows.shape
    chunk = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    parts = []
    for start in range(0, n, chunk):
        part = slice(start, min(start + chunk, n))
        t = inv_t[part] if isinstance(inv_t, torch.Tensor) else inv_t
        parts.append(row_thresholds(rows[part], t, top_k, top_p, logit_softcap, logit_scale))
    if not parts:
        return torch.empty(0, dtype=transform_logits(rows[:0]).dtype, device=rows.device)
    return torch.cat(parts)


def is_active(top_k: int, top_p: float) -> bool:
    return top_k > 0 or top_p < 1.0


__all__ = ["check_truncation", "row_thresholds", "logits_thresholds", "is_active"]


@torch.library.custom_op("fastpo::truncation_thresholds", mutates_args=())
def truncation_thresholds(logits: torch.Tensor, temperature: torch.Tensor, top_k: int, top_p: float,
                          logit_softcap: float, logit_scale: float) -> torch.Tensor:
    """``[N]`` raw-logit thresholds of ``[N, V]`` rows / ``[B, T, V]`` blocks under a 0-d or ``[N]`` temperature
    (an op of its own: under ``torch.compile`` its data-dependent search is not traced)."""
    from fastpo.ops.row_kernels import temperature_args

    tau, inv_rows = temperature_args(temperature)
    return logits_thresholds(logits, inv_rows if inv_rows is not None else 1.0 / tau, top_k, top_p, logit_softcap,
                             logit_scale)


@truncation_thresholds.register_fake
def _(logits, temperature, top_k, top_p, logit_softcap, logit_scale):
    n = logits.shape[0] * logits.shape[1] if logits.dim() == 3 else logits.shape[0]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty(n, dtype=dtype)
