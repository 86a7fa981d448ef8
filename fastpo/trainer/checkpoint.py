"""Checkpoints: ``OUTPUT_DIR/checkpoint-STEP/`` holds

  policy/             ``save_pretrained`` (safetensors) model + tokenizer: loadable on its own
  reference/          the reference model, when it was refreshed from the policy (else it is the
                      initial model, which the run reloads from ``--model``)
  critic.safetensors  the PPO critic
  trainer_state.pt    step, optimiser state, RNG states, the reference's refresh step
  optimizer-rankR.pt  under FSDP2 only: each rank's shard of the optimiser state (resume with the
                      same number of processes)

Model weights go through ``torch.distributed.checkpoint.state_dict`` as full (unsharded) tensors, so
the same model files come from a single process, DDP or FSDP2. A checkpoint is written to a
temporary directory and renamed into place: a run stopped while saving leaves the previous
checkpoint as the latest complete one."""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

_NAME = re.compile(r"^checkpoint-(\d+)$")
_FULL = StateDictOptions(full_state_dict=True)


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    found = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*") if (m := _NAME.match(p.name))
             and (p / "trainer_state.pt").exists()]
    return max(found)[1] if found else None


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
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def save_optimizer_shard(output_dir: Path, step: int, rank: int, optimizer) -> None:
    """FSDP2: this rank's optimiser state (DTensor shards) into the staging directory."""
    torch.save(optimizer.state_dict(), staging_dir(output_dir, step) / f"optimizer-rank{rank}.pt")


def load_checkpoint(path: Path, trainable: torch.nn.ModuleDict, optimizer, *, reference=None,
                    rank: Optional[int] = None) -> dict:
    """Load weights and optimiser state in place (every rank reads the files; ``rank`` names this
    rank's optimiser shard under FSDP2); returns the trainer state (step, ref_step, rng, config)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    state = torch.load(path / "trainer_state.pt", weights_only=False)
    policy = trainable["policy"]
    saved = AutoModelForCausalLM.from_pretrained(path / "policy", dtype=next(policy.parameters()).dtype)
    load_full_state(policy, {"lm." + k: v for k, v in saved.state_dict().items()})
    if reference is not None and (path / "reference").is_dir():
        saved_ref = AutoModelForCausalLM.from_pretrained(path / "reference", dtype=next(reference.parameters()).dtype)
        reference.load_state_dict(saved_ref.state_dict())
    if "critic" in trainable:
        load_full_state(trainable["critic"], load_file(str(path / "critic.safetensors")))
    if rank is not None:
        shard = path / f"optimizer-rank{rank}.pt"
        if not shard.exists():
            from .errors import UserInputError

            raise UserInputError(f"--resume: {path} has no optimiser shard for rank {rank}; resume an FSDP "
                                 "run with the number of processes it was saved with")
        optimizer.load_state_dict(torch.load(shard, weights_only=False))
    else:
        optimizer.load_state_dict(state["optimizer"])
    return state
