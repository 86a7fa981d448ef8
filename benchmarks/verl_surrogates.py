"""Every verl 0.9 policy loss, verl's function against ``fastpo_<name>``, side by side (issue 14's bar).

``python -m benchmarks.verl_surrogates [--B 64 --T 8192] [--threads 1] [--repeats 31] [--float-mask]
[--losses vanilla,gpg,...]``

The inputs and steps are ``benchmarks.policy``'s surrogate rows (``PolicyLossOp``: padded float32, rows of
random length T/4..T, forward + ``loss.backward()`` into ``log_prob``, metrics included) through verl's own
``core_algos.get_policy_loss_fn``: ``verl:<name>`` for verl's function, ``fastpo_<name>`` for fastpo's. The
repeats are interleaved (verl, fastpo, verl, ...) in one process and the medians reported, so the ratios
are measured in one run on the same machine state. ``response_mask`` is the bool tensor verl 0.9's
``ppo_loss`` passes (``data["response_mask"].to(bool)``); ``--float-mask`` hands both a float32 mask
instead. Prints one Markdown table row per loss.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

import torch

from .policy import VERL_LOSSES, VERL_PREFIX, PolicyLossOp


def measure(name: str, B: int, T: int, repeats: int, float_mask: bool) -> Dict[str, float]:
    op = PolicyLossOp()
    p = {"preset": VERL_PREFIX + name, "B": B, "T": T, "dtype": "float32", "mode": "fwdbwd"}
    inputs = op.make_inputs(p, "cpu")
    if float_mask:
        inputs["mask"] = inputs["mask"].float()
    steps = {impl: op.make_step(impl, p, inputs) for impl in ("verl", "fastpo")}
    times: Dict[str, List[float]] = {impl: [] for impl in steps}
    for r in range(repeats + 3):  # 3 warm-up rounds
        for impl, (step, setup) in steps.items():
            setup()
            t0 = time.perf_counter()
            step()
            if r >= 3:
                times[impl].append(time.perf_counter() - t0)
    return {impl: statistics.median(v) * 1e3 for impl, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--float-mask", action="store_true")
    ap.add_argument("--losses", default=",".join(VERL_LOSSES))
    args = ap.parse_args(argv)
    losses = [n for n in args.losses.split(",") if n]
    unknown = [n for n in losses if n not in VERL_LOSSES]
    if unknown:
        ap.error(f"unknown loss(es) {unknown}; choose from {list(VERL_LOSSES)}")
    torch.set_num_threads(args.threads)
    print(f"| loss | verl (ms) | fastpo (ms) | fastpo vs verl |  B={args.B} T={args.T}, {args.threads} thread(s), "
          f"{'float' if args.float_mask else 'bool'} mask")
    print("|---|---:|---:|---:|")
    for name in losses:
        t = measure(name, args.B, args.T, args.repeats, args.float_mask)
        print(f"| {name} | {t['verl']:.2f} | {t['fastpo']:.2f} | {t['verl'] / t['fastpo']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
