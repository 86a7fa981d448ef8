"""--report-to none|tensorboard|wandb: trackers get every metric; wandb works offline with no network."""

import sys

import pytest

from fastpo.trainer.cli import parse_config
from fastpo.trainer.errors import UserInputError
from fastpo.trainer.loop import Trainer
from fastpo.trainer.trackers import parse_report_to

QUICK = ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "3", "--no-progress", "--max-steps", "2"]


def test_parse_report_to():
    assert parse_report_to("none") == []
    assert parse_report_to("tensorboard") == ["tensorboard"]
    with pytest.raises(UserInputError, match="unknown value 'mlflow'"):
        parse_config(["--report-to", "mlflow"])
    with pytest.raises(UserInputError, match="'none' cannot be combined"):
        parse_config(["--report-to", "none,tensorboard"])


def test_wandb_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(UserInputError, match="needs the wandb package: pip install wandb"):
        parse_config(["--report-to", "wandb"])


def test_wandb_offline_run_writes_its_files(small_lm, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # --output-dir wins over it
    out = tmp_path / "run"
    Trainer(parse_config(["--model", small_lm, *QUICK, "--report-to", "wandb", "--eval-every", "2",
                          "--eval-size", "2", "--output-dir", str(out)])).train()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    records = list(runs[0].glob("run-*.wandb"))
    assert len(records) == 1
    data = records[0].read_bytes()  # wandb's protobuf record of the run: the metric names are in it
    for key in (b"reward_mean", b"eval_accuracy", b"kl_coef"):  # history, eval history and the config
        assert key in data, key


def test_tensorboard_writes_event_files(small_lm, tmp_path):
    pytest.importorskip("tensorboard")
    Trainer(parse_config(["--model", small_lm, *QUICK, "--report-to", "tensorboard",
                          "--output-dir", str(tmp_path)])).train()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
