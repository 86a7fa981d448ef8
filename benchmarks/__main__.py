"""``python -m benchmarks``: run the registered benchmark ops and print markdown tables.

Examples::

    python -m benchmarks --quick                     # ~1-3 min on a 2-core CPU
    python -m benchmarks                             # full sizes (+ the linear memory check)
    python -m benchmarks --ops linear-memory         # only the CPU memory check
    python -m benchmarks --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

import torch

from . import DEFAULT_OPS_FULL, DEFAULT_OPS_QUICK, get_op, op_names
from .harness import REPO_ROOT, _loadavg, device_info, header_lines, markdown_table, run_op, write_json


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (~1-3 min on a 2-core CPU)")
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the inputs live (default: cuda when available)",
    )
    ap.add_argument(
        "--ops",
        default=None,
        help=f"comma-separated ops to run, from: {', '.join(op_names())} "
        f"(default: {','.join(DEFAULT_OPS_QUICK)} with --quick, {','.join(DEFAULT_OPS_FULL)} otherwise)",
    )
    ap.add_argument("--impls", default=None, help="comma-separated implementations to keep (default: all)")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="where to write every figure (default: benchmarks/results/logprobs-<device>[-quick][-<ops>].json)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but torch sees no CUDA device", file=sys.stderr)
        return 2
    names = args.ops.split(",") if args.ops else (DEFAULT_OPS_QUICK if args.quick else DEFAULT_OPS_FULL)
    try:
        ops = [get_op(n.strip()) for n in names if n.strip()]
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.device == "cpu" and os.environ.get("FASTPO_BACKEND", "").lower() == "triton":
        print("warning: FASTPO_BACKEND=triton on CPU runs the Triton interpreter; its times mean nothing",
              file=sys.stderr)
    impl_filter = [s.strip() for s in args.impls.split(",")] if args.impls else None
    if impl_filter and "eager" not in impl_filter:
        impl_filter.append("eager")  # the ratios need the baseline

    t_start = time.perf_counter()
    info = device_info(args.device)
    info["mode"] = "quick" if args.quick else "full"
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # progress on stderr, tables on stdout
    sections, payload_ops = [], {}
    for op in ops:
        extra = op.run_extra(args, info)
        if extra is not None:
            sections.append(("### " + op.description, "\n".join(extra)))
            payload_ops[op.name] = getattr(op, "result", None)
            continue
        records = run_op(op, args.device, args.quick, measure_memory=not args.no_memory,
                         impl_filter=impl_filter, log=log)
        sections.append(("### " + op.description, markdown_table(records, info)))
        payload_ops[op.name] = [r.to_json() for r in records]
    elapsed = time.perf_counter() - t_start
    info["loadavg_end"] = _loadavg()

    title = f"## fastpo benchmarks ({info['mode']}, {args.device})"
    out = [title, "", *header_lines(info), ""]
    for heading, body in sections:
        out += [heading, "", body, ""]
    out.append(_footnote(args.device))
    out.append(f"\n_total wall time {elapsed:.0f} s_")
    print("\n".join(out), flush=True)

    path = args.json or default_json_path(args.device, args.quick, [op.name for op in ops], bool(args.ops))
    write_json(path, {"info": info, "argv": sys.argv[1:] if argv is None else argv, "wall_s": elapsed,
                      "ops": payload_ops})
    log(f"wrote {path}")
    return 0


def default_json_path(device: str, quick: bool, ops: List[str], ops_given: bool) -> str:
    """benchmarks/results/logprobs-<device>[-quick][-<ops>].json (the directory is git-ignored)."""
    name = f"logprobs-{device}" + ("-quick" if quick else "")
    if ops_given:
        name += "-" + "+".join(ops)
    return os.path.join(REPO_ROOT, "benchmarks", "results", name + ".json")


def _footnote(device: str) -> str:
    mem = ("extra peak = torch.cuda.max_memory_allocated() during one step minus the memory allocated "
           "before it (inputs)" if device == "cuda" else
           "extra peak = peak RSS of one step in a fresh subprocess minus its RSS with the inputs built "
           "(VmHWM reset through /proc/self/clear_refs)")
    return ("time: median over repeats after warm-up, spread = min–max; speedup = eager time / impl "
            "time (>1 is faster); memory % of eager = impl extra peak / eager extra peak; "
            + mem + ". Each result was checked against eager before timing; FAILED rows got no timing."
            + (" GB/s = bytes of logits moved / median time (forward: N·V·elem read once; fwd+bwd: "
               "3·N·V·elem, read twice and the gradient written once); TFLOP/s counts the useful matmul "
               "work (2·N·D·V forward, 6·N·D·V fwd+bwd), not fastpo's recomputation."
               if device == "cuda" else ""))


if __name__ == "__main__":
    sys.exit(main())
