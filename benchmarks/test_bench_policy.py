"""pytest-benchmark micro-benchmarks of fastpo.policy_loss (every preset) on CPU against the eager
composite, torch.compile of it and verl (when installed). ``pytest benchmarks/ --benchmark-only``."""

from __future__ import annotations

import pytest

from benchmarks.microbench import bench_case
from benchmarks.peers import COMPILE
from benchmarks.policy import PRESETS, PolicyLossOp

OP = PolicyLossOp()


@pytest.mark.parametrize("impl", ["eager", COMPILE, "verl", "fastpo"])
@pytest.mark.parametrize("preset", PRESETS)
def test_policy_loss(benchmark, preset, impl):
    bench_case(benchmark, OP, impl, {"preset": preset, "B": 16, "T": 2048, "dtype": "float32", "mode": "fwdbwd"})
