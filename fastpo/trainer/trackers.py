"""Experiment trackers of ``--report-to none|tensorboard|wandb`` (comma-separated for several, as
TRL's ``report_to`` list). Each gets every numeric value of every ``metrics.jsonl`` record at its step.

- ``tensorboard``: ``torch.utils.tensorboard`` event files in ``OUTPUT_DIR/tensorboard`` (``--tensorboard``
  is the same).
- ``wandb``: a Weights & Biases run (``pip install wandb``; not in the ``train`` extra, it is large)
  whose files go under ``OUTPUT_DIR/wandb``, with the run's settings as its config. wandb's own
  environment variables apply: ``WANDB_MODE=offline`` writes the run to disk with no network
  (``wandb sync`` uploads it later), ``WANDB_PROJECT`` names the project (default ``fastpo``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .errors import UserInputError

REPORT_TO = ("none", "tensorboard", "wandb")


def parse_report_to(text: str) -> List[str]:
    """The trackers named by ``--report-to`` (``none``: no tracker)."""
    names = [part.strip() for part in str(text).split(",")]
    for name in names:
        if name not in REPORT_TO:
            raise UserInputError(f"--report-to: unknown value {name!r}; choose from {', '.join(REPORT_TO)} "
                                 "(comma-separated for several)")
    if "none" in names and len(names) > 1:
        raise UserInputError(f"--report-to {text}: 'none' cannot be combined with a tracker")
    if "wandb" in names:
        import_wandb()
    return [n for n in dict.fromkeys(names) if n != "none"]


def import_wandb():
    try:
        import wandb
    except ImportError:
        raise UserInputError("--report-to wandb needs the wandb package: pip install wandb "
                             "(WANDB_MODE=offline to log without a network)") from None
    return wandb


class TensorBoardTracker:
    def __init__(self, output_dir: Path, config: Optional[Dict] = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserInputError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, values: Dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, output_dir: Path, config: Optional[Dict] = None):
        wandb = import_wandb()
        output_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastpo"), dir=str(output_dir),
                              name=output_dir.resolve().name, config=config or {}, reinit="finish_previous")

    def log(self, values: Dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


def open_trackers(names: Sequence[str], output_dir: Path, config: Optional[Dict] = None) -> List:
    return [TRACKERS[name](output_dir, config) for name in names]
