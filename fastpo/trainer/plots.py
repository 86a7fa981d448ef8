"""The run's two PNGs, drawn from its ``metrics.jsonl`` records (matplotlib, Agg backend):

- ``reward.png``: the mean reward per step with its running mean, and beside it the KL to the
  reference, the policy entropy and the mean response length (a panel whose metric the algorithm
  never logged, e.g. KL with ``kl_coef`` 0, says so instead of a curve);
- ``eval.png`` (runs with ``--eval-every``): held-out accuracy and mean reward at each evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

PANELS = (("reward_mean", "mean reward"), ("kl", "KL to reference"), ("entropy", "entropy"),
          ("response_len", "response length (tokens)"))
EVAL_CURVES = (("eval_accuracy", "accuracy"), ("eval_reward_mean", "mean reward"))


def series(records: List[Dict], key: str):
    """``(steps, values)`` of the records that have a number under ``key``."""
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def running_mean(values: List[float], window: int) -> List[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot_training(plt, records: List[Dict], path: Path) -> Optional[Path]:
    steps, rewards = series(records, "reward_mean")
    if not steps:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), dpi=100, sharex=True)
    for ax, (key, label) in zip(axes.flat, PANELS):
        xs, ys = (steps, rewards) if key == "reward_mean" else series(records, key)
        if not xs:
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.plot(xs, ys, alpha=0.35 if key == "reward_mean" else 0.8, label=key)
            if key == "reward_mean":
                window = max(1, len(ys) // 20)
                ax.plot(xs, running_mean(ys, window), label=f"running mean ({window} steps)")
                ax.legend()
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_eval(plt, records: List[Dict], path: Path) -> Optional[Path]:
    curves = [(label, *series(records, key)) for key, label in EVAL_CURVES]
    if not any(xs for _, xs, _ in curves):
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for label, xs, ys in curves:
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(directory: Path, records: List[Dict]) -> Optional[Path]:
    """Write ``reward.png`` (and ``eval.png`` when the records hold evaluations); the path of
    ``reward.png``, or None when no record has a reward. Needs matplotlib (the caller checks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_eval(plt, records, directory / "eval.png")
    return plot_training(plt, records, directory / "reward.png")
