"""Fused linear distillation: student/teacher hidden states → distillation loss, forward + backward.

``python -m benchmarks.distill [--cases 256x512x32768] [--betas 0,0.5,1] [--threads 1] [--no-memory]``, or
within the suite as the opt-in op ``distill`` (``fastpo bench --ops distill``: one β = 0.5 case per head,
timed and checked against a float64 eager reference by the suite's harness).

A case ``NxDxV`` is N tokens (a quarter of them masked out), both models' hidden size D and vocabulary V,
float32 on CPU (bfloat16 on CUDA). Each step is the loss and its backward into the student's hidden
states and lm_head weight, with the teacher constant:

``4-gemm``   the GEMMs none of them can avoid: both models' logits, ∂h = G·W, ∂W = Gᵀ·h
``eager``    full ``[N, V]`` logits of both models → TRL 1.16's GKD ``generalized_jsd_loss`` (labels = mask)
``trl``      TRL 1.16's DistillationTrainer loss (``ChunkedDivergenceFunction``: 6 GEMMs, 8 for the JSD)
``fastpo``   ``fastpo.linear_distill_loss`` (batchmean over the mask; the gradients formed in the forward)

Times are medians of interleaved repeats in one process, also given as multiples of ``4-gemm`` and of
``trl``; extra peak memory (RSS on CPU, allocated bytes on CUDA) of one step comes from one fresh
subprocess per implementation. The losses are checked against each other before timing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any, Dict, List, Tuple

import torch

from .fused import LinearGrpoOp
from .harness import (FULL_CPU, FULL_CUDA, BenchOp, _proc_status_kib, _release_free_heap, _reset_rss_high_water_mark,
                      device_info, header_lines, time_interleaved)

IMPLS = ["4-gemm", "eager", "trl", "fastpo"]


def make_inputs(n: int, d: int, v: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dt)  # noqa: E731
    hs, ht = make(1, n, d), make(1, n, d)
    ws, wt = make(v, d, scale=d ** -0.5), make(v, d, scale=d ** -0.5)
    mask = (torch.rand(1, n, generator=g) < 0.75).to(device)
    return {"hs": hs, "ws": ws, "ht": ht, "wt": wt, "mask": mask, "g": make(n, v, scale=1e-3)}


def make_step(impl: str, beta: float, inputs):
    hs = inputs["hs"].clone().requires_grad_()
    ws = inputs["ws"].clone().requires_grad_()
    ht, wt, mask = inputs["ht"], inputs["wt"], inputs["mask"]

    def setup():
        hs.grad = ws.grad = None

    if impl == "4-gemm":
        grad_logits = inputs["g"]

        def step():
            with torch.no_grad():
                torch.mm(hs[0], ws.t())
                torch.mm(ht[0], wt.t())
                torch.mm(grad_logits, ws)
                torch.mm(grad_logits.t(), hs[0])
            return None
    elif impl == "eager":
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        labels = torch.where(mask, 0, -100)

        def step():
            with torch.no_grad():
                t_logits = (ht @ wt.t()).float()
            loss = GKDTrainer.generalized_jsd_loss((hs @ ws.t()).float(), t_logits, labels=labels, beta=beta)
            loss.backward()
            return loss.detach()
    elif impl == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def step():
            loss = _chunked_divergence_loss(hs, ht, ws, wt, mask.long(), beta)[0]
            loss.backward()
            return loss.detach()
    else:
        import fastpo

        def step():
            loss = fastpo.linear_distill_loss(hs, ws, ht, wt, mask=mask, beta=beta)
            loss.backward()
            return loss.detach()
    step.leaves = (hs, ws)  # the student's hidden states and lm_head weight, for the gradients
    return step, setup


class DistillOp(BenchOp):
    """The suite's view of this benchmark: ``fastpo bench --ops distill`` (opt-in: heavy heads)."""

    name = "distill"
    description = "student/teacher hidden states → distillation loss (β = 0.5), fwd+bwd, vs the 4 lm_head GEMMs"
    compile_skip = "the eager baseline is TRL's GKD loss on full logits; compiling TRL's loss is not a fastpo row"

    def cases(self, quick: bool, device: str) -> List[Dict[str, Any]]:
        heads = [(256, 512, 32768)] if quick else [(256, 512, 32768), (1024, 512, 32768)]
        return [{"N": n, "D": d, "V": v, "beta": 0.5, "dtype": "bfloat16" if device == "cuda" else "float32"}
                for n, d, v in heads]

    def label(self, p: Dict[str, Any]) -> str:
        return f"distill β={p['beta']} N={p['N']} D={p['D']} V={p['V']} {p['dtype']} fwd+bwd"

    def impls(self, p: Dict[str, Any], device: str) -> List[str]:
        return list(IMPLS)

    def baseline(self) -> str:
        return "trl"

    def tiny(self, p: Dict[str, Any]) -> Dict[str, Any]:
        return dict(p, N=8, D=8, V=64)

    def make_inputs(self, p: Dict[str, Any], device: str) -> Dict[str, Any]:
        return make_inputs(p["N"], p["D"], p["V"], device)

    def make_step(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]):
        return make_step(impl, p["beta"], inputs)

    def outputs(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        if impl == "4-gemm":
            return {}
        step, setup = make_step(impl, p["beta"], inputs)
        setup()
        loss = step()
        hs, ws = step.leaves
        return {"loss": loss.float(), "grad_hidden": hs.grad.float(), "grad_weight": ws.grad.float()}

    def reference(self, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        """TRL GKD's loss math on full logits, in float64 (the eager row's formula at full precision)."""
        from fastpo import reference

        d = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items() if k != "g"}
        hs, ws = d["hs"].requires_grad_(True), d["ws"].requires_grad_(True)
        loss = reference.linear_distill_loss(hs, ws, d["ht"], d["wt"], mask=d["mask"], beta=p["beta"])
        loss.backward()
        return {"loss": loss.detach(), "grad_hidden": hs.grad, "grad_weight": ws.grad}

    def compare(self, ref, out, p, device) -> Tuple[bool, str]:
        if not out:
            return True, "the GEMMs alone (no loss)"
        return LinearGrpoOp.compare(self, ref, out, p, device)  # loss, grad_hidden, grad_weight: the same check

    def input_bytes(self, p: Dict[str, Any]) -> int:
        es = 2 if p["dtype"] == "bfloat16" else 4
        return 2 * (p["N"] + p["V"]) * p["D"] * es + p["N"] * (p["V"] * es + 1)

    def estimate_bytes(self, impl: str, p: Dict[str, Any]) -> int:
        nv4 = p["N"] * p["V"] * 4
        extra = {"4-gemm": 2 * nv4, "eager": 8 * nv4, "trl": 8 * nv4}.get(impl, 2 * min(p["N"], 4096) * p["V"] * 4)
        return int(1.1 * (self.input_bytes(p) + extra + (p["N"] + p["V"]) * p["D"] * 4) + 128 * 1024 * 1024)


def _extra_peak_here(impl: str, beta: float, n: int, d: int, v: int, device: str) -> float:
    """Runs in a child process: the extra peak bytes of one step, after a warm-up on a tiny case."""
    small = make_inputs(8, 8, 64, device)
    step, setup = make_step(impl, beta, small)
    setup()
    step()
    inputs = make_inputs(n, d, v, device)
    step, setup = make_step(impl, beta, inputs)
    setup()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    _release_free_heap()
    if not _reset_rss_high_water_mark():
        raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs)")
    base = _proc_status_kib()["VmRSS"]
    step()
    return float(_proc_status_kib()["VmHWM"] - base) * 1024


def _extra_peak(impl, beta, n, d, v, device, threads) -> float:
    spec = json.dumps({"impl": impl, "beta": beta, "n": n, "d": d, "v": v, "device": device, "threads": threads})
    out = subprocess.run([sys.executable, "-m", "benchmarks.distill", "--child", spec], capture_output=True,
                         text=True, check=True).stdout
    return float([line for line in out.splitlines() if line.startswith("PEAK ")][-1].split()[1])


def run_case(n, d, v, beta, device, threads, memory) -> List[str]:
    inputs = make_inputs(n, d, v, device)
    steps = {impl: make_step(impl, beta, inputs) for impl in IMPLS}
    losses = {}
    for impl, (step, setup) in steps.items():
        setup()
        losses[impl] = step()
    for impl in ("eager", "trl"):
        diff = (losses[impl].float() - losses["fastpo"].float()).abs().item()
        if diff > 1e-3 * max(1.0, losses["fastpo"].abs().item()):
            raise AssertionError(f"{impl} and fastpo disagree on N={n} D={d} V={v} beta={beta}: {diff:.3g}")
    policy = FULL_CUDA if device == "cuda" else FULL_CPU
    times, failures = time_interleaved(steps, device, policy)
    if failures:
        raise RuntimeError(f"failed: {failures}")
    mem = {impl: _extra_peak(impl, beta, n, d, v, device, threads) for impl in IMPLS[1:]} if memory else {}
    logits_bytes = n * v * 4
    rows = []
    for impl in IMPLS:
        t = times[impl]["median_ms"]
        cells = [f"N={n} D={d} V={v} β={beta}", impl, f"{t:.1f}", f"{t / times['4-gemm']['median_ms']:.2f}x",
                 f"{t / times['trl']['median_ms']:.2f}x"]
        if memory:
            cells.append("—" if impl not in mem else f"{mem[impl] / 2**20:.0f} MiB ({mem[impl] / logits_bytes:.2f})")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="256x512x32768", help="comma-separated NxDxV")
    ap.add_argument("--betas", default="0,0.5,1")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        print("PEAK", _extra_peak_here(spec["impl"], spec["beta"], spec["n"], spec["d"], spec["v"], spec["device"]))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    info = device_info(args.device)
    lines = header_lines(info)
    memory = not args.no_memory
    head = ["case", "impl", "median ms", "vs 4-gemm", "vs trl"] + (["extra peak (share of one [N, V] fp32)"]
                                                                   if memory else [])
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in args.cases.split(","):
        n, d, v = (int(x) for x in case.split("x"))
        for beta in (float(b) for b in args.betas.split(",")):
            lines += run_case(n, d, v, beta, args.device, args.threads, memory)
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
