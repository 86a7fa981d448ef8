"""``LossOutput``: what every fastpo loss returns."""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch

__all__ = ["LossOutput"]


class LossOutput(NamedTuple):
    """A loss and the metrics computed in the same pass.

    ``loss``: scalar tensor, differentiable w.r.t. the loss's inputs.
    ``metrics``: name -> detached scalar tensor (no host sync; call ``.item()`` when logging).
    ``per_token``: the per-token (or per-sequence) loss before aggregation, when the loss was asked
    for it, else None.

    A ``NamedTuple``, so it is a pytree: it passes through ``torch.compile(fullgraph=True)``,
    ``torch.utils.checkpoint`` and FSDP unchanged.
    """

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor]
    per_token: Optional[torch.Tensor] = None
