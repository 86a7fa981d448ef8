"""N·V beyond 2^31: the kernels' 64-bit row offsets reach the end of the last row.

Five bf16 rows of 2^29 + 11 logits (5.4 GB): zero everywhere except two known values at the far end
of the last row, so the exact log-prob and gradient are known in closed form. A 32-bit row offset
would read and write the wrong memory there. Runs on the C++ path, and on Triton when a GPU is present.
"""

import math

import pytest
import torch

import fastpo

N_ROWS, VOCAB = 5, (1 << 29) + 11


def _available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


DEVICES = [("cpu", "cpu")] + ([("triton", "cuda")] if torch.cuda.is_available() else [])


@pytest.mark.slow
@pytest.mark.parametrize("backend_name,device", DEVICES, ids=[b for b, _ in DEVICES])
def test_offsets_past_two_to_the_31(monkeypatch, backend_name, device):
    need = N_ROWS * VOCAB * 2
    if _available_bytes(device) < 2 * need:
        pytest.skip(f"needs {2 * need / 2**30:.1f} GiB free on {device}")
    monkeypatch.setenv("FASTPO_BACKEND", backend_name)
    assert N_ROWS * VOCAB > 2**31

    logits = torch.zeros(N_ROWS, VOCAB, dtype=torch.bfloat16, device=device)
    last, label = N_ROWS - 1, VOCAB - 3
    logits[last, VOCAB - 1] = 5.0
    logits[last, label] = 3.0
    labels = torch.tensor([0, 1, 2, VOCAB - 1, label], device=device)
    logits.requires_grad_()

    logp = fastpo.token_logprobs(logits, labels, inplace_backward=True)
    z_last = (VOCAB - 2) + math.exp(5.0) + math.exp(3.0)
    expected = torch.tensor([-math.log(VOCAB)] * 4 + [3.0 - math.log(z_last)], dtype=torch.float64)
    torch.testing.assert_close(logp.double().cpu(), expected, atol=1e-5, rtol=1e-5)

    (grad,) = torch.autograd.grad(logp.sum(), logits)  # written over the logits buffer
    got = grad[last, [0, label, VOCAB - 1]].double().cpu()
    want = torch.tensor([-1 / z_last, 1 - math.exp(3.0) / z_last, -math.exp(5.0) / z_last], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-2)  # bf16 gradient
    torch.testing.assert_close(grad[0, 0].double().cpu(), torch.tensor(1 - 1 / VOCAB, dtype=torch.float64),
                               atol=0, rtol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("backend_name,device", DEVICES, ids=[b for b, _ in DEVICES])
def test_extra_outputs_past_two_to_the_31(monkeypatch, backend_name, device):
    """Every per-token statistic at the far end of the last row, in closed form: rows 0-3 are all zero
    (uniform: logp = log Σp² = −log V, entropy = log V, mean 0, is_top1 only for label 0, the first
    argmax of a tie); the last row holds 5 at V−1 (its label, so is_top1) and 3 at V−3."""
    need = N_ROWS * VOCAB * 2
    if _available_bytes(device) < 2 * need:
        pytest.skip(f"needs {2 * need / 2**30:.1f} GiB free on {device}")
    monkeypatch.setenv("FASTPO_BACKEND", backend_name)
    logits = torch.zeros(N_ROWS, VOCAB, dtype=torch.bfloat16, device=device)
    last = N_ROWS - 1
    logits[last, VOCAB - 1] = 5.0
    logits[last, VOCAB - 3] = 3.0
    labels = torch.tensor([0, 1, 2, VOCAB - 1, VOCAB - 1], device=device)
    got = fastpo.token_logprobs(logits, labels, outputs=("logp", "entropy", "log_sum_sq_probs", "is_top1",
                                                         "mean_logits"))
    del logits
    log_v = math.log(VOCAB)
    z = (VOCAB - 2) + math.exp(5.0) + math.exp(3.0)
    want = {
        "logp": [-log_v] * 4 + [5.0 - math.log(z)],
        "entropy": [log_v] * 4 + [math.log(z) - (5 * math.exp(5.0) + 3 * math.exp(3.0)) / z],
        "log_sum_sq_probs": [-log_v] * 4 + [math.log((VOCAB - 2) + math.exp(10.0) + math.exp(6.0)) - 2 * math.log(z)],
        "mean_logits": [0.0] * 4 + [8.0 / VOCAB],
    }
    for name, values in want.items():
        torch.testing.assert_close(getattr(got, name).double().cpu(), torch.tensor(values, dtype=torch.float64),
                                   atol=1e-5, rtol=1e-5, msg=name)
    assert got.is_top1.cpu().tolist() == [True, False, False, False, True]
