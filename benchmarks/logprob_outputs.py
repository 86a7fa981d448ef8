"""Hidden states → per-token log-prob statistics through the lm_head, forward + backward.

``python -m benchmarks.logprob_outputs [--case 512x896x151936] [--threads 1] [--repeats 3]``

A case ``NxDxV`` is N tokens, hidden size D and vocabulary V, float32 on CPU (bfloat16 on CUDA). Each step
scores the labels and backpropagates ``-(logp.sum() + 0.01 * entropy.sum())`` into the hidden states and the
lm_head weight (the extra statistics are detached in every implementation):

``3-gemm``          the GEMMs none of them can avoid: logits h·Wᵀ, ∂h = G·W, ∂W = Gᵀ·h
``eager``           full ``[N, V]`` logits, ``log_softmax``, every statistic from the full softmax
``trl``             TRL 1.16's ``ChunkedLogProbFunction`` with every optional output (its own chunk size)
``fastpo``          ``fastpo.linear_token_logprobs`` with log-prob and entropy only
``fastpo-all``      ``fastpo.linear_token_logprobs`` with all five outputs

Times are medians of interleaved repeats in one process, also given as multiples of ``3-gemm`` and of ``trl``.
The implementations' log-probs, entropies and statistics are checked against eager before timing.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict

import torch

from .harness import FULL_CUDA, TimingPolicy, device_info, header_lines, time_interleaved

IMPLS = ["3-gemm", "eager", "trl", "fastpo", "fastpo-all"]
ALL = ("logp", "entropy", "log_sum_sq_probs", "is_top1", "mean_logits")


def make_inputs(n: int, d: int, v: int, device: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    hidden = torch.randn(n, d, generator=g).to(device=device, dtype=dt)
    weight = (torch.randn(v, d, generator=g) * d ** -0.5).to(device=device, dtype=dt)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    return {"hidden": hidden, "weight": weight, "labels": labels,
            "grad_logits": (torch.randn(n, v, generator=g) * 1e-3).to(device=device, dtype=dt)}


def eager_stats(hidden, weight, labels):
    """Every statistic from the full float32 logits (the spec the others are checked against)."""
    z = (hidden @ weight.t()).float()
    logp_all = torch.log_softmax(z, -1)
    p = logp_all.exp()
    logp = logp_all.gather(-1, labels[:, None])[:, 0]
    entropy = -(p * logp_all).sum(-1)
    with torch.no_grad():
        extras = {"log_sum_sq_probs": torch.logsumexp(2 * logp_all, -1), "is_top1": z.argmax(-1) == labels,
                  "mean_logits": z.mean(-1)}
    return {"logp": logp, "entropy": entropy, **extras}


def compute(impl: str, hidden, weight, labels) -> Dict[str, torch.Tensor]:
    if impl == "eager":
        return eager_stats(hidden, weight, labels)
    if impl == "trl":
        from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS, ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        out = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                           OPTIONAL_OUTPUTS)
        logp, entropy, lssp, mean, top1 = out
        return {"logp": logp, "entropy": entropy, "log_sum_sq_probs": lssp, "is_top1": top1.bool(),
                "mean_logits": mean}
    import fastpo

    out = fastpo.linear_token_logprobs(hidden, weight, labels, outputs=ALL if impl == "fastpo-all" else
                                       ("logp", "entropy"))
    return {k: getattr(out, k) for k in ALL if getattr(out, k) is not None}


def make_step(impl: str, inputs):
    hidden = inputs["hidden"].clone().requires_grad_()
    weight = inputs["weight"].clone().requires_grad_()
    labels = inputs["labels"]

    def setup():
        hidden.grad = weight.grad = None

    if impl == "3-gemm":
        g = inputs["grad_logits"]

        def step():
            with torch.no_grad():
                torch.mm(hidden, weight.t())
                torch.mm(g, weight)
                torch.mm(g.t(), hidden)
    else:
        def step():
            out = compute(impl, hidden, weight, labels)
            (-(out["logp"].sum() + 0.01 * out["entropy"].sum())).backward()
            return out
    return step, setup


def check(inputs) -> None:
    """Each implementation's outputs against eager's, before any timing."""
    want = eager_stats(inputs["hidden"], inputs["weight"], inputs["labels"])
    for impl in IMPLS[2:]:
        got = compute(impl, inputs["hidden"], inputs["weight"], inputs["labels"])
        for key, value in got.items():
            if key == "is_top1":
                ok = bool((value == want[key]).all())
            else:
                ok = torch.allclose(value.float(), want[key].float(), atol=2e-3, rtol=1e-3)
            if not ok:
                raise AssertionError(f"{impl}: {key} disagrees with eager")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="512x896x151936", help="NxDxV")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up) on CPU")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, d, v = (int(x) for x in args.case.split("x"))
    inputs = make_inputs(n, d, v, args.device)
    check(inputs)
    policy = FULL_CUDA if args.device == "cuda" else TimingPolicy(warmup=1, min_repeats=args.repeats,
                                                                  max_repeats=args.repeats, budget_s=0.0)
    times, failures = time_interleaved({impl: make_step(impl, inputs) for impl in IMPLS}, args.device, policy)
    if failures:
        raise RuntimeError(f"failed: {failures}")
    lines = header_lines(device_info(args.device))
    lines += ["", "| case | impl | median ms | × 3-gemm | × trl |", "|---|---|---:|---:|---:|"]
    for impl in IMPLS:
        t = times[impl]["median_ms"]
        lines.append(f"| N={n} D={d} V={v} fwd+bwd | {impl} | {t:.1f} | {t / times['3-gemm']['median_ms']:.2f}x | "
                     f"{t / times['trl']['median_ms']:.2f}x |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
