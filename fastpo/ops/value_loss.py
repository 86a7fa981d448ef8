"""``fastpo.value_loss``: the clipped value (critic) loss, on the per-token loss kernels of ``policy_loss``.

One custom op ``fastpo::value_loss_fwd`` (its backward is ``fastpo::policy_loss_bwd``); the same
forward kernel runs it with ``VALUE`` set, so layouts, aggregations and the no-NaN guarantees are
those of :func:`fastpo.policy_loss`.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import List, Optional

import torch

from fastpo import reference
from fastpo._backend import select_backend
from fastpo._layout import check_cu_seqlens_values, check_like_layout, flat_inputs, token_layout
from fastpo.loss_output import LossOutput
from fastpo.ops.loss_spec import TokenLossSpec, value_spec
from fastpo.ops.policy_loss import _fake_outputs, backward_grads, metrics_from, run_forward, save_for_backward
from fastpo.policy_config import check_aggregation

__all__ = ["value_loss"]


@torch.library.custom_op("fastpo::value_loss_fwd", mutates_args=())
def _value_loss_fwd(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: Optional[torch.Tensor],
    cu_seqlens: torch.Tensor, clip: torch.Tensor, floats: List[float], ints: List[int], packed: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats, unit, empty) for flat ``[N]`` inputs; stats[2] is vf_clip_frac.

    ``clip`` is a 0-d float64 CPU tensor (inf: no clipping), read on the host (no device sync): as a
    tensor rather than a float it is a graph input under torch.compile, not a constant (no recompile
    per value)."""
    floats = TokenLossSpec.from_lists(floats, ints)._replace(value_clip=float(clip)).floats()
    return run_forward(values, old_values, returns, None, None, None, mask, cu_seqlens, None, floats, ints, packed,
                       backend)


@_value_loss_fwd.register_fake
def _(values, old_values, returns, mask, cu_seqlens, clip, floats, ints, packed, backend):
    return _fake_outputs(values, False)


def _setup_context(ctx, inputs, output):
    save_for_backward(ctx, inputs[0], None, output, inputs[-1])


def _backward(ctx, grad_loss, _stats, _unit, _unit_ent):
    grad_v, _ = backward_grads(ctx, grad_loss)
    return grad_v, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastpo::value_loss_fwd", _backward, setup_context=_setup_context)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    clip: Optional[float] = 0.2,
    aggregation: str = "token_mean",
) -> LossOutput:
    """Clipped value loss (PPO critic), differentiable w.r.t. ``values``::

        v_c = clip(v, v_old − clip, v_old + clip)
        l   = 0.5·max((v − R)², (v_c − R)²)

    aggregated over counted tokens like :func:`fastpo.policy_loss` (``aggregation``: token_mean,
    seq_mean_token_mean, seq_mean_token_sum, token_sum_norm with L = T of a padded batch or the
    longest packed sequence). ``clip=None`` disables clipping. ``old_values`` and ``returns`` are
    constants. ``metrics["vf_clip_frac"]``: the share of counted tokens where the clipped branch is
    the larger one (zero gradient). Masked positions are ignored whatever they hold (NaN, ±inf), and
    inputs may be any strided view. Under ``torch.compile`` a changing ``clip`` is a graph input (no
    recompile per value).
    """
    layout = token_layout(values, "values", mask, cu_seqlens)
    check_like_layout(layout, old_values, "old_values", "values")
    check_like_layout(layout, returns, "returns", "values")
    if clip is not None:
        if isinstance(clip, bool) or not isinstance(clip, Real):
            raise TypeError(f"clip must be a real number or None, got {type(clip).__name__}")
        if not (clip >= 0 and clip < math.inf):  # comparisons, not math.isfinite: they trace under torch.compile
            raise ValueError(f"clip must be finite and >= 0 (or None), got {clip}")
    check_aggregation(aggregation)

    backend = select_backend(values)
    if backend == "reference":
        if not layout.is_padded:
            check_cu_seqlens_values(layout.cu_seqlens, layout.num_tokens)
        return reference.value_loss(values, old_values, returns, mask, cu_seqlens=cu_seqlens, clip=clip,
                                    aggregation=aggregation)
    # norm_length 0: the longest sequence (T when padded), found in the op; the clip goes as a tensor
    spec = value_spec(None, aggregation, 0)
    # ones·clip, not torch.full/tensor(clip): a SymFloat multiplying a tensor stays a graph input under
    # torch.compile's AOT backends, while one used to build a tensor is specialised (recompile per value)
    clip_t = torch.ones((), dtype=torch.float64) * (math.inf if clip is None else clip)
    old, ret, m = flat_inputs(layout, old_values, returns, layout.mask)
    loss, stats, _, _ = _value_loss_fwd(layout.flat(values), old, ret, m, layout.cu_seqlens, clip_t, spec.floats(),
                                        spec.ints(), not layout.is_padded, backend)
    return LossOutput(loss, {"vf_clip_frac": metrics_from(stats, ["clip_frac"])["clip_frac"]})
