"""Timing, peak-memory and reporting helpers shared by every benchmark op.

An *op* (see :class:`BenchOp`) knows how to build the inputs of a case, run one implementation on
them, and check the result against eager PyTorch. This module does the rest, the same way for every
op:

* correctness first: each implementation's output is compared with a reference before any timing;
  a wrong (or crashing) implementation is reported as FAILED and gets no speed figure;
* timing: median and spread over repeats after warm-up (``time.perf_counter`` on CPU, CUDA events on
  a GPU, with the L2 cache flushed before each repeat);
* peak memory: on CUDA ``max_memory_allocated`` minus what was allocated once the inputs existed; on
  CPU the peak resident set size of a fresh subprocess that builds the inputs, resets its high-water
  mark and runs the implementation once ("extra peak" = peak RSS − RSS with the inputs alive);
* reporting: a markdown table of ratios against eager, headed by the device, versions, commit and
  date, and a JSON file with every figure.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .peers import Skip

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1024.0 * 1024.0

# Peak HBM bandwidth in GB/s (10^9 bytes/s), from the vendors' data sheets. Matched against
# torch.cuda.get_device_name() in order: the first row whose substrings all occur wins.
PEAK_BANDWIDTH_GBPS: List[Tuple[Tuple[str, ...], float]] = [
    (("GH200",), 4000.0),  # before "H200", which it contains (96 GB HBM3 variant; HBM3e: 4900)
    (("H200",), 4800.0),
    (("H100", "NVL"), 3900.0),
    (("H100", "PCIE"), 2000.0),
    (("H100",), 3350.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (("B200",), 8000.0),
    (("A100", "PCIE", "80GB"), 1935.0),
    (("A100", "80GB"), 2039.0),
    (("A100",), 1555.0),
    (("L40S",), 864.0),
    (("A10G",), 600.0),
    (("4090",), 1008.0),
]


# --------------------------------------------------------------------------------------------
# Environment description
# --------------------------------------------------------------------------------------------


def cpu_model_name() -> str:
    """The CPU model from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def total_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 1024**3


def _git(*args: str) -> Optional[str]:
    """stdout of ``git <args>`` in the repository, or None when git is missing or fails."""
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str:
    commit = (_git("rev-parse", "--short", "HEAD") or "").strip()
    if not commit:
        return "unknown"
    if (_git("status", "--porcelain", "--untracked-files=no") or "").strip():
        commit += "+dirty"
    return commit


def peak_bandwidth_gbps(device_name: str) -> Optional[float]:
    name = device_name.upper()
    for keys, gbps in PEAK_BANDWIDTH_GBPS:
        if all(k in name for k in keys):
            return gbps
    return None


def device_info(device: str) -> Dict[str, Any]:
    """Everything the report header names: device, versions, commit, date."""
    info: Dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip(),
        "fastpo_backend_env": os.environ.get("FASTPO_BACKEND", "") or "auto",
    }
    try:
        import triton  # noqa: F401

        info["triton"] = triton.__version__
    except Exception:  # triton is optional on CPU machines
        info["triton"] = "not installed"
    try:
        import fastpo

        info["fastpo"] = getattr(fastpo, "__version__", "unknown")
    except Exception as exc:
        info["fastpo"] = f"not importable ({type(exc).__name__})"
    if device == "cuda":
        idx = torch.cuda.current_device()
        name = torch.cuda.get_device_name(idx)
        props = torch.cuda.get_device_properties(idx)
        info["device_name"] = name
        info["device_memory_gib"] = round(props.total_memory / 1024**3, 1)
        info["cuda"] = torch.version.cuda
        info["peak_bandwidth_gbps"] = peak_bandwidth_gbps(name)
    else:
        info["device_name"] = cpu_model_name()
        info["cpu_count"] = os.cpu_count()
        info["torch_threads"] = torch.get_num_threads()
        info["ram_gib"] = round(total_ram_bytes() / 1024**3, 1)
    info["loadavg_start"] = _loadavg()
    return info


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def header_lines(info: Dict[str, Any]) -> List[str]:
    if info["device"] == "cuda":
        dev = f"{info['device_name']} ({info['device_memory_gib']} GiB, CUDA {info.get('cuda')})"
        if info.get("peak_bandwidth_gbps"):
            dev += f", peak HBM {info['peak_bandwidth_gbps']:.0f} GB/s"
    else:
        dev = (
            f"CPU: {info['device_name']}, {info['cpu_count']} cores visible, "
            f"{info['torch_threads']} torch threads, {info['ram_gib']} GiB RAM"
        )
    return [
        f"- device: {dev}",
        f"- torch {info['torch']}, triton {info['triton']}, python {info['python']}, "
        f"FASTPO_BACKEND={info['fastpo_backend_env']}",
        f"- commit {info['commit']}, {info['date']}",
    ] + ([f"- 1-min load average at start / end: {info['loadavg_start']} / {info.get('loadavg_end')} "
          "(anything above 0 is other work sharing the machine)"] if info.get("loadavg_start") is not None else [])


# --------------------------------------------------------------------------------------------
# The op interface
# --------------------------------------------------------------------------------------------


class BenchOp:
    """One benchmarked operation. Cases are plain JSON-able dicts (``params``) so that a CPU
    memory subprocess can rebuild exactly the same case from its description."""

    name: str = ""
    description: str = ""

    def cases(self, quick: bool, device: str) -> List[Dict[str, Any]]:
        raise NotImplementedError

    def label(self, params: Dict[str, Any]) -> str:
        raise NotImplementedError

    def impls(self, params: Dict[str, Any], device: str) -> List[str]:
        raise NotImplementedError

    def make_inputs(self, params: Dict[str, Any], device: str) -> Dict[str, Any]:
        raise NotImplementedError

    def make_step(
        self, impl: str, params: Dict[str, Any], inputs: Dict[str, Any]
    ) -> Tuple[Callable[[], Any], Callable[[], None]]:
        """(step, setup): ``step()`` runs the implementation once (forward, or forward+backward);
        ``setup()`` prepares the next call outside the timed region (clears gradients)."""
        raise NotImplementedError

    def reference(self, params: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        """Comparable outputs from eager PyTorch (memory-bounded where that matters)."""
        raise NotImplementedError

    def outputs(self, impl: str, params: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        raise NotImplementedError

    def compare(self, ref: Dict[str, Any], out: Dict[str, Any], params: Dict[str, Any], device: str) -> Tuple[bool, str]:
        raise NotImplementedError

    def tiny(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """A small case with the same dtype / mode, used to warm up a memory subprocess."""
        raise NotImplementedError

    def estimate_bytes(self, impl: str, params: Dict[str, Any]) -> int:
        """A generous estimate of the peak bytes (inputs included) of one step."""
        raise NotImplementedError

    def input_bytes(self, params: Dict[str, Any]) -> int:
        raise NotImplementedError

    def traffic(self, params: Dict[str, Any]) -> Dict[str, float]:
        """Optional: {"bytes": ...} for achieved bandwidth, {"flops": ...} for achieved FLOP/s."""
        return {}

    def baseline(self) -> str:
        return "eager"

    def case_baseline(self, params: Dict[str, Any]) -> str:
        """The implementation a case's speed-up is relative to (default: :meth:`baseline`)."""
        return self.baseline()

    def run_extra(self, args, info) -> Optional[List[str]]:
        """Ops that are not a grid of timed cases (a dedicated memory check) override this."""
        return None

    # Why this op has no ``torch.compile`` row (None: it has one).
    compile_skip: Optional[str] = None

    # Whether --quick measures CPU peak memory too. Ops on [B, T] scalars (policy, advantages,
    # DPO) move a few MiB, and each CPU measurement is a fresh Python process (seconds each):
    # their memory is measured in full mode only.
    memory_in_quick_cpu: bool = True

    def skip_reason(self, impl: str, params: Dict[str, Any], device: str) -> Optional[str]:
        """Why ``impl`` cannot run here (a peer not installed, CUDA-only, no compiler), or None."""
        from . import peers

        if impl == peers.COMPILE:
            return self.compile_skip or peers.compile_available(device)
        base = impl.split(":")[0]
        if base in peers.PEERS:
            return peers.skip_reason(base, device)
        return None

    def warm_before_memory(self, impl: str) -> bool:
        """True when one step must run on the real inputs before the memory is measured (a compiled
        implementation compiles on its first call at a new shape: that is not the step's memory)."""
        from . import peers

        return impl == peers.COMPILE

    def plot_keys(self, params: Dict[str, Any]) -> List[Tuple[str, str, float]]:
        """The plot panels a case belongs to: (panel title, x-axis label, x). Empty: not plotted."""
        return []


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass
class TimingPolicy:
    warmup: int
    min_repeats: int
    max_repeats: int
    budget_s: float  # per (impl, case): stop adding repeats past this once min_repeats are done


# The correctness check has just run each implementation once, which also warms it up.
QUICK_CPU = TimingPolicy(warmup=0, min_repeats=3, max_repeats=10, budget_s=0.5)
FULL_CPU = TimingPolicy(warmup=2, min_repeats=5, max_repeats=30, budget_s=6.0)
QUICK_CUDA = TimingPolicy(warmup=5, min_repeats=10, max_repeats=50, budget_s=1.0)
FULL_CUDA = TimingPolicy(warmup=10, min_repeats=30, max_repeats=200, budget_s=3.0)


def summarize(times_s: Sequence[float]) -> Dict[str, Any]:
    ms = sorted(t * 1e3 for t in times_s)
    if len(ms) >= 4:
        q = statistics.quantiles(ms, n=4)
        q25, q75 = q[0], q[2]
    else:
        q25, q75 = ms[0], ms[-1]
    return {
        "median_ms": statistics.median(ms),
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "q25_ms": q25,
        "q75_ms": q75,
        "repeats": len(ms),
        "all_ms": [round(t, 4) for t in ms],
    }


def time_interleaved(
    steps: Dict[str, Tuple[Callable[[], Any], Callable[[], None]]], device: str, policy: TimingPolicy
) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, BaseException]]:
    """Times several implementations of one case round-robin (A, B, C, A, B, C, ...), so that a
    slow phase of a shared machine hits all of them alike. Returns (summaries, failures).

    Rounds continue until ``min_repeats`` are done and the rounds have taken ``budget_s`` per
    implementation, or ``max_repeats`` rounds. On CUDA each repeat is timed with CUDA events after
    writing a buffer larger than any L2 cache (as ``triton.testing.do_bench`` does)."""
    cuda = device == "cuda"
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda") if cuda else None
    alive = dict(steps)
    failures: Dict[str, BaseException] = {}
    samples: Dict[str, List[float]] = {name: [] for name in steps}

    def run_one(name: str, timed: bool) -> None:
        step, setup = alive[name]
        try:
            setup()
            if not timed:
                step()
                return
            if cuda:
                flush.zero_()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                step()
                samples[name].append(time.perf_counter() - t0)
        except Exception as exc:
            failures[name] = exc
            del alive[name]

    for _ in range(policy.warmup):
        for name in list(alive):
            run_one(name, timed=False)
    if cuda:
        torch.cuda.synchronize()
    rounds, spent = 0, 0.0
    while alive and rounds < policy.max_repeats:
        t_round = time.perf_counter()
        for name in list(alive):
            run_one(name, timed=True)
        spent += time.perf_counter() - t_round
        rounds += 1
        if rounds >= policy.min_repeats and spent >= policy.budget_s * max(1, len(alive)):
            break
    del flush
    return {name: summarize(samples[name]) for name in alive}, failures


# --------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------


def cuda_extra_peak(step, setup) -> Dict[str, Any]:
    """Extra peak allocated bytes of one ``step()`` on top of what is allocated before it."""
    setup()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"extra_peak_mib": (peak - base) / MIB, "method": "cuda max_memory_allocated"}


def _proc_status_kib() -> Dict[str, int]:
    out: Dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, val = line.split(":", 1)
                    out[key] = int(val.split()[0])
    except OSError:
        pass
    return out


def _reset_rss_high_water_mark() -> bool:
    """Linux >= 4.0: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _ru_maxrss_kib() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB on Linux


def measure_cpu_rss_here(op: BenchOp, impl: str, params: Dict[str, Any]) -> Dict[str, Any]:
    """Runs in the memory subprocess: warm up on a tiny case (imports, extension loading, thread
    pools), build the real inputs, then measure the peak RSS of exactly one step."""
    if op.warm_before_memory(impl):
        inputs = op.make_inputs(params, "cpu")
        step, setup = op.make_step(impl, params, inputs)
        setup()
        step()  # compiles at this shape
    else:
        tiny = op.tiny(params)
        t_inputs = op.make_inputs(tiny, "cpu")
        step, setup = op.make_step(impl, tiny, t_inputs)
        setup()
        step()
        del step, setup, t_inputs
        inputs = op.make_inputs(params, "cpu")
        step, setup = op.make_step(impl, params, inputs)
    setup()
    _release_free_heap()
    before = _proc_status_kib()
    ru_before = _ru_maxrss_kib()
    reset_ok = _reset_rss_high_water_mark()
    base_kib = _proc_status_kib().get("VmRSS", before.get("VmRSS", 0))
    t0 = time.perf_counter()
    step()
    elapsed = time.perf_counter() - t0
    after = _proc_status_kib()
    ru_after = _ru_maxrss_kib()
    if reset_ok and "VmHWM" in after:
        peak_kib, method = after["VmHWM"], "VmHWM after clear_refs reset"
        exact = True
    else:
        # getrusage's peak cannot be reset: it is exact only when the step raised it.
        peak_kib, method = ru_after, "ru_maxrss"
        exact = ru_after > ru_before
    return {
        "extra_peak_mib": max(0, peak_kib - base_kib) / 1024.0,
        "ru_maxrss_extra_mib": max(0, ru_after - base_kib) / 1024.0,
        "ru_maxrss_before_mib": ru_before / 1024.0,
        "baseline_rss_mib": base_kib / 1024.0,
        "peak_rss_mib": peak_kib / 1024.0,
        "method": method,
        "exact": exact,
        "step_s": elapsed,
    }


def _memchild_command(op: BenchOp, impl: str, params: Dict[str, Any]):
    spec = json.dumps({"op": op.name, "impl": impl, "params": params})
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return [sys.executable, "-m", "benchmarks._memchild", spec], env


def _parse_memchild(returncode: int, stdout: str, stderr: str) -> Dict[str, Any]:
    for line in stdout.splitlines()[::-1]:
        if line.startswith("MEMRESULT "):
            return json.loads(line[len("MEMRESULT "):])
    tail = (stderr or stdout).strip().splitlines()[-3:]
    return {"error": f"memory subprocess exited {returncode}: " + " | ".join(tail)}


def cpu_extra_peak_subprocess(op: BenchOp, impl: str, params: Dict[str, Any], timeout_s: float = 1800.0) -> Dict[str, Any]:
    """Peak RSS of one step measured in a fresh Python process (see ``benchmarks._memchild``)."""
    cmd, env = _memchild_command(op, impl, params)
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"memory subprocess timed out after {timeout_s:.0f}s"}
    return _parse_memchild(proc.returncode, proc.stdout, proc.stderr)


def cpu_extra_peak_many(
    jobs: Sequence[Tuple[BenchOp, str, Dict[str, Any], int]],
    ram_budget: int,
    max_parallel: Optional[int] = None,
    timeout_s: float = 1800.0,
) -> List[Dict[str, Any]]:
    """Runs several memory subprocesses side by side (``jobs``: (op, impl, params, estimated
    bytes)). Each child still measures only itself, so running them together changes no figure;
    they only share the RAM budget: a child starts when its estimate fits next to the running ones."""
    if max_parallel is None:
        max_parallel = max(1, min(4, os.cpu_count() or 1))
    results: List[Optional[Dict[str, Any]]] = [None] * len(jobs)
    pending = list(range(len(jobs)))
    running: Dict[int, Tuple[subprocess.Popen, float, int]] = {}
    while pending or running:
        used = sum(est for _, _, est in running.values())
        for i in list(pending):
            if len(running) >= max_parallel:
                break
            est = jobs[i][3]
            if running and used + est > ram_budget:
                continue
            op, impl, params, _ = jobs[i]
            cmd, env = _memchild_command(op, impl, params)
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            running[i] = (proc, time.perf_counter(), est)
            used += est
            pending.remove(i)
        time.sleep(0.05)
        for i, (proc, t0, _) in list(running.items()):
            if proc.poll() is not None:
                out, err = proc.communicate()
                results[i] = _parse_memchild(proc.returncode, out, err)
                del running[i]
            elif time.perf_counter() - t0 > timeout_s:
                proc.kill()
                proc.communicate()
                results[i] = {"error": f"memory subprocess timed out after {timeout_s:.0f}s"}
                del running[i]
    return [r if r is not None else {"error": "not run"} for r in results]


def memory_budget_bytes(device: str) -> int:
    """~70% of RAM (CPU) or 85% of device memory (CUDA): cases estimated above it are skipped."""
    if device == "cuda":
        return int(0.85 * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return int(0.70 * total_ram_bytes())


# --------------------------------------------------------------------------------------------
# Running an op's cases
# --------------------------------------------------------------------------------------------


@dataclass
class Record:
    op: str
    case: str
    params: Dict[str, Any]
    impl: str
    status: str = "ok"  # ok | FAILED | skipped (peer missing, CUDA-only, memory, compile failed)
    detail: str = ""
    timing: Optional[Dict[str, Any]] = None
    memory: Optional[Dict[str, Any]] = None
    check: str = ""
    derived: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {
            "op": self.op,
            "case": self.case,
            "params": self.params,
            "impl": self.impl,
            "status": self.status,
            "detail": self.detail,
            "check": self.check,
            "timing": self.timing,
            "memory": self.memory,
            **self.derived,
        }


def _short_error(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:160]


def run_op(
    op: BenchOp,
    device: str,
    quick: bool,
    measure_memory: bool = True,
    impl_filter: Optional[Sequence[str]] = None,
    log: Callable[[str], None] = print,
    progress: Optional[Callable[[str], None]] = None,
    max_cases: Optional[int] = None,
) -> List[Record]:
    """Check, time and measure every (case, implementation) of ``op``.

    CPU peak memory is measured after all timings, in subprocesses that may run side by side
    (nothing is timed while they run)."""
    if device == "cuda":
        policy = QUICK_CUDA if quick else FULL_CUDA
    else:
        policy = QUICK_CPU if quick else FULL_CPU
    budget = memory_budget_bytes(device)
    cases: List[Tuple[Dict[str, Any], Dict[str, Record]]] = []
    mem_jobs: List[Tuple[Record, Tuple[BenchOp, str, Dict[str, Any], int]]] = []
    for params in op.cases(quick, device)[:max_cases]:
        label = op.label(params)
        impls = [i for i in op.impls(params, device) if not impl_filter or i in impl_filter]
        case_records: Dict[str, Record] = {}
        cases.append((params, case_records))
        runnable: List[str] = []
        for impl in impls:
            rec = Record(op.name, label, params, impl)
            case_records[impl] = rec
            why = op.skip_reason(impl, params, device)
            est = op.estimate_bytes(impl, params)
            if why:
                rec.status, rec.detail = "skipped", why
            elif est > budget:
                rec.status = "skipped"
                rec.detail = f"needs ~{est / 1024**3:.1f} GiB > budget {budget / 1024**3:.1f} GiB"
            else:
                runnable.append(impl)
        if progress is not None:
            progress(f"{op.name}: {label}")
        if not runnable:
            log(f"[{op.name}] {label}: nothing runnable (memory / peers)")
            continue

        log(f"[{op.name}] {label}")
        inputs = op.make_inputs(params, device)
        try:
            ref = op.reference(params, inputs)
        except Exception as exc:  # the reference itself cannot run: report, do not time
            for impl in runnable:
                case_records[impl].status = "FAILED"
                case_records[impl].detail = "reference failed: " + _short_error(exc)
            del inputs
            continue
        passing: List[str] = []
        for impl in runnable:
            rec = case_records[impl]
            try:
                out = op.outputs(impl, params, inputs)
                ok, msg = op.compare(ref, out, params, device)
                del out
            except Skip as exc:
                rec.status, rec.detail = "skipped", str(exc)[:200]
                log(f"    {impl:<16} skipped ({rec.detail})")
                continue
            except NotImplementedError as exc:
                rec.status, rec.detail = "skipped", _short_error(exc)
                log(f"    {impl:<16} skipped ({rec.detail})")
                continue
            except Exception as exc:
                rec.status, rec.detail = "FAILED", _short_error(exc)
                log(f"    {impl:<16} FAILED ({rec.detail})")
                continue
            rec.check = msg
            if not ok:
                rec.status, rec.detail = "FAILED", "wrong result: " + msg
                log(f"    {impl:<16} FAILED (wrong result: {msg})")
                continue
            passing.append(impl)
        steps = {impl: op.make_step(impl, params, inputs) for impl in passing}
        summaries, failures = time_interleaved(steps, device, policy)
        for impl in passing:
            rec = case_records[impl]
            if impl in failures:
                rec.status, rec.detail = "FAILED", _short_error(failures[impl])
                log(f"    {impl:<16} FAILED while timing ({rec.detail})")
                continue
            rec.timing = t = summaries[impl]
            log(f"    {impl:<16} {t['median_ms']:10.2f} ms  [{t['min_ms']:.2f} .. {t['max_ms']:.2f}]"
                f"  n={t['repeats']}  ({rec.check})")
            if measure_memory and device == "cuda":
                try:
                    rec.memory = cuda_extra_peak(*steps[impl])
                except Exception as exc:
                    rec.detail = "memory: " + _short_error(exc)
            if measure_memory and device == "cpu" and (op.memory_in_quick_cpu or not quick):
                mem_jobs.append((rec, (op, impl, params, op.estimate_bytes(impl, params))))
        for _, setup in steps.values():
            setup()
        del steps
        del inputs, ref
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    if mem_jobs:
        log(f"[{op.name}] peak RSS of {len(mem_jobs)} (case, impl) pairs, one fresh subprocess each")
        results = cpu_extra_peak_many([job for _, job in mem_jobs], budget)
        for (rec, _), res in zip(mem_jobs, results):
            if "error" in res:
                rec.detail = (rec.detail + "; " if rec.detail else "") + res["error"]
                log(f"    {rec.case} / {rec.impl}: memory {res['error']}")
            else:
                rec.memory = res

    records: List[Record] = []
    for params, case_records in cases:
        _derive(op, params, device, case_records)
        records.extend(case_records.values())
    return records


def _derive(op: BenchOp, params: Dict[str, Any], device: str, recs: Dict[str, Record]) -> None:
    base = recs.get(op.case_baseline(params))
    base_t = base.timing["median_ms"] if base is not None and base.status == "ok" and base.timing else None
    base_m = base.memory["extra_peak_mib"] if base is not None and base.status == "ok" and base.memory else None
    traffic = op.traffic(params)
    for rec in recs.values():
        if rec.status != "ok" or not rec.timing:
            continue
        t = rec.timing["median_ms"]
        if base_t:
            rec.derived["speedup_vs_eager"] = base_t / t
        if rec.memory and base_m:
            rec.derived["memory_vs_eager"] = rec.memory["extra_peak_mib"] / base_m
        if "bytes" in traffic:
            rec.derived["gbps"] = traffic["bytes"] / (t * 1e-3) / 1e9
        if "flops" in traffic:
            rec.derived["tflops"] = traffic["flops"] / (t * 1e-3) / 1e12


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _fmt_ratio(x: Optional[float]) -> str:
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:.0f}×"
    if x >= 10:
        return f"{x:.1f}×"
    return f"{x:.2f}×"


def _fmt_pct(x: Optional[float]) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.2f}%" if x < 0.01 else f"{100 * x:.1f}%"


def markdown_table(records: List[Record], info: Dict[str, Any]) -> str:
    cuda = info["device"] == "cuda"
    peak_bw = info.get("peak_bandwidth_gbps")
    cols = ["case", "impl", "time ms (median)", "spread (min–max)", "speedup vs eager", "extra peak MiB", "memory % of eager"]
    has_bw = cuda and any("gbps" in r.derived for r in records)
    has_fl = cuda and any("tflops" in r.derived for r in records)
    if has_bw:
        cols += ["GB/s" + (" (% peak)" if peak_bw else "")]
    if has_fl:
        cols += ["TFLOP/s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|"]
    prev_case = None
    for r in records:
        case = r.case if r.case != prev_case else ""
        prev_case = r.case
        if r.status != "ok":
            what = r.status if r.status != "FAILED" else "**FAILED**"
            cells = [case, r.impl, what, (r.detail[:110] or "").replace("|", "/"), "", "", ""]
        else:
            t = r.timing
            mem = "–"
            if r.memory:
                mem = f"{r.memory['extra_peak_mib']:.1f}"
            cells = [
                case,
                r.impl,
                f"{t['median_ms']:.2f}",
                f"{t['min_ms']:.2f}–{t['max_ms']:.2f}",
                _fmt_ratio(r.derived.get("speedup_vs_eager")),
                mem,
                _fmt_pct(r.derived.get("memory_vs_eager")),
            ]
        if has_bw:
            g = r.derived.get("gbps")
            cells.append("–" if g is None else (f"{g:.0f} ({100 * g / peak_bw:.0f}%)" if peak_bw else f"{g:.0f}"))
        if has_fl:
            f_ = r.derived.get("tflops")
            cells.append("–" if f_ is None else f"{f_:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str, payload: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def default(o):
        if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
            return str(o)
        return str(o)

    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=default)
