"""Checkpoints: ``OUTPUT_DIR/checkpoint-STEP/`` holds

  policy/             ``save_pretrained`` (safetensors) model + tokenizer: loadable on its own
  reference/          the reference model, when it was refreshed from the policy (else it is the
                      initial model, which the run reloads from ``--model``)
  critic.safetensors  the PPO critic
  trainer_state.pt    step, optimiser state, RNG states, the reference's refresh step
  optimizer-rankR.pt  under FSDP2 only: each rank's shard of the optimiser state (resume with the
                      same number of processes)

Model weights go through ``torch.distributed.checkpoint.state_dict`` as full (unsharded) tensors, so
the same model files come from a single process, DDP or FSDP2. A checkpoint is written to a staging
directory (``.checkpoint-STEP.tmp``) and renamed into place: a run stopped while saving leaves the
previous checkpoint as the latest complete one (a leftover staging directory is never read).

``--resume`` reads the newest checkpoint into memory before touching the model. One that cannot be read
(a missing or truncated file, a deleted ``policy/``, an empty directory) is skipped with a
:class:`CheckpointWarning` naming the file, and the next older one is tried; when none can be read,
the run stops with an error listing each checkpoint's problem.

An ``--output-dir`` that holds a previous run (checkpoints or ``metrics.jsonl``) is refused without
``--resume`` (continue it) or ``--overwrite`` (delete that run's files, and only those, then start
afresh), so two runs never mix in one directory."""

from __future__ import annotations

import random
import re
import shutil
import warnings
from pathlib import Path
from typing import List, Optional

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from .errors import UserInputError
from .reporting import REPORT_FILES

_NAME = re.compile(r"^checkpoint-(\d+)$")
_STAGING = re.compile(r"^\.checkpoint-(\d+)\.tmp(\.old)?$")
_FULL = StateDictOptions(full_state_dict=True)


class CheckpointWarning(UserWarning):
    """``--resume`` skipped an unreadable checkpoint (the message names the file), or found a torn
    or missing ``metrics.jsonl``."""


class CheckpointError(Exception):
    """A checkpoint cannot be read; the message names the file."""


def checkpoints(output_dir: Path) -> List[Path]:
    """Every ``checkpoint-STEP/`` directory, newest first (complete or not)."""
    found = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*") if (m := _NAME.match(p.name))
             and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


# ---- the run directory -------------------------------------------------------------------------------

def previous_run_files(output_dir: Path) -> List[Path]:
    """What an earlier run wrote into ``output_dir``: checkpoints (staged ones too) and the reports."""
    if not output_dir.is_dir():
        return []
    staged = [p for p in output_dir.iterdir() if _NAME.match(p.name) or _STAGING.match(p.name)]
    return sorted(staged) + [output_dir / n for n in REPORT_FILES if (output_dir / n).exists()]


def check_output_dir(output_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an ``--output-dir`` that is not a directory, or that holds a previous run the flags do
    not say what to do with. Reads only: run on every rank before any model loads."""
    for parent in [output_dir, *output_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "" if parent == output_dir else f" ({parent} is a file)"
                raise UserInputError(f"--output-dir {output_dir}: not a directory{where}")
            break
    if resume or overwrite:
        return
    found = previous_run_files(output_dir)
    if found:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise UserInputError(f"--output-dir {output_dir} holds a previous run ({names}): pass --resume to "
                             "continue it, --overwrite to delete it and start afresh, or another --output-dir")


def clear_previous_run(output_dir: Path) -> None:
    """``--overwrite``: delete the files :func:`previous_run_files` names (nothing else)."""
    for p in previous_run_files(output_dir):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def rng_state() -> dict:
    state = {"torch": torch.random.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_state(trainable: torch.nn.ModuleDict) -> dict:
    """Full model state dicts on CPU, by name (a collective under FSDP: every rank calls it).
    ``trainable["policy"]`` is the :class:`~fastpo.trainer.batch.TokenScorer` (the FSDP root); its
    ``lm.`` prefix is dropped so the policy's dict is the Hugging Face model's own."""
    out = {name: {k: v.detach().cpu() for k, v in get_model_state_dict(module, options=_FULL).items()}
           for name, module in trainable.items()}
    out["policy"] = {k.removeprefix("lm."): v for k, v in out["policy"].items()}
    return out


def load_full_state(module: torch.nn.Module, full: dict) -> None:
    """Load full (unsharded) tensors into ``module``; parameters that are FSDP2 DTensors get their
    shard (``distribute_tensor``, a collective: every rank calls this with the same tensors)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    current = module.state_dict()
    converted = {}
    for name, value in full.items():
        target = current.get(name)
        if isinstance(target, DTensor):
            value = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements)
        converted[name] = value
    module.load_state_dict(converted)


def staging_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f".checkpoint-{step}.tmp"


def save_checkpoint(output_dir: Path, step: int, models: dict, *, policy, tokenizer, optimizer_state,
                    reference=None, ref_step: int = 0, config: Optional[dict] = None) -> Path:
    """Write what :func:`gather_state` returned into the staging directory and rename it into place
    (call on one rank, after any per-rank optimiser shards were written into the staging directory)."""
    from safetensors.torch import save_file

    final = output_dir / f"checkpoint-{step}"
    tmp = staging_dir(output_dir, step)
    tmp.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(tmp / "policy", state_dict=models["policy"], safe_serialization=True)
    tokenizer.save_pretrained(tmp / "policy")
    if reference is not None:
        reference.save_pretrained(tmp / "reference", safe_serialization=True)
    if "critic" in models:
        save_file({k: v.contiguous() for k, v in models["critic"].items()}, str(tmp / "critic.safetensors"))
    torch.save({"step": step, "optimizer": optimizer_state, "rng": rng_state(), "ref_step": ref_step,
                "config": config}, tmp / "trainer_state.pt")
    old = tmp.with_name(tmp.name + ".old")
    if final.exists():  # a re-run of this step: the old copy stays whole until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def save_optimizer_shard(output_dir: Path, step: int, rank: int, optimizer) -> None:
    """FSDP2: this rank's optimiser state (DTensor shards) into the staging directory."""
    torch.save(optimizer.state_dict(), staging_dir(output_dir, step) / f"optimizer-rank{rank}.pt")


def resume_checkpoint(output_dir: Path, cfg, trainable: torch.nn.ModuleDict, optimizer, *, reference,
                      dist) -> dict:
    """``--resume``: load the newest readable checkpoint into the models and the optimiser (older ones
    when it is not, with a :class:`CheckpointWarning`); its trainer state, plus ``"path"``. A checkpoint
    of a run with other ``RESUME_MUST_MATCH`` settings is refused; other changed settings warn."""
    from .config import ResumeWarning, resume_differences
    from .distributed import all_sum

    problems = []
    dtype = next(trainable["policy"].parameters()).dtype
    for path in checkpoints(output_dir):
        problem = state = data = None
        try:
            state = read_trainer_state(path)
            refused, changed = resume_differences(state.get("config"), cfg)
            if refused:
                raise UserInputError(f"--resume: {path} was saved by a run with " + ", ".join(
                    f"--{k.replace('_', '-')} {old!r}" for k, old, _ in refused) + "; this run has " +
                    ", ".join(f"--{k.replace('_', '-')} {new!r}" for k, _, new in refused) +
                    ": resume with the run's settings, or start a new run in another --output-dir")
            data = read_weights(path, state, dtype=dtype, critic="critic" in trainable,
                                reference=reference is not None, rank=dist.rank if cfg.fsdp else None)
        except CheckpointError as exc:
            problem = str(exc)
        if all_sum(0.0 if problem is None else 1.0, dist) > 0:  # every rank skips it together
            problems.append(problem or f"{path}: unreadable on another rank")
            warnings.warn(f"--resume: skipping {path.name} ({problems[-1]}); trying the previous checkpoint",
                          CheckpointWarning, stacklevel=3)
            continue
        if changed:
            warnings.warn("--resume: settings differ from the run's: " + ", ".join(
                f"--{k.replace('_', '-')} {old!r} -> {new!r}" for k, old, new in changed) +
                "; continuing with the new values", ResumeWarning, stacklevel=3)
        try:
            apply_checkpoint(data, trainable, optimizer, reference=reference)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserInputError(f"--resume: {path} does not fit this run's model "
                                 f"({type(exc).__name__}: {_first_line(exc)})") from None
        return {**state, "path": path}
    raise UserInputError(f"--resume: no usable checkpoint in {output_dir}:" + "".join(f"\n  {p}" for p in problems))


def read_trainer_state(path: Path) -> dict:
    """``trainer_state.pt`` of a checkpoint (step, optimiser state, RNG, ref_step, config)."""
    file = path / "trainer_state.pt"
    if not path.is_dir() or not any(path.iterdir()):
        raise CheckpointError(f"{path} is empty")
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        state = torch.load(file, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{file} cannot be read ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(state, dict) or not {"step", "rng", "optimizer"} <= set(state):
        raise CheckpointError(f"{file} is not a fastpo trainer state")
    return state


def read_weights(path: Path, state: dict, *, dtype: torch.dtype, critic: bool, reference: bool,
                 rank: Optional[int]) -> dict:
    """Every tensor file of a checkpoint, read into memory (nothing is loaded into a model yet):
    ``{"policy", "critic"?, "reference"?, "optimizer"}``. Raises :class:`CheckpointError` naming the
    file that is missing or unreadable."""
    from safetensors.torch import load_file

    out = {"policy": _read_pretrained(path / "policy", dtype)}
    if reference and (path / "reference").is_dir():
        out["reference"] = _read_pretrained(path / "reference", dtype)
    if critic:
        file = path / "critic.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        try:
            out["critic"] = load_file(str(file))
        except Exception as exc:
            raise CheckpointError(f"{file} cannot be read ({_first_line(exc)})") from None
    if rank is not None:
        shard = path / f"optimizer-rank{rank}.pt"
        if not shard.exists():
            raise UserInputError(f"--resume: {path} has no optimiser shard for rank {rank}; resume an FSDP "
                                 "run with the number of processes it was saved with")
        try:
            out["optimizer"] = torch.load(shard, weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"{shard} cannot be read ({type(exc).__name__}: {_first_line(exc)})") from None
    else:
        if state["optimizer"] is None:
            raise CheckpointError(f"{path / 'trainer_state.pt'} holds no optimiser state")
        out["optimizer"] = state["optimizer"]
    return out


def _read_pretrained(directory: Path, dtype: torch.dtype) -> dict:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} is missing or incomplete (no config.json)")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} holds no *.safetensors weights")
    for file in files:  # a truncated file fails here, named
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as exc:
            raise CheckpointError(f"{file} cannot be read ({_first_line(exc)})") from None
    try:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).state_dict()
    except Exception as exc:
        raise CheckpointError(f"{directory} cannot be loaded ({type(exc).__name__}: {_first_line(exc)})") from None


def apply_checkpoint(data: dict, trainable: torch.nn.ModuleDict, optimizer, *, reference=None) -> None:
    """Load what :func:`read_weights` returned into the models and the optimiser (every rank)."""
    load_full_state(trainable["policy"], {"lm." + k: v for k, v in data["policy"].items()})
    if reference is not None and "reference" in data:
        reference.load_state_dict(data["reference"])
    if "critic" in trainable:
        load_full_state(trainable["critic"], data["critic"])
    optimizer.load_state_dict(data["optimizer"])


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]
