"""fastpo's benchmark suite: speed and peak memory against reference PyTorch.

``python -m benchmarks [--quick] [--device cpu|cuda] [--ops logprobs,linear,...] [--json PATH]``, or
``fastpo bench ...`` (the same entry point).

Each benchmarked operation is a :class:`benchmarks.harness.BenchOp` registered here under a name;
``--ops`` selects them. New ops register themselves by adding an instance to :data:`OPS`.
"""

from __future__ import annotations

from typing import Dict, List

from .harness import BenchOp
from .advantages import GaeOp, GroupAdvantagesOp
from .distill import DistillOp
from .fused import LinearGrpoOp
from .linear_policy import LinearPolicyOp
from .logprobs import LinearLogprobsOp, LinearMemoryCheck, TokenLogprobsOp
from .policy import PolicyLossOp
from .preference import SequenceDpoOp

OPS: Dict[str, BenchOp] = {}


def register(op: BenchOp) -> BenchOp:
    if op.name in OPS:
        raise ValueError(f"benchmark op {op.name!r} registered twice")
    OPS[op.name] = op
    return op


def get_op(name: str) -> BenchOp:
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark op {name!r}; known: {', '.join(OPS)}") from None


def op_names() -> List[str]:
    return list(OPS)


register(TokenLogprobsOp())
register(GaeOp())
register(GroupAdvantagesOp())
register(LinearLogprobsOp())
register(LinearMemoryCheck())
register(PolicyLossOp())
register(SequenceDpoOp())
register(LinearGrpoOp())
register(LinearPolicyOp())  # opt-in (--ops linear-policy, or python -m benchmarks.linear_policy): heavy heads
register(DistillOp())  # opt-in (--ops distill, or python -m benchmarks.distill): two heavy heads

# What a plain run measures; the memory check joins in full mode.
DEFAULT_OPS_QUICK = ["logprobs", "linear", "gae", "group_advantages", "policy", "dpo", "linear-grpo"]
DEFAULT_OPS_FULL = ["logprobs", "linear", "linear-memory", "gae", "group_advantages", "policy", "dpo", "linear-grpo"]
