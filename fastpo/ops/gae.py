"""``fastpo.gae``: generalised advantage estimation as one fused scan (Triton) or the C++ scan (CPU).

Layers: public function (validation, layout) → ``torch.library`` custom op ``fastpo::gae`` (fake
implementation; no autograd: advantages are targets, computed from detached rewards and values) →
the backend's ``gae_scan``.
"""

from __future__ import annotations

from numbers import Real
from types import ModuleType
from typing import Optional

import torch

from fastpo import reference
from fastpo._backend import kernel_module, select_backend
from fastpo._layout import accumulation_dtype, check_cu_seqlens_values, check_like_layout, token_layout

__all__ = ["gae"]


def _scan_kernels(backend: str) -> ModuleType:
    return kernel_module(backend, triton="fastpo.kernels.gae", cpu="fastpo.ops.cpu_advantages", what="GAE")


@torch.library.custom_op("fastpo::gae", mutates_args=())
def _gae_op(
    rewards: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor], cu_seqlens: torch.Tensor,
    gamma_lam: torch.Tensor, max_len: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N], returns [N]) of flat contiguous float32/float64 rewards and values;
    ``gamma_lam`` is a float64 CPU tensor ``[γ, λ]``, read on the host (no device sync): as a tensor
    rather than floats it is a graph input under torch.compile, not a constant (no recompile per value).
    ``max_len`` bounds every sequence's length (T when padded, N when packed): it sizes Triton's blocks."""
    check_cu_seqlens_values(cu_seqlens, rewards.numel())
    gamma, lam = gamma_lam.tolist()
    return _scan_kernels(backend).gae_scan(rewards, values, mask, cu_seqlens, gamma, lam, max_len=max_len)


@_gae_op.register_fake
def _(rewards, values, mask, cu_seqlens, gamma_lam, max_len, backend):
    return torch.empty_like(rewards), torch.empty_like(rewards)


def check_unit_interval(value, name: str) -> float:
    """A real number in [0, 1] (γ, λ); NaN fails the comparison. No ``float()`` or ``math.isfinite``:
    under torch.compile ``value`` may be a SymFloat, which must stay symbolic."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
        gamma: float = 1.0, lam: float = 0.95, cu_seqlens: Optional[torch.Tensor] = None):
    """Generalised advantage estimation over the counted tokens of each sequence.

    ``rewards`` and ``values`` are ``[B, T]`` (with an optional ``mask [B, T]``) or packed ``[N]`` with
    ``cu_seqlens [B+1]`` (and an optional ``mask [N]``). Masked tokens are skipped, as verl does::

        δ_t = r_t + γ·V_next − V_t,   A_t = δ_t + γλ·A_next,   returns = A + V

    "next" being the next *counted* token of the sequence (0 past its last). Masked positions get 0 in
    both outputs. Returns ``(advantages, returns)`` shaped like ``rewards``, float32 (float64 for
    float64 inputs; 16-bit inputs are upcast to float32 first). No gradient flows: the inputs are
    detached (advantages are regression/policy targets). γ and λ must lie in [0, 1]; under
    ``torch.compile`` changing them does not recompile. Masked positions are ignored whatever they
    hold (NaN, ±inf), and inputs may be any strided view.
    """
    layout = token_layout(rewards, "rewards", mask, cu_seqlens)
    check_like_layout(layout, values, "values", "rewards")
    gamma = check_unit_interval(gamma, "gamma")
    lam = check_unit_interval(lam, "lam")

    backend = select_backend(rewards)
    if backend == "reference":
        check_cu_seqlens_values(layout.cu_seqlens, layout.num_tokens)
        return reference.gae(rewards, values, mask, gamma=gamma, lam=lam, cu_seqlens=cu_seqlens)

    dtype = accumulation_dtype(rewards.dtype)
    flat = lambda x: layout.flat(x.detach().to(dtype))  # noqa: E731
    flat_mask = None if layout.mask is None else layout.mask != 0
    max_len = layout.padded_len if layout.is_padded else layout.num_tokens
    # ones·γ, not torch.tensor([γ, λ]): a SymFloat multiplying a tensor stays a graph input under
    # torch.compile's AOT backends, while one used to build a tensor is specialised (recompile per value)
    one = torch.ones((), dtype=torch.float64)
    gamma_lam = torch.stack([one * gamma, one * lam])
    adv, ret = _gae_op(flat(rewards), flat(values), flat_mask, layout.cu_seqlens, gamma_lam, max_len, backend)
    return layout.unflatten(adv), layout.unflatten(ret)
