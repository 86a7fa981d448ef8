"""Data parallelism: ``torchrun --nproc_per_node N -m fastpo train ...`` runs one trainer per process.

Each rank samples its own prompts (its seeds include the rank), the trainable networks are wrapped
in DistributedDataParallel (gloo on CPU, NCCL on GPU) or, with ``--fsdp``, sharded with FSDP2's
``fully_shard`` (for models whose weights and optimiser state do not fit one device), and token-mean losses divide by the global
token count so that the averaged gradient equals the single-process one on the union batch."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: Optional[str]) -> DistInfo:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1), or run alone."""
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, torch.device(want))
    if want == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), dev)


def wrap(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DDP around a trainable module when running distributed; the module itself otherwise."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def shard(root: torch.nn.Module, decoder: torch.nn.Module, info: DistInfo) -> None:
    """FSDP2: ``fully_shard`` each decoder layer, then the root (which keeps the embeddings, final
    norm and lm_head). Parameters become DTensors sharded over the ranks; each layer all-gathers
    its weights for its forward and backward only."""
    from torch.distributed.fsdp import fully_shard

    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"--fsdp: {type(decoder).__name__} has no .layers to shard")
    for layer in layers:
        fully_shard(layer)
    fully_shard(root)


@torch.no_grad()
def initialise_sharded(root: torch.nn.Module, *inputs) -> None:
    """One forward through the FSDP2 root, so that it, not a layer called first by ``generate``,
    becomes the root of the lazy initialisation."""
    root(*inputs)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if hasattr(module, "module") and isinstance(
        module, torch.nn.parallel.DistributedDataParallel) else module


def all_sum(value: float, info: DistInfo) -> float:
    """The sum of a Python number over ranks."""
    if not info.enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item())


def all_mean(value: float, info: DistInfo) -> float:
    return all_sum(value, info) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leave the process group once every collective has finished *and been freed*.

    Gloo's worker threads free a finished operation after signalling it, and freeing FSDP2's
    all-gathers drops Python-owned tensors, which needs the GIL. If the main thread was already
    finalising the interpreter by then, the worker thread was killed inside C++ and the process
    aborted (``terminate called without an active exception``, SIGABRT, about one 2-rank FSDP run
    in five, after the run's work was done). A gloo barrier waits for all earlier operations; the
    short GIL-free sleep after it lets the worker threads free them."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        time.sleep(0.2)
        dist.destroy_process_group()
