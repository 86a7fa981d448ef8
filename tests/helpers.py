"""Shared test helpers: reference comparisons, upstream gradients and error checks."""

import re

import pytest
import torch

TOLERANCES = {  # (atol, rtol) for values computed in float32 from inputs of the given dtype
    torch.float32: (2e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (2e-5, 1e-5),
    torch.float16: (2e-5, 1e-5),
}
# Gradients come back in the input dtype: allow its rounding.
GRAD_TOLERANCES = {
    torch.float32: (2e-5, 1e-4),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (1e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for torchrun's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_gloo_ranks(target, timeout: float) -> None:
    """Spawns ``target(rank, port, queue)`` on ranks 0 and 1 (each puts ``(rank, [failure messages])`` on the
    queue) and fails the test with every rank's messages."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    failures = [f"rank {r}: {msg}" for r in sorted(results) for msg in results[r]]
    assert not failures, "\n".join(failures)


def make_labels(shape, vocab, *, ignore_index=-100, ignore_fraction=0.25, generator=None, device="cpu"):
    labels = torch.randint(0, vocab, shape, generator=generator)
    drop = torch.rand(shape, generator=generator) < ignore_fraction
    return labels.masked_fill(drop, ignore_index).to(device)


def assert_close(actual, expected, dtype, *, grad=False):
    atol, rtol = (GRAD_TOLERANCES if grad else TOLERANCES)[dtype]
    torch.testing.assert_close(actual.cpu().to(expected.dtype), expected.cpu(), atol=atol, rtol=rtol)


def assert_raises_unmodified(call, inputs, exc, *, match=None, fragment=None):
    """``call(**inputs)`` raises ``exc`` whose message matches the regex ``match`` (or contains the
    plain text ``fragment``), and leaves every tensor in ``inputs`` as it was."""
    before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc) as info:
        call(**inputs)
    message = str(info.value)
    if match is not None:
        assert re.search(match, message), f"{message!r} does not match {match!r}"
    if fragment is not None:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    for key, value in before.items():
        assert torch.equal(inputs[key], value), f"{key} was modified"
