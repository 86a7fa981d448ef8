"""Step time and peak memory of the bundled trainer (``fastpo train``) per forward layout and memory setting.

``python -m benchmarks.trainer [--steps 6] [--warmup 2] [--rounds 2] [--threads 2] [--json PATH]``

GRPO on the multi-token built-in task (``--task countdown``, ``--max-new-tokens 16``) with the built-in
tiny model (2 layers, hidden 128; built and cached on first use), the default 16 prompts x 8 samples,
for every combination of padded vs ``--padding-free``, ``--micro-batch-size`` 4 and 16,
``--gradient-checkpointing`` off and on, and full fine-tuning vs ``--lora-rank 8``. Each configuration
runs in its own subprocess (so one's allocator state and peak do not leak into the next): ``--warmup``
steps, then ``--steps`` timed ones; ``--rounds`` passes over all configurations, interleaved, and the
median over every timed step of every round is reported. Columns:

- ``step s``: the whole step (rollout with ``generate``, old-policy/reference scoring, update);
- ``update s``: the optimiser pass alone (every micro-batch's forward and backward, the AdamW step);
- ``update peak MiB``: the process RSS high-water mark during the update above the RSS before it
  (``/proc/self/clear_refs`` reset; the largest over the timed steps);
- ``padding``: the share of the padded forward's token positions that are padding (what packing skips).

``--padding-only`` instead prints that share on both built-in tasks (their default ``--max-new-tokens``)
with and without micro-batches, from rollouts of the warm-started tiny model."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

CONFIGS = [dict(padding_free=pf, micro_batch_size=mb, gradient_checkpointing=gc, lora_rank=lora)
           for lora, gc, mb, pf in itertools.product((0, 8), (False, True), (16, 4), (False, True))]
TASK_FLAGS = {"arithmetic": ["--task", "arithmetic", "--max-new-tokens", "8"],
              "countdown": ["--task", "countdown", "--max-new-tokens", "16"]}


def trainer_flags(config: Dict[str, Any], out_dir: str, steps: int, seed: int) -> List[str]:
    flags = [*TASK_FLAGS["countdown"], "--max-steps", str(steps), "--save-every", "0", "--no-progress",
             "--seed", str(seed), "--output-dir", out_dir, "--micro-batch-size", str(config["micro_batch_size"]),
             "--padding-free" if config["padding_free"] else "--no-padding-free"]
    if config["gradient_checkpointing"]:
        flags.append("--gradient-checkpointing")
    if config["lora_rank"]:
        flags += ["--lora-rank", str(config["lora_rank"])]
    return flags


def run_child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """In the subprocess: build the trainer, run warm-up and timed steps, measure each update's peak."""
    import torch

    from fastpo.trainer.cli import parse_config
    from fastpo.trainer.loop import Trainer

    from .harness import _proc_status_kib, _release_free_heap, _reset_rss_high_water_mark

    torch.set_num_threads(spec["threads"])
    total = spec["warmup"] + spec["steps"]
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(parse_config(trainer_flags(spec["config"], out, total, spec["seed"])), log=lambda *a: None)
        steps = []
        for step in range(1, total + 1):
            collected = trainer._experience(step)
            _release_free_heap()
            before = _proc_status_kib().get("VmRSS", 0)
            reset = _reset_rss_high_water_mark()
            record, updated = trainer._update(step, *collected)
            peak = _proc_status_kib().get("VmHWM", 0) if reset else 0
            if step > spec["warmup"]:
                steps.append({"step_s": record["step_time_s"], "update_s": record["update_s"],
                              "peak_mib": max(0, peak - before) / 1024 if reset else None,
                              "padding_frac": record["padding_frac"], "updated": updated})
        trainer.close()
    return {"steps": steps}


def measure(config: Dict[str, Any], args, seed: int) -> Dict[str, Any]:
    spec = {"config": config, "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "seed": seed}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.trainer", "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"configuration {config} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def label(config: Dict[str, Any]) -> List[str]:
    return ["packed" if config["padding_free"] else "padded", str(config["micro_batch_size"]),
            "on" if config["gradient_checkpointing"] else "off",
            f"LoRA r{config['lora_rank']}" if config["lora_rank"] else "full"]


def benchmark(args) -> Dict[str, Any]:
    results: Dict[int, List[Dict[str, Any]]] = {i: [] for i in range(len(CONFIGS))}
    for r in range(args.rounds):
        order = range(len(CONFIGS)) if r % 2 == 0 else reversed(range(len(CONFIGS)))
        for i in order:
            t0 = time.perf_counter()
            results[i] += measure(CONFIGS[i], args, seed=args.seed)["steps"]
            print(f"round {r + 1}/{args.rounds}: {' '.join(label(CONFIGS[i]))} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    rows = []
    for i, config in enumerate(CONFIGS):
        steps = results[i]
        peaks = [s["peak_mib"] for s in steps if s["peak_mib"] is not None]
        rows.append({**config, "step_s": statistics.median(s["step_s"] for s in steps),
                     "update_s": statistics.median(s["update_s"] for s in steps),
                     "peak_mib": max(peaks) if peaks else None,
                     "padding_frac": statistics.mean(s["padding_frac"] for s in steps),
                     "skipped": sum(not s["updated"] for s in steps)})
    return {"rows": rows}


def markdown(rows: List[Dict[str, Any]]) -> str:
    """One line per configuration; the packed lines also give update time and peak as a ratio to the padded
    line of the same micro-batch / checkpointing / LoRA setting."""
    key = lambda r: (r["micro_batch_size"], r["gradient_checkpointing"], r["lora_rank"])
    padded = {key(r): r for r in rows if not r["padding_free"]}
    out = ["| forward | micro-batch | grad. ckpt | fine-tuning | step s | update s | update peak MiB | padding "
           "| packed/padded update time | packed/padded peak |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = padded[key(r)]
        ratio_t = f"{r['update_s'] / base['update_s']:.2f}x" if r["padding_free"] else ""
        ratio_m = (f"{r['peak_mib'] / base['peak_mib']:.2f}x" if r["padding_free"] and r["peak_mib"] and base["peak_mib"]
                   else "")
        peak = f"{r['peak_mib']:.1f}" if r["peak_mib"] is not None else "n/a"
        out.append(f"| {' | '.join(label(r))} | {r['step_s']:.3f} | {r['update_s']:.3f} | {peak} | "
                   f"{r['padding_frac']:.0%} | {ratio_t} | {ratio_m} |")
    return "\n".join(out)


def padding_report(args) -> str:
    """The padded share of the forward's positions on each built-in task, micro-batches none / 16 / 4."""
    import torch

    from fastpo.trainer.cli import parse_config
    from fastpo.trainer.loop import Trainer
    from fastpo.trainer.packing import padding_fraction

    torch.set_num_threads(args.threads)
    out = ["| task | --max-new-tokens | mean response / longest | whole batch | micro-batch 16 | micro-batch 4 |",
           "|---|---|---|---|---|---|"]
    for task, flags in TASK_FLAGS.items():
        with tempfile.TemporaryDirectory() as d:
            trainer = Trainer(parse_config([*flags, "--no-progress", "--output-dir", d, "--seed", str(args.seed)]),
                              log=lambda *a: None)
            fractions = {None: [], 16: [], 4: []}
            lengths = []
            for step in range(1, args.padding_steps + 1):
                with torch.no_grad():
                    batch = trainer.algo.token_batch(trainer.rollout.generate(
                        trainer.algo.prompt_texts(trainer.prompts.sample(16, trainer.rng_for(step))),
                        trainer.algo.sampling(step, n=8)))
                for mb in fractions:
                    fractions[mb].append(padding_fraction(batch.attention_mask, mb))
                lengths.append((float(batch.lengths.float().mean()), int(batch.lengths.max())))
            trainer.close()
        mean = lambda xs: sum(xs) / len(xs)
        resp = f"{mean([a for a, _ in lengths]):.1f} / {max(b for _, b in lengths)}"
        out.append(f"| {task} | {flags[-1]} | {resp} | " + " | ".join(f"{mean(v):.0%}" for v in fractions.values()) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.trainer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=2, help="passes over all configurations (alternating order)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--padding-only", action="store_true", help="only the padding share of the built-in tasks")
    ap.add_argument("--padding-steps", type=int, default=20, help="rollouts per task for --padding-only")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    from .harness import _loadavg, device_info, header_lines

    import torch

    torch.set_num_threads(args.threads)
    header = header_lines(device_info("cpu"))
    if args.padding_only:
        print("\n".join(header) + "\n\n" + padding_report(args))
        return 0
    load_before = _loadavg()
    result = benchmark(args)
    print("\n".join(header))
    print(f"load average before / after: {load_before} / {_loadavg()}; GRPO, --task countdown, --max-new-tokens 16, "
          f"16 prompts x 8 samples, tiny model; medians of {args.rounds} x {args.steps} steps after {args.warmup} "
          "warm-up steps\n")
    print(markdown(result["rows"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, **result}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
