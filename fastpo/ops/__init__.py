"""Autograd boundaries (``torch.library`` custom ops) and dispatch to Triton / C++ / reference."""

from fastpo.ops.linear_token_logprobs import linear_token_logprobs
from fastpo.ops.token_logprobs import token_logprobs

__all__ = ["token_logprobs", "linear_token_logprobs"]
