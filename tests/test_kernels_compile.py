"""The Triton kernels compile for real GPUs (sm_80, sm_90) with the installed triton.

The interpreter runs the kernels' logic on CPU but never compiles them, so a type error in a
loop-carried value or an op the compiler rejects would only show on a GPU. Triton compiles ahead
of time for a named target without a device: ``compile_kernels.py`` does so for every kernel and
dtype in a child process (the interpreter must be off there), and this test reads its report.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(HERE / "compile_kernels.py")], capture_output=True, text=True,
                          env=env, cwd=HERE, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.skipif(not _nvidia_backend_available(), reason="this triton has no NVIDIA backend")
def test_every_kernel_compiles_for_sm80_and_sm90(report):
    modules = {r["module"] for r in report.values()}
    expected = {p.stem for p in HERE.glob("aot_*.py")}
    assert modules == expected, f"modules without compile cases: {expected - modules}"
    assert sum(r["module"] == "aot_logprobs" for r in report.values()) == 2 * 3 * (3 + 3)  # (arch, dtype) x (fwd variants + bwd variants)
    failed = {name: r["error"] for name, r in report.items() if not r["ok"]}
    assert not failed, failed
    narrow = [name for name, r in report.items() if not r["int64_offsets"]]
    assert not narrow, f"no 64-bit offset arithmetic in {narrow}"
