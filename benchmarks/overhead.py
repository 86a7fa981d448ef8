"""Per-call overhead of the log-prob ops on tiny inputs, against eager PyTorch (one thread).

    python -m benchmarks.overhead [--calls 2000] [--repeats 5] [--softcap]

Each case times one call (forward only, and forward + backward) on inputs small enough that the
kernels cost a few microseconds, so the difference to eager is the Python / dispatch overhead. It
prints the median over ``--calls`` calls, and the minimum of those medians over ``--repeats``
rounds (the rounds interleave fastpo and eager, so load on a shared machine hits both alike).
Eager is ``torch.log_softmax`` + ``gather`` (and ``F.linear`` first for the linear op, the masked
sum for ``sequence_logprobs``).

``--softcap-rows`` also times the C++ forward at 256 x 32000 fp32 with and without
``logit_softcap`` (the tanh per logit), min of 7 calls.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import fastpo


def _median_us(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def _eager_logprobs(logits, labels):
    return torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def cases():
    """(name, fastpo_fn, eager_fn) triples; each fn runs one call."""
    torch.manual_seed(0)
    logits = torch.randn(64, 100)
    labels = torch.randint(0, 100, (64,))
    logits_g = logits.clone().requires_grad_()
    hidden = torch.randn(64, 32)
    weight = torch.randn(100, 32)
    hidden_g, weight_g = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    tok = torch.randn(4, 16)
    mask = torch.rand(4, 16) > 0.2
    tok_g = tok.clone().requires_grad_()

    def fwd_bwd(out):
        out.sum().backward()

    def eager_linear(h, w):
        return _eager_logprobs(torch.nn.functional.linear(h, w), labels)

    def eager_entropy(x):
        logp_all = torch.log_softmax(x, -1)
        logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return logp, -(logp_all.exp() * logp_all).sum(-1)

    def both(pair):
        pair[0].sum().add(pair[1].sum()).backward()

    return [
        ("token_logprobs 64x100 fwd",
         lambda: fastpo.token_logprobs(logits, labels), lambda: _eager_logprobs(logits, labels)),
        ("token_logprobs 64x100 fwd+bwd",
         lambda: fwd_bwd(fastpo.token_logprobs(logits_g, labels)),
         lambda: fwd_bwd(_eager_logprobs(logits_g, labels))),
        ("token_logprobs +entropy fwd+bwd",
         lambda: both(fastpo.token_logprobs(logits_g, labels, return_entropy=True)),
         lambda: both(eager_entropy(logits_g))),
        ("linear_token_logprobs 64x32x100 fwd",
         lambda: fastpo.linear_token_logprobs(hidden, weight, labels), lambda: eager_linear(hidden, weight)),
        ("linear_token_logprobs fwd+bwd",
         lambda: fwd_bwd(fastpo.linear_token_logprobs(hidden_g, weight_g, labels)),
         lambda: fwd_bwd(eager_linear(hidden_g, weight_g))),
        ("sequence_logprobs 4x16 fwd",
         lambda: fastpo.sequence_logprobs(tok, mask), lambda: torch.where(mask, tok, 0.0).sum(-1)),
        ("sequence_logprobs fwd+bwd",
         lambda: fwd_bwd(fastpo.sequence_logprobs(tok_g, mask)),
         lambda: fwd_bwd(torch.where(mask, tok_g, 0.0).sum(-1))),
    ]


def softcap_rows(rows: int = 256, vocab: int = 32000, calls: int = 7):
    """ms of the C++ forward and forward + backward, with and without softcap (min of ``calls``)."""
    torch.manual_seed(0)
    logits = torch.randn(rows, vocab) * 20
    labels = torch.randint(0, vocab, (rows,))
    out = {}
    for name, cap in (("no softcap", None), ("softcap 30", 30.0)):
        def fwd():
            fastpo.token_logprobs(logits, labels, logit_softcap=cap, return_entropy=True)

        x = logits.clone().requires_grad_()

        def fwd_bwd():
            lp, ent = fastpo.token_logprobs(x, labels, logit_softcap=cap, return_entropy=True)
            (lp.sum() + ent.sum()).backward()

        fwd()
        fwd_bwd()
        out[name] = tuple(min(_median_us(f, 1) for _ in range(calls)) / 1e3 for f in (fwd, fwd_bwd))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--softcap-rows", action="store_true", help="also time the 256 x 32000 softcap forward")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), backend {fastpo._backend.select_backend(torch.zeros(1))}")
    print(f"{'case':38s} {'fastpo us':>10s} {'eager us':>10s} {'added us':>10s}")
    for name, ours, eager in cases():
        for _ in range(50):  # warm-up (first-call imports, caches)
            ours(), eager()
        best_ours = best_eager = float("inf")
        for _ in range(args.repeats):
            best_ours = min(best_ours, _median_us(ours, args.calls))
            best_eager = min(best_eager, _median_us(eager, args.calls))
        print(f"{name:38s} {best_ours:10.1f} {best_eager:10.1f} {best_ours - best_eager:10.1f}")
    if args.softcap_rows:
        for name, (fwd_ms, both_ms) in softcap_rows().items():
            print(f"C++ 256x32000 fp32 +entropy, {name:10s}: fwd {fwd_ms:7.2f} ms, fwd+bwd {both_ms:7.2f} ms")


if __name__ == "__main__":
    main()
