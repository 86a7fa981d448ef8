"""pytest-benchmark micro-benchmarks of fastpo.gae and fastpo.group_advantages on CPU against verl's
loops (rewritten, and verl itself when installed). ``pytest benchmarks/ --benchmark-only``."""

from __future__ import annotations

import pytest

from benchmarks.advantages import GaeOp, GroupAdvantagesOp
from benchmarks.microbench import bench_case

GAE = GaeOp()
GROUPS = GroupAdvantagesOp()


@pytest.mark.parametrize("impl", ["eager", "verl", "fastpo"])
@pytest.mark.parametrize("mask", ["full", "ragged+holes"])
def test_gae(benchmark, mask, impl):
    bench_case(benchmark, GAE, impl, {"B": 256, "T": 1024, "mask": mask})


@pytest.mark.parametrize("impl", ["eager", "verl", "fastpo"])
def test_group_advantages(benchmark, impl):
    bench_case(benchmark, GROUPS, impl, {"B": 256, "T": 1024, "mask": "ragged+holes"})
