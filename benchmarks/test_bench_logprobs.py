"""pytest-benchmark micro-benchmarks of the CPU log-prob paths against the eager baselines.

Run with ``pytest benchmarks/ --benchmark-only`` (add ``--benchmark-group-by=group`` to compare
the implementations of one case side by side). The normal test run (``pytest tests/``, or plain
``pytest``, whose testpaths is ``tests``) does not collect this file.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.logprobs import LinearLogprobsOp, TokenLogprobsOp
from benchmarks.microbench import bench_case
from benchmarks.peers import COMPILE

fastpo = pytest.importorskip("fastpo")
if not hasattr(fastpo, "token_logprobs"):
    pytest.skip("fastpo.token_logprobs is not available", allow_module_level=True)

TOKEN = TokenLogprobsOp()
LINEAR = LinearLogprobsOp()

TOKEN_CASES = [
    {"N": 2048, "V": 32000, "dtype": "float32"},
    {"N": 2048, "V": 32000, "dtype": "bfloat16"},
]
LINEAR_CASES = [{"N": 1024, "D": 256, "V": 32000, "dtype": "float32"}]


def _ids(cases, keys):
    return ["-".join(str(c[k]) for k in keys) for c in cases]


def _run(benchmark, op, impl, params, rounds):
    bench_case(benchmark, op, impl, params, rounds=rounds)


@pytest.mark.parametrize("impl", ["eager", COMPILE, "trl", "fastpo"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("case", TOKEN_CASES, ids=_ids(TOKEN_CASES, ["N", "V", "dtype"]))
def test_token_logprobs(benchmark, case, mode, impl):
    _run(benchmark, TOKEN, impl, dict(case, mode=mode, entropy=False), rounds=5)


@pytest.mark.parametrize("impl", ["eager", "trl", "fastpo"])
def test_token_logprobs_entropy_fwdbwd(benchmark, impl):
    _run(benchmark, TOKEN, impl, {"N": 1024, "V": 32000, "dtype": "float32", "mode": "fwdbwd", "entropy": True}, rounds=5)


def test_token_logprobs_inplace_backward(benchmark):
    _run(benchmark, TOKEN, "fastpo-inplace",
         {"N": 2048, "V": 32000, "dtype": "float32", "mode": "fwdbwd", "entropy": False}, rounds=5)


@pytest.mark.parametrize("impl", ["eager", COMPILE, "fastpo"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=_ids(LINEAR_CASES, ["N", "D", "V", "dtype"]))
def test_linear_token_logprobs(benchmark, case, mode, impl):
    _run(benchmark, LINEAR, impl, dict(case, mode=mode, entropy=False), rounds=3)


def test_cpu_tensors_take_the_cpu_path():
    """Not a benchmark: the CPU figures above are only meaningful on the CPU path."""
    from fastpo._backend import select_backend

    assert select_backend(torch.zeros(1)) in ("cpu", "reference")
