"""PNG plots of a run: per op, time and extra peak memory against the swept size (vocabulary size,
token count), one line per implementation. Uses matplotlib's Agg backend (no display needed);
without matplotlib the run still prints its tables and writes its JSON, and says the plots were
skipped."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

# One colour and marker per implementation, stable across plots.
_STYLE = {
    "eager": ("#444444", "o"),
    "torch.compile": ("#1f77b4", "s"),
    "fastpo": ("#d62728", "D"),
    "fastpo-inplace": ("#ff7f0e", "D"),
    "trl": ("#2ca02c", "^"),
    "verl": ("#9467bd", "v"),
    "liger": ("#8c564b", "P"),
    "liger-triton": ("#e377c2", "P"),
    "cce": ("#17becf", "X"),
    "flash-attn": ("#bcbd22", "X"),
}


def _style(impl: str, k: int) -> Tuple[str, str]:
    if impl in _STYLE:
        return _STYLE[impl]
    base = impl.split(":")[0].split("-")[0]
    if base in _STYLE:
        return _STYLE[base][0], "*"
    return f"C{k % 10}", "*"


def collect_panels(op, records) -> Dict[str, Dict[str, Any]]:
    """{panel title: {"xlabel": ..., "series": {impl: [(x, median ms, extra peak MiB or None)]}}}
    from the records of one op that were timed (FAILED / skipped rows are not plotted)."""
    panels: Dict[str, Dict[str, Any]] = {}
    first_panel: Dict[str, str] = {}  # panel title -> "yes" when it is some case's first panel
    for r in records:
        if r.status != "ok" or not r.timing:
            continue
        for k, (title, xlabel, x) in enumerate(op.plot_keys(r.params)):
            if k == 0:
                first_panel[title] = "yes"
            panel = panels.setdefault(title, {"xlabel": xlabel, "series": defaultdict(list)})
            mem = r.memory["extra_peak_mib"] if r.memory and "extra_peak_mib" in r.memory else None
            panel["series"][r.impl].append((x, r.timing["median_ms"], mem))
    for panel in panels.values():
        for pts in panel["series"].values():
            pts.sort()
    # A case belongs to several sweeps (vocabulary, tokens); keep the panels that sweep something,
    # or every panel when none does (a run of a single size per op).
    swept = {t: p for t, p in panels.items()
             if len({x for pts in p["series"].values() for x, _, _ in pts}) >= 2}
    return swept or {t: p for t, p in panels.items() if t in first_panel}


def plot_op(op, records, info: Dict[str, Any], out_dir: str) -> Optional[str]:
    """One PNG for the op (a row of [time, memory] axes per panel); None when nothing to plot."""
    panels = collect_panels(op, records)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    titles = list(panels)
    fig, axes = plt.subplots(len(titles), 2, figsize=(10, 3.0 * len(titles) + 0.6), squeeze=False)
    for row, title in enumerate(titles):
        panel = panels[title]
        ax_t, ax_m = axes[row]
        any_mem = False
        for k, (impl, pts) in enumerate(sorted(panel["series"].items())):
            color, marker = _style(impl, k)
            xs = [p[0] for p in pts]
            ax_t.plot(xs, [p[1] for p in pts], marker=marker, color=color, label=impl)
            mem = [(p[0], p[2]) for p in pts if p[2] is not None]
            if mem:
                any_mem = True
                # extra peak can be ~0 MiB: floor it so that a log axis can show it
                ax_m.plot([m[0] for m in mem], [max(m[1], 0.01) for m in mem], marker=marker, color=color, label=impl)
        for ax, ylabel in ((ax_t, "time, ms (median)"), (ax_m, "extra peak memory, MiB")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(panel["xlabel"])
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_title(title, fontsize=9, loc="left")
        ax_m.set_title("extra peak memory" if any_mem else "memory not measured", fontsize=9, loc="left")
        ax_t.legend(fontsize=7)
    dev = info.get("device_name", info.get("device", ""))
    fig.suptitle(f"{op.description}\n{dev} · {info.get('mode', '')} · commit {info.get('commit', '?')} · "
                 f"{info.get('date', '')}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / fig.get_figheight()))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{op.name}-{info['device']}.png")
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def plot_run(ops_records: Sequence[Tuple[Any, List[Any]]], info: Dict[str, Any], out_dir: str) -> Tuple[List[str], str]:
    """Plots every op; returns (paths, "" or why plotting was skipped)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], "matplotlib not installed (pip install matplotlib, or pip install -e .[bench])"
    paths = []
    for op, records in ops_records:
        path = plot_op(op, records, info, out_dir)
        if path:
            paths.append(path)
    return paths, ""


class _Rec:
    """A record as read back from a run's JSON (what :func:`plot_op` reads of it)."""

    def __init__(self, d: Dict[str, Any]):
        self.params, self.impl, self.status = d["params"], d["impl"], d["status"]
        self.timing, self.memory = d.get("timing"), d.get("memory")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m benchmarks.plots RUN.json [OUT_DIR]``: redraw a finished run's plots."""
    import json
    import sys

    from . import OPS

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(main.__doc__, file=sys.stderr)
        return 2
    with open(args[0]) as f:
        payload = json.load(f)
    out_dir = args[1] if len(args) > 1 else os.path.splitext(args[0])[0] + "-plots"
    pairs = [(OPS[name], [_Rec(d) for d in recs]) for name, recs in payload["ops"].items()
             if name in OPS and isinstance(recs, list)]
    paths, why = plot_run(pairs, payload["info"], out_dir)
    print("\n".join(paths) if paths else f"nothing plotted {why}".strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
