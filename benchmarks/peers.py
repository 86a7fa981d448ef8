"""Optional peer libraries the suite compares against, and the ``torch.compile`` baseline.

A peer is used only when it imports (and, for the CUDA-only ones, when the case runs on CUDA);
otherwise its rows say why it was skipped, e.g. ``skipped: liger not installed (pip install
liger-kernel)``. ``pip install -e .[bench]`` installs the peers that install cleanly next to a CPU
torch; see the ``bench`` extra in pyproject.toml.

Every peer row still goes through the correctness guard: its output is compared with eager on the
same inputs before it is timed. Where a peer's convention differs from fastpo's (verl whitens GAE
advantages, Liger's losses take per-sequence advantages, ...), the adapter in the op's module says
how the two are made to compute the same quantity.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch


class Skip(NotImplementedError):
    """Raised by an implementation that cannot run here (peer missing, CUDA-only, compile failed);
    the harness reports the row as ``skipped`` with this message instead of timing it."""


@dataclass(frozen=True)
class Peer:
    name: str  # the impl label prefix in tables ("liger", "trl", ...)
    module: str  # what must import
    dist: str  # the PyPI distribution (for the install hint and its version)
    cuda_only: bool = False
    note: str = ""


PEERS: Dict[str, Peer] = {
    "trl": Peer("trl", "trl.trainer.utils", "trl"),
    "verl": Peer("verl", "verl.trainer.ppo.core_algos", "verl",
                 note="or: pip install --no-deps verl; pip install ray tensordict omegaconf codetiming "
                      "hydra-core (verl's full dependency set pins another transformers)"),
    "liger": Peer("liger", "liger_kernel.chunked_loss", "liger-kernel"),
    "liger-triton": Peer("liger-triton", "liger_kernel.ops.grpo_loss", "liger-kernel", cuda_only=True),
    "cce": Peer("cce", "cut_cross_entropy", "cut-cross-entropy", cuda_only=True),
    "flash-attn": Peer("flash-attn", "flash_attn.ops.triton.cross_entropy", "flash-attn", cuda_only=True),
}

_import_cache: Dict[str, Tuple[Optional[Any], str]] = {}


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def load(peer_name: str) -> Tuple[Optional[Any], str]:
    """(module, "") when the peer imports, else (None, why not). Cached per process."""
    if peer_name in _import_cache:
        return _import_cache[peer_name]
    peer = PEERS[peer_name]
    try:
        mod = importlib.import_module(peer.module)
        res: Tuple[Optional[Any], str] = (mod, "")
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if missing and not peer.module.startswith(missing.split(".")[0]) and _version(peer.dist):
            why = f"{peer.dist} is installed but needs {missing!r} (pip install {missing})"
        else:
            why = f"{peer.dist} not installed (pip install {peer.dist})"
            if peer.note:
                why += f"; {peer.note}"
        res = (None, why)
    except Exception as exc:  # a broken install: say so, never crash the suite
        res = (None, f"{peer.dist} failed to import: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    _import_cache[peer_name] = res
    return res


def require(peer_name: str, device: str) -> Any:
    """The peer's module, or :class:`Skip` with the reason it cannot run on ``device``."""
    peer = PEERS[peer_name]
    if peer.cuda_only and device != "cuda":
        raise Skip(f"{peer.dist} runs on CUDA only")
    mod, why = load(peer_name)
    if mod is None:
        raise Skip(why)
    return mod


def skip_reason(peer_name: str, device: str) -> Optional[str]:
    try:
        require(peer_name, device)
    except Skip as exc:
        return str(exc)
    return None


def status(device: str) -> Dict[str, Dict[str, Any]]:
    """For the report header and the JSON: every peer, its version or why it is skipped."""
    out = {}
    for name, peer in PEERS.items():
        why = skip_reason(name, device)
        out[name] = {"dist": peer.dist, "available": why is None,
                     "version": _version(peer.dist), "reason": why or ""}
    return out


# --------------------------------------------------------------------------------------------
# torch.compile of the eager baselines
# --------------------------------------------------------------------------------------------

COMPILE = "torch.compile"
_compiled: Dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=False)``, created once per function. Each case shape compiles
    once, in the correctness check that precedes the timing (the warm-up); a compile error is
    re-raised as :class:`Skip` so that the row says why instead of crashing the run."""
    c = _compiled.get(fn)
    if c is None:
        import torch._dynamo

        cfg = torch._dynamo.config
        # every case is a new static shape: allow many recompiles rather than silently falling
        # back to eager after the default limit of 8
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(cfg, knob):
                setattr(cfg, knob, max(getattr(cfg, knob), 256))
        inner = torch.compile(fn, dynamic=False)

        def c(*args, **kwargs):
            try:
                return inner(*args, **kwargs)
            except Exception as exc:
                raise Skip(f"torch.compile failed: {type(exc).__name__}: "
                           f"{(str(exc).strip().splitlines() or [''])[0][:140]}") from exc

        _compiled[fn] = c
    return c


def compile_available(device: str) -> Optional[str]:
    """None when torch.compile can be used on ``device``, else why not (no C++ compiler on CPU)."""
    import shutil

    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if device == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "torch.compile on CPU needs a C++ compiler (none on PATH)"
    return None
