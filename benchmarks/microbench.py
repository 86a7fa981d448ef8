"""Shared helper of the pytest-benchmark micro-benchmarks (``benchmarks/test_bench_*.py``).

``pytest benchmarks/ --benchmark-only`` runs them (``--benchmark-group-by=group`` puts the
implementations of one case side by side). They live outside ``tests/``: the normal test run does
not collect them.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest

from .peers import Skip


def bench_case(benchmark, op, impl: str, params: Dict[str, Any], rounds: int = 5) -> None:
    """Checks ``impl`` against the op's reference on the same inputs (the correctness guard), then
    benchmarks one step per round on CPU. A peer that is not installed, or an implementation that
    cannot run here, skips the test with the reason."""
    why = op.skip_reason(impl, params, "cpu")
    if why:
        pytest.skip(why)
    inputs = op.make_inputs(params, "cpu")
    try:
        out = op.outputs(impl, params, inputs)
    except Skip as exc:
        pytest.skip(str(exc))
    ok, msg = op.compare(op.reference(params, inputs), out, params, "cpu")
    if not ok and not impl.startswith("fastpo"):
        # a peer (or baseline) outside the guard's tolerance is not timed; fastpo failing it is a bug
        pytest.skip(f"{impl} disagrees with eager on {op.label(params)} ({msg}): not timed")
    assert ok, f"{impl} disagrees with eager on {op.label(params)}: {msg}"
    step, setup = op.make_step(impl, params, inputs)
    benchmark.group = f"{op.name}: {op.label(params)}"
    benchmark.extra_info.update({k: v for k, v in params.items() if isinstance(v, (int, float, str, bool))})
    benchmark.extra_info["impl"] = impl
    benchmark.pedantic(step, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
