"""Shared cases of the sequence ops (policy_loss, value_loss, gae, sequence_logprobs) for the layout
tests: each case is a set of named input tensors, the names that receive gradients, and a function of
them returning the op's outputs as a tuple of tensors (loss and metrics, or the op's tensors).

Batches are tiny (the Triton kernels run under the interpreter on CPU) and hold the edge cases of
real runs: a fully masked row (padded), an empty sequence (packed), masked holes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

import fastpo

B, T = 3, 5
CU = [0, 4, 4, 9, 13]  # packed: 4 sequences, one empty
N = CU[-1]
# every term of the policy loss reads its own input: KL (ref_logp), entropy, sequence-level rollout IS
FULL = fastpo.PolicyLossConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_estimator="k3",
                               entropy_coef=0.01, rollout_is="sequence_truncate", rollout_is_cap=1.5,
                               aggregation="seq_mean_token_mean")
BACKENDS = ("reference", "cpu", "triton")


@dataclass
class Case:
    name: str
    tensors: Dict[str, torch.Tensor]
    grad_names: Tuple[str, ...]
    fn: Callable[..., Tuple[torch.Tensor, ...]]
    packed: bool

    @property
    def mask(self) -> torch.Tensor:
        return self.tensors["mask"]


def _mask(packed: bool, g: torch.Generator) -> torch.Tensor:
    if packed:
        m = torch.rand(N, generator=g) > 0.3
        m[0] = m[5] = m[9] = True  # every non-empty sequence counts a token
        m[10] = False
        return m
    m = torch.rand(B, T, generator=g) > 0.3
    m[:, 0] = True
    m[1] = False  # a fully masked row
    m[2, 3] = False
    return m


def policy_fn(config=FULL):
    """The policy case's function with another config."""
    return lambda **t: _policy(config=config, **t)


def _policy(config=FULL, **t):
    out = fastpo.policy_loss(t["logp"], t["old_logp"], t["advantages"], t["mask"], cu_seqlens=t.get("cu_seqlens"),
                             ref_logp=t["ref_logp"], entropy=t["entropy"], rollout_logp=t["rollout_logp"],
                             config=config)
    return (out.loss, *out.metrics.values())


def _value(**t):
    out = fastpo.value_loss(t["values"], t["old_values"], t["returns"], t["mask"], cu_seqlens=t.get("cu_seqlens"),
                            clip=0.1, aggregation="seq_mean_token_mean")
    return out.loss, out.metrics["vf_clip_frac"]


def _gae(**t):
    return fastpo.gae(t["rewards"], t["values"], t["mask"], gamma=0.9, lam=0.8, cu_seqlens=t.get("cu_seqlens"))


def _sequence(**t):
    return (fastpo.sequence_logprobs(t["token_logp"], t["mask"], cu_seqlens=t.get("cu_seqlens"), average=True),)


def make_cases(packed: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (N,) if packed else (B, T)

    def r(scale=1.0, shift=0.0):
        return torch.randn(shape, generator=g) * scale + shift

    extra = {"cu_seqlens": torch.tensor(CU)} if packed else {}
    logp = r(0.3, -1.0)
    policy = dict(logp=logp, old_logp=logp + r(0.2), advantages=r(), ref_logp=logp + r(0.2), entropy=r(0.5, 2.0),
                  rollout_logp=logp + r(0.2), mask=_mask(packed, g), **extra)
    value = dict(values=r(), old_values=r(), returns=r(), mask=_mask(packed, g), **extra)
    gae = dict(rewards=r(), values=r(), mask=_mask(packed, g), **extra)
    seq = dict(token_logp=r(0.5, -1.0), mask=_mask(packed, g), **extra)
    suffix = "packed" if packed else "padded"
    return [
        Case(f"policy_loss-{suffix}", policy, ("logp", "entropy"), _policy, packed),
        Case(f"value_loss-{suffix}", value, ("values",), _value, packed),
        Case(f"gae-{suffix}", gae, (), _gae, packed),
        Case(f"sequence_logprobs-{suffix}", seq, ("token_logp",), _sequence, packed),
    ]


ALL_CASES = make_cases(False) + make_cases(True)


def run(case: Case, tensors: Dict[str, torch.Tensor], backend: str, upstream=None):
    """(outputs, gradients of the first output w.r.t. ``case.grad_names``) with ``FASTPO_BACKEND=backend``.

    The gradient inputs are used as given (views included): the gradient is taken w.r.t. them.
    ``upstream`` (a tensor shaped like the first output) is its incoming gradient (default ones).
    """
    old = os.environ.get("FASTPO_BACKEND")
    os.environ["FASTPO_BACKEND"] = backend
    try:
        outs = case.fn(**tensors)
    finally:
        if old is None:
            os.environ.pop("FASTPO_BACKEND")
        else:
            os.environ["FASTPO_BACKEND"] = old
    grads = ()
    if case.grad_names:
        first = outs[0]
        g = torch.ones_like(first) if upstream is None else upstream
        inputs = [tensors[k] for k in case.grad_names]
        grads = torch.autograd.grad(first, inputs, grad_outputs=g, allow_unused=True)
        # an input the loss does not read (entropy without entropy_coef) has a zero gradient
        grads = tuple(torch.zeros_like(x) if d is None else d for x, d in zip(inputs, grads))
    return tuple(o.detach() for o in outs), grads


def with_grad(case: Case, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A copy of ``tensors`` whose gradient inputs are fresh leaves (contiguous clones)."""
    out = dict(tensors)
    for k in case.grad_names:
        out[k] = tensors[k].detach().clone().requires_grad_()
    return out


def assert_all_close(got, want, *, atol=2e-5, rtol=1e-4, what=""):
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what} [{i}]: {m}")
