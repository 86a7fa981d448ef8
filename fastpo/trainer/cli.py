"""``fastpo train``: flags generated from :class:`~fastpo.trainer.config.TrainConfig`, an optional
``--config FILE.yaml`` underneath them, and user errors printed without a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
import warnings
from pathlib import Path
from typing import List, Optional

from .config import TrainConfig, config_fields, load_yaml_config
from .errors import UserInputError

EXAMPLES = """examples:
  fastpo train                                   # GRPO on the built-in arithmetic task, tiny built-in model
  fastpo train --algo ppo --max-steps 50
  fastpo train --algo dpo --data pairs.jsonl --model ./my-model
  torchrun --nproc_per_node 2 -m fastpo train    # data parallel (gloo on CPU, NCCL on GPU)"""


def _flag_type(f: dataclasses.Field):
    hint = typing.get_type_hints(TrainConfig)[f.name]
    base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return base[0]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastpo train", description="Train a causal LM with fastpo's fused losses.",
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", metavar="FILE.yaml", help="settings file (any flag below; flags win)")
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        kind = _flag_type(f)
        help_text = f.metadata.get("help", "")
        if "default:" not in help_text:  # fields whose default needs words say it themselves
            help_text += f" (default: {f.default})"
        if kind is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(kind) is list:  # a flag that may be given several times (--reward)
            ap.add_argument(flag, action="append", metavar=f.name.upper(), help=help_text)
        else:
            ap.add_argument(flag, type=kind, metavar=f.name.upper(), help=help_text)
    return ap


def parse_config(argv: Optional[List[str]]) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    settings = {}
    if "config" in args:
        settings.update(load_yaml_config(args.pop("config")))
    settings.update(args)
    types = {f.name: _flag_type(f) for f in config_fields()}
    for name, value in settings.items():
        kind = types[name]
        if typing.get_origin(kind) is list:  # a list of strings, or one string (a YAML scalar)
            if isinstance(value, str):
                settings[name] = [value]
            elif value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise UserInputError(f"{name}: expected a string or a list of strings, got {value!r}")
            continue
        if value is None or isinstance(value, kind) or (kind is float and isinstance(value, int)
                                                        and not isinstance(value, bool)):
            continue
        raise UserInputError(f"{name}: expected {kind.__name__}, got {value!r}")
    return TrainConfig(**settings).validate()


def main(argv: Optional[List[str]] = None) -> int:
    try:
        cfg = parse_config(argv)
        from .loop import Trainer

        with warnings.catch_warnings():
            warnings.simplefilter("default")
            trainer = Trainer(cfg)
            try:
                records = trainer.train()
            finally:
                trainer.close()
    except UserInputError as exc:
        print(f"fastpo train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastpo train: interrupted", file=sys.stderr)
        return 130
    if trainer.dist.is_main:
        _summary(cfg, records)
    return 0


def _summary(cfg: TrainConfig, records) -> None:
    rewards = [r["reward_mean"] for r in records if r.get("reward_mean") is not None]
    if rewards:
        k = max(1, min(10, len(rewards) // 4))
        first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
        print(f"mean reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f}")
    plot = Path(cfg.output_dir) / "reward.png"
    print(f"metrics: {cfg.output_dir}/metrics.jsonl" + (f", plot: {plot}" if plot.is_file() else ""))
