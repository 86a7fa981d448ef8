"""Where a run's numbers go: ``metrics.jsonl`` (one object per step), a progress bar, a PNG of the
reward curve, and optionally TensorBoard. Only the main process reports."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .errors import UserInputError

# Always present in every metrics.jsonl line (None -> JSON null where an algorithm has no such thing).
REQUIRED_KEYS = ("step", "reward_mean", "loss", "kl", "clip_frac", "entropy", "tokens_per_s")
# Wall-clock figures of a step: they differ between otherwise identical runs (resume comparisons skip them).
TIMING_KEYS = ("tokens_per_s", "step_time_s", "experience_s", "update_s", "sync_s", "eval_s")
# What a run writes into --output-dir besides its checkpoints (--overwrite deletes these).
REPORT_FILES = ("metrics.jsonl", "reward.png", "eval.png", "tensorboard", "wandb")
BAR_KEYS = (("reward_mean", "reward"), ("kl", "kl"), ("clip_frac", "clip"), ("tokens_per_s", "tok/s"))


class ReportWarning(UserWarning):
    """A report could not be written or read as a whole: no matplotlib for the plot, a torn last line
    or a missing ``metrics.jsonl`` on ``--resume``."""


def read_metrics(path) -> List[Dict]:
    """The records of a metrics.jsonl file. A last line cut off mid-write (the process was killed
    while appending it) is dropped with a :class:`ReportWarning`; any other line that is not a
    JSON record with a ``step`` raises ``UserInputError`` naming ``PATH:LINE``."""
    p = Path(path)
    if not p.exists():
        return []
    lines = [(n, line) for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if line.strip()]
    records = []
    for k, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if k == len(lines) - 1:
                warnings.warn(f"{p}:{lineno}: incomplete last line dropped (its write was cut off)",
                              ReportWarning, stacklevel=2)
                break
            raise UserInputError(f"{p}:{lineno}: not a JSON record ({exc.msg}); fix or delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserInputError(f"{p}:{lineno}: not a metrics record (a JSON object with an integer \"step\")")
        records.append(record)
    return records


class Reporter:
    def __init__(self, output_dir: Path, *, total_steps: int, first_step: int, enabled: bool,
                 progress: bool, tensorboard: bool = False, report_to: Sequence[str] = (),
                 config: Optional[Dict] = None):
        self.enabled = enabled
        self.dir = output_dir
        self.metrics_path = output_dir / "metrics.jsonl"
        self.bar = None
        self.trackers = []
        if not enabled:
            return
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, desc="fastpo train", unit="step",
                            dynamic_ncols=True)
        # --report-to tensorboard,wandb (trackers.py); --tensorboard is --report-to tensorboard
        names = list(report_to) + (["tensorboard"] if tensorboard and "tensorboard" not in report_to else [])
        from .trackers import open_trackers

        self.trackers = open_trackers(names, output_dir, config)

    def truncate(self, last_step: int) -> None:
        """Drop records after ``last_step`` (a resumed run rewrites them)."""
        if not self.enabled:
            return
        if not self.metrics_path.exists():
            if last_step > 0:
                warnings.warn(f"{self.metrics_path} is missing: the record restarts at step {last_step + 1}",
                              ReportWarning, stacklevel=2)
            return
        kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= last_step]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: Dict) -> None:
        if not self.enabled:
            return
        for key in REQUIRED_KEYS:
            record.setdefault(key, None)
        record = {k: _clean(v) for k, v in record.items()}
        ordered = {k: record[k] for k in REQUIRED_KEYS}
        ordered.update((k, v) for k, v in sorted(record.items()) if k not in ordered)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(ordered) + "\n")
        if self.bar is not None:
            self.bar.set_postfix({short: _fmt(ordered[k]) for k, short in BAR_KEYS}, refresh=False)
            self.bar.update(1)
        if self.trackers:
            values = {k: v for k, v in ordered.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
            for tracker in self.trackers:
                tracker.log(values, ordered["step"])

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def plot(self) -> Optional[Path]:
        """reward.png (mean reward and its running mean, KL, entropy, response length) and, with
        evaluations, eval.png; see ``plots.py``. The path of reward.png, or None."""
        if not self.enabled:
            return None
        records = read_metrics(self.metrics_path)
        if not any(r.get("reward_mean") is not None or r.get("eval_accuracy") is not None for r in records):
            return None
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            warnings.warn(f"matplotlib is not installed: no {self.dir / 'reward.png'} (pip install matplotlib); "
                          f"the numbers are in {self.metrics_path}", ReportWarning, stacklevel=2)
            return None
        from .plots import write_plots

        return write_plots(self.dir, records)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for tracker in self.trackers:
            tracker.close()


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
