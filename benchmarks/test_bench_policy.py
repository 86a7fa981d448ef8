"""pytest-benchmark micro-benchmarks of fastpo.policy_loss (every preset) on CPU against the eager
composite, torch.compile of it and verl (when installed). ``pytest benchmarks/ --benchmark-only``."""

from __future__ import annotations

import pytest

from benchmarks.microbench import bench_case
from benchmarks.peers import COMPILE
from benchmarks.policy import PRESETS, VERL_LOSSES, VERL_PREFIX, PolicyLossOp

OP = PolicyLossOp()


@pytest.mark.parametrize("impl", ["eager", COMPILE, "verl", "fastpo"])
@pytest.mark.parametrize("preset", PRESETS)
def test_policy_loss(benchmark, preset, impl):
    bench_case(benchmark, OP, impl, {"preset": preset, "B": 16, "T": 2048, "dtype": "float32", "mode": "fwdbwd"})


@pytest.mark.parametrize("name", VERL_LOSSES)
def test_verl_surrogate_rows_pass_the_guard(name):
    """Each surrogate row: fastpo_<name> and verl's <name> equal verl's function in float64 (loss, gradient)."""
    pytest.importorskip("verl.trainer.ppo.core_algos")
    p = {"preset": VERL_PREFIX + name, "B": 3, "T": 64, "dtype": "float32", "mode": "fwdbwd"}
    assert OP.impls(p, "cpu") == ["verl", COMPILE, "fastpo"] and OP.case_baseline(p) == "verl"
    inputs = OP.make_inputs(p, "cpu")
    ref = OP.reference(p, inputs)
    for impl in ("verl", "fastpo"):
        ok, msg = OP.compare(ref, OP.outputs(impl, p, inputs), p, "cpu")
        assert ok, f"{impl} {name}: {msg}"
