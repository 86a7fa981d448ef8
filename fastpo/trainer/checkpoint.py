"""Checkpoints: ``OUTPUT_DIR/checkpoint-STEP/`` holds

  policy/             ``save_pretrained`` (safetensors) model + tokenizer: loadable on its own
  reference/          the reference model, when it was refreshed from the policy (else it is the
                      initial model, which the run reloads from ``--model``)
  critic.safetensors  the PPO critic
  trainer_state.pt    step, optimiser state, RNG states, the refresh step of the reference

A checkpoint is written to a temporary directory and renamed into place, so a run stopped while
saving leaves the previous checkpoint as the latest complete one."""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

_NAME = re.compile(r"^checkpoint-(\d+)$")


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


def save_checkpoint(output_dir: Path, step: int, *, policy, tokenizer, optimizer, reference=None,
                    critic=None, ref_step: int = 0, config: Optional[dict] = None) -> Path:
    from safetensors.torch import save_file

    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.save_pretrained(tmp / "policy", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "policy")
    if reference is not None:
        reference.save_pretrained(tmp / "reference", safe_serialization=True)
    if critic is not None:
        save_file({k: v.detach().contiguous() for k, v in critic.state_dict().items()}, str(tmp / "critic.safetensors"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), "ref_step": ref_step,
                "config": config}, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def load_checkpoint(path: Path, *, policy, optimizer, reference=None, critic=None) -> dict:
    """Load weights and optimiser state in place; returns the trainer state (step, ref_step, rng)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    state = torch.load(path / "trainer_state.pt", weights_only=False)
    dtype = next(policy.parameters()).dtype
    saved = AutoModelForCausalLM.from_pretrained(path / "policy", dtype=dtype)
    policy.load_state_dict(saved.state_dict())
    if reference is not None and (path / "reference").is_dir():
        saved_ref = AutoModelForCausalLM.from_pretrained(path / "reference", dtype=dtype)
        reference.load_state_dict(saved_ref.state_dict())
    if critic is not None:
        critic.load_state_dict(load_file(str(path / "critic.safetensors"), device=str(
            next(critic.parameters()).device)))
    optimizer.load_state_dict(state["optimizer"])
    return state
