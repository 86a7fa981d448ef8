"""pytest-benchmark micro-benchmarks of fastpo.sequence_logprobs + fastpo.dpo_loss on CPU (padded and
packed), and of the hidden-states → GRPO loss path against Liger's chunked loss (when installed).
``pytest benchmarks/ --benchmark-only``."""

from __future__ import annotations

import pytest

from benchmarks.fused import LinearGrpoOp
from benchmarks.microbench import bench_case
from benchmarks.peers import COMPILE
from benchmarks.preference import SequenceDpoOp

DPO = SequenceDpoOp()
LINEAR_GRPO = LinearGrpoOp()


@pytest.mark.parametrize("impl", ["eager", COMPILE, "fastpo"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_sequence_dpo(benchmark, layout, impl):
    bench_case(benchmark, DPO, impl, {"B": 64, "T": 4096, "layout": layout, "average": layout == "padded"})


@pytest.mark.parametrize("impl", ["eager", "liger", "fastpo"])
def test_linear_grpo(benchmark, impl):
    bench_case(benchmark, LINEAR_GRPO, impl,
               {"B": 4, "T": 256, "D": 256, "V": 32000, "dtype": "float32", "mode": "fwdbwd"}, rounds=3)
