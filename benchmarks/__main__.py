"""``python -m benchmarks``: run the registered benchmark ops and print markdown tables.

Examples::

    python -m benchmarks --quick                     # ~3 min on a 2-core CPU (mostly torch.compile)
    python -m benchmarks --quick --threads 1         # on a CPU shared with other work
    python -m benchmarks                             # full sizes (+ the linear memory check)
    python -m benchmarks --ops linear-memory         # only the CPU memory check
    python -m benchmarks --device cuda --json out.json
    fastpo bench --quick                             # the same, from the console script

Prints markdown tables on stdout (progress on stderr), writes every figure to a JSON file and PNG
plots (time and extra peak memory against the swept size, one line per implementation) next to it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

import torch

from . import DEFAULT_OPS_FULL, DEFAULT_OPS_QUICK, get_op, op_names, peers
from .harness import REPO_ROOT, BenchOp, _loadavg, device_info, header_lines, markdown_table, run_op, write_json
from .plots import plot_run


def build_parser() -> argparse.ArgumentParser:
    prog = "fastpo bench" if os.path.basename(sys.argv[0] or "") == "fastpo" else "python -m benchmarks"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (~3 min on a 2-core CPU, most of it torch.compile)")
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
                    help="where to write every figure (default: benchmarks/results/bench-<device>[-quick][-<ops>].json)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="CPU: torch intra-op threads, also in the memory subprocesses (default: torch's). "
                         "On a machine shared with other work, 1 avoids OpenMP regions that stall on a "
                         "descheduled thread (milliseconds per small op)")
    ap.add_argument("--max-cases", type=int, default=None, metavar="K",
                    help="run only the first (smallest) K cases of each op (a smoke test)")
    ap.add_argument("--plots", default=None, metavar="DIR",
                    help="where to write the PNG plots (default: <json path without .json>-plots/)")
    ap.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr (log lines only)")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_cases is not None and args.max_cases < 1:
        parser.print_usage(sys.stderr)
        print(f"fastpo bench: error: --max-cases must be >= 1, got {args.max_cases}", file=sys.stderr)
        return 2
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

    if args.threads is not None:
        if args.threads < 1:
            print("--threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the memory subprocesses
    t_start = time.perf_counter()
    info = device_info(args.device)
    info["mode"] = "quick" if args.quick else "full"
    info["peers"] = peers.status(args.device)
    bar = _progress_bar(ops, args)
    # progress on stderr (a bar when stderr is a terminal, plus log lines), tables on stdout
    log = (lambda msg: bar.write(msg, file=sys.stderr)) if bar is not None else \
        (lambda msg: print(msg, file=sys.stderr, flush=True))

    def progress(what: str) -> None:
        if bar is not None:
            bar.set_postfix_str(what[:60])
            bar.update(1)

    sections, payload_ops, ops_records = [], {}, []
    try:
        for op in ops:
            extra = op.run_extra(args, info)
            if extra is not None:
                sections.append(("### " + op.description, "\n".join(extra)))
                payload_ops[op.name] = getattr(op, "result", None)
                continue
            records = run_op(op, args.device, args.quick, measure_memory=not args.no_memory,
                             impl_filter=impl_filter, log=log, progress=progress, max_cases=args.max_cases)
            sections.append(("### " + op.description, markdown_table(records, info)))
            payload_ops[op.name] = [r.to_json() for r in records]
            ops_records.append((op, records))
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t_start
    info["loadavg_end"] = _loadavg()

    path = args.json or default_json_path(args.device, args.quick, [op.name for op in ops], bool(args.ops))
    plot_paths, plot_note = [], "disabled (--no-plots)"
    if not args.no_plots:
        plot_dir = args.plots or os.path.splitext(path)[0] + "-plots"
        plot_paths, plot_note = plot_run(ops_records, info, plot_dir)

    title = f"## fastpo benchmarks ({info['mode']}, {args.device})"
    out = [title, "", *header_lines(info), _peers_line(info["peers"]), ""]
    for heading, body in sections:
        out += [heading, "", body, ""]
    out.append(_footnote(args.device, args.quick))
    out.append(f"\n_total wall time {elapsed:.0f} s_")
    print("\n".join(out), flush=True)

    write_json(path, {"info": info, "argv": sys.argv[1:] if argv is None else argv, "wall_s": elapsed,
                      "plots": plot_paths, "ops": payload_ops})
    log(f"wrote {path}")
    if plot_paths:
        log("wrote plots: " + ", ".join(plot_paths))
    elif plot_note:
        log(f"plots skipped: {plot_note}")
    return 0


def _progress_bar(ops, args):
    """A tqdm bar over the cases of the run on stderr (None without tqdm, with --no-progress, or
    when stderr is not a terminal: then the log lines are the progress)."""
    if args.no_progress or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    total = 0
    for op in ops:
        if type(op).run_extra is not BenchOp.run_extra:  # a dedicated check, not a grid of cases
            continue
        total += len(op.cases(args.quick, args.device)[:args.max_cases])
    return tqdm(total=total, desc="fastpo bench", unit="case", file=sys.stderr, dynamic_ncols=True)


def _peers_line(status) -> str:
    have = [f"{s['dist']} {s['version']}" for n, s in status.items() if s["available"]]
    # one line per distribution (liger-kernel backs two peers)
    missing = {}
    for name, s in status.items():
        if not s["available"]:
            missing.setdefault(name, s["reason"])
    parts = ["- peers: " + (", ".join(dict.fromkeys(have)) or "none installed")]
    if missing:
        parts.append("; skipped: " + "; ".join(f"{n} ({why})" for n, why in missing.items()))
    return "".join(parts)


def default_json_path(device: str, quick: bool, ops: List[str], ops_given: bool) -> str:
    """benchmarks/results/bench-<device>[-quick][-<ops>].json (the directory is git-ignored)."""
    name = f"bench-{device}" + ("-quick" if quick else "")
    if ops_given:
        name += "-" + "+".join(ops)
    return os.path.join(REPO_ROOT, "benchmarks", "results", name + ".json")


def _footnote(device: str, quick: bool) -> str:
    mem = ("extra peak = torch.cuda.max_memory_allocated() during one step minus the memory allocated "
           "before it (inputs)" if device == "cuda" else
           "extra peak = peak RSS of one step in a fresh subprocess minus its RSS with the inputs built "
           "(VmHWM reset through /proc/self/clear_refs)")
    return (("memory is measured in full mode only for the policy, advantage and DPO ops on CPU "
             "(a few MiB of [B, T] tensors; each measurement is a fresh process). " if device == "cpu" and quick else "")
            + "time: median over repeats after warm-up, spread = min–max; speedup = eager time / impl "
            "time (>1 is faster); memory % of eager = impl extra peak / eager extra peak; "
            + mem + ". Each result was checked against eager before timing; FAILED rows got no timing; "
            "skipped rows say why (peer not installed, CUDA only, not applicable)."
            + (" GB/s = bytes of logits moved / median time (forward: N·V·elem read once; fwd+bwd: "
               "3·N·V·elem, read twice and the gradient written once); TFLOP/s counts the useful matmul "
               "work (2·N·D·V forward, 6·N·D·V fwd+bwd), not fastpo's recomputation."
               if device == "cuda" else ""))


if __name__ == "__main__":
    sys.exit(main())
