"""fastpo: the loss hot path of LLM reinforcement learning and preference optimisation, fused.

Public API (see DESIGN.md): ``token_logprobs``, ``linear_token_logprobs``; ``fastpo.reference``
holds the eager specification of every op.
"""

from fastpo import reference
from fastpo.loss_output import LossOutput
from fastpo.ops import linear_token_logprobs, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "token_logprobs", "linear_token_logprobs",
    "LossOutput", "reference", "__version__",
]
