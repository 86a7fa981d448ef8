"""Test set-up: with no GPU, the Triton kernels run on CPU tensors under the Triton interpreter.

``TRITON_INTERPRET`` must be set before triton is imported, so it is set here, at collection.
The ``backend`` fixture runs a test once per implementation: the C++ CPU path, and the Triton
kernels (compiled on CUDA when a GPU is present, interpreted on CPU otherwise).
"""

import os
import tempfile

import torch

# A fresh torch.compile cache per test session: compiled graphs cached on disk by an earlier run
# can still call a custom op's previous schema after the op changed.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastpo-inductor-"))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# (backend, device) pairs every op is tested on.
BACKEND_DEVICES = [("cpu", "cpu"), ("triton", "cuda" if HAS_CUDA else "cpu")]


@pytest.fixture(params=BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
def backend(request, monkeypatch):
    """Forces FASTPO_BACKEND; yields the device the tensors of this backend live on."""
    name, device = request.param
    monkeypatch.setenv("FASTPO_BACKEND", name)
    return device


@pytest.fixture
def cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPO_BACKEND", "cpu")
    return "cpu"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A ``FASTPO_CACHE`` folder shared by the tests that need the built-in tiny model."""
    return tmp_path_factory.mktemp("fastpo-cache")


@pytest.fixture(scope="session")
def tiny_dir(tiny_cache):
    """The built-in tiny model (``fastpo train``'s default policy), built once for the session."""
    from fastpo.trainer.tiny_model import tiny_model_path

    return tiny_model_path(tiny_cache, log=None)


@pytest.fixture(scope="session")
def small_lm(tmp_path_factory):
    """The tiny model's tokenizer and architecture, randomly initialised (cheap, deterministic), shared read-only
    by the trainer tests that need a model but not the warm-started one."""
    from fastpo.trainer.tiny_model import build_tiny_model

    path = tmp_path_factory.mktemp("small_lm")
    build_tiny_model(path, seed=0, steps=0, log=None, eval_examples=0)
    return str(path)
