"""Benchmarks of the advantage estimators against the eager loops RL frameworks run today.

* ``gae``: ``fastpo.gae`` vs verl's ``compute_gae_advantage_return`` — a reversed Python loop over the
  T time steps of ``[B, T]`` tensors (a few small tensor ops per step). Two baselines, written here the
  way verl writes them: ``eager`` is verl's masked variant (the carried value and advantage skip
  masked tokens, as fastpo does), ``eager-nomask`` the classic loop (no mask handling; run on the
  all-counted cases only). Outputs are compared at the counted tokens (verl leaves the carried values
  at masked positions, fastpo writes 0 there). Neither baseline whitens (verl whitens afterwards; that
  is ``fastpo.whiten``, not timed here).
* ``group_advantages``: ``fastpo.group_advantages`` (grpo) vs verl's ``compute_grpo_outcome_advantage``:
  sum the token rewards, build an ``id2score`` dict of lists with a Python loop over the batch, loop over
  the groups for mean/std, loop over the batch to normalise, broadcast over the response mask.

Peers (when ``verl`` imports; see :mod:`benchmarks.peers`):

* ``verl`` for ``gae``: verl's own ``core_algos.compute_gae_advantage_return``. It whitens the
  advantages over the counted tokens before returning them (``masked_whiten``, Bessel-corrected,
  eps 1e-8); its row is checked against the eager advantages whitened the same way, and its returns
  (unwhitened) against eager's. Its time includes that whitening.
* ``verl`` for ``group_advantages``: verl's ``compute_grpo_outcome_advantage`` with the uid strings
  as its ``index`` array. verl sums the token rewards unmasked (its rewards are zero outside the
  response): the inputs here are zero outside the mask for every implementation.

``torch.compile`` is not timed for these ops: dynamo unrolls the Python loops (T time steps for GAE,
B samples and the groups for GRPO) into one graph, which takes minutes to compile on a CPU (about
3 minutes for T=512) and recompiles for every shape.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from .harness import BenchOp
from .peers import COMPILE, require

_GAMMA, _LAM = 1.0, 0.95


# --------------------------------------------------------------------------------------------
# The eager baselines (verl's loops, rewritten)
# --------------------------------------------------------------------------------------------


def verl_gae_masked(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """verl's masked GAE loop: masked steps carry (next value, last advantage) through unchanged."""
    next_values = torch.zeros_like(values[:, 0])
    last = torch.zeros_like(values[:, 0])
    m = mask.to(values.dtype)
    out = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        new = delta + gamma * lam * last
        next_values = values[:, t] * m[:, t] + (1 - m[:, t]) * next_values
        last = new * m[:, t] + (1 - m[:, t]) * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + values


def verl_gae_classic(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float):
    """verl's original loop (every step counted): nextvalues = values[:, t + 1]."""
    last = torch.zeros_like(values[:, 0])
    out = []
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + values


def verl_grpo(token_rewards: torch.Tensor, mask: torch.Tensor, index, eps: float = 1e-6):
    """verl's GRPO outcome advantage: Python loops over the batch and the groups (id2score)."""
    scores = (token_rewards * mask).sum(dim=-1)
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    with torch.no_grad():
        for i in range(scores.shape[0]):
            id2score[index[i]].append(scores[i])
        for idx, members in id2score.items():
            if len(members) == 1:
                id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
            else:
                stacked = torch.stack(members)
                id2mean[idx], id2std[idx] = stacked.mean(), stacked.std()
        scores = scores.clone()
        for i in range(scores.shape[0]):
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
    return scores.unsqueeze(-1) * mask


# --------------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------------


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item() if a.numel() else 0.0


def _whiten64(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """verl's masked_whiten in float64 (Bessel-corrected variance over the counted elements)."""
    x = x.double()
    m = mask.double()
    n = m.sum()
    mean = (x * m).sum() / n
    var = ((x - mean).square() * m).sum() / n * (n / (n - 1))
    return (x - mean) * torch.rsqrt(var + eps)


class _AdvantageOp(BenchOp):
    """Shared sizing of the [B, T] float32 advantage benchmarks."""
    memory_in_quick_cpu = False  # a few MiB; measured in full mode

    compile_skip = ("not timed: dynamo unrolls the Python loop of the eager code (minutes of "
                    "compile time on CPU, per shape)")

    def plot_keys(self, p: Dict[str, Any]):
        return [(f"{self.name} ({p['mask']} mask)", "tokens B·T", p["B"] * p["T"])]

    def label(self, p: Dict[str, Any]) -> str:
        return f"B={p['B']} T={p['T']} {p['mask']}"

    def tiny(self, p: Dict[str, Any]) -> Dict[str, Any]:
        return dict(p, B=4, T=16)

    def input_bytes(self, p: Dict[str, Any]) -> int:
        return p["B"] * p["T"] * (4 + 4 + 1)

    def estimate_bytes(self, impl: str, p: Dict[str, Any]) -> int:
        return int(8 * self.input_bytes(p) + 64 * 1024 * 1024)

    def reference(self, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        return self.outputs("eager", p, inputs)

    def make_step(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]):
        return (lambda: self._run(impl, inputs)), (lambda: None)

    @staticmethod
    def _batch(p: Dict[str, Any], device: str, seed: int):
        g = torch.Generator(device=device).manual_seed(seed + p["B"] + p["T"])
        b, t = p["B"], p["T"]
        rewards = torch.randn((b, t), generator=g, device=device)
        values = torch.randn((b, t), generator=g, device=device)
        if p["mask"] == "full":
            mask = torch.ones((b, t), dtype=torch.bool, device=device)
        else:  # ragged response lengths plus masked holes (e.g. tool-output tokens)
            lengths = torch.randint(t // 4, t + 1, (b,), generator=g, device=device)
            mask = torch.arange(t, device=device)[None, :] < lengths[:, None]
            mask &= torch.rand((b, t), generator=g, device=device) > 0.1
        return rewards, values, mask


class GaeOp(_AdvantageOp):
    name = "gae"
    description = "GAE over [B, T] (verl's reversed loop over time vs fastpo.gae)"

    def cases(self, quick: bool, device: str) -> List[Dict[str, Any]]:
        shapes = [(64, 512), (256, 1024)] if quick else [(64, 1024), (256, 1024), (256, 4096)]
        return [{"B": b, "T": t, "mask": m} for b, t in shapes for m in ("full", "ragged+holes")]

    def impls(self, p: Dict[str, Any], device: str) -> List[str]:
        extra = ["eager-nomask"] if p["mask"] == "full" else []
        return ["eager", *extra, COMPILE, "verl", "fastpo"]

    def make_inputs(self, p: Dict[str, Any], device: str) -> Dict[str, Any]:
        rewards, values, mask = self._batch(p, device, 11)
        return {"rewards": rewards, "values": values, "mask": mask}

    def _run(self, impl: str, inputs: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        r, v, m = inputs["rewards"], inputs["values"], inputs["mask"]
        if impl == "eager":
            return verl_gae_masked(r, v, m, _GAMMA, _LAM)
        if impl == "eager-nomask":
            return verl_gae_classic(r, v, _GAMMA, _LAM)
        if impl == "verl":
            core = require("verl", r.device.type)
            return core.compute_gae_advantage_return(r, v, m.to(v.dtype), _GAMMA, _LAM)
        if impl == "fastpo":
            import fastpo

            return fastpo.gae(r, v, m, gamma=_GAMMA, lam=_LAM)
        raise ValueError(f"unknown impl {impl!r}")


    def outputs(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        with torch.no_grad():
            adv, ret = self._run(impl, inputs)
        return {"adv": adv, "ret": ret, "mask": inputs["mask"], "whitened": impl == "verl"}

    def compare(self, ref, out, p, device) -> Tuple[bool, str]:
        m = ref["mask"]
        if out["whitened"]:  # verl whitens its advantages: compare with eager's, whitened alike
            ref = dict(ref, adv=_whiten64(ref["adv"], m))
        err_a = _max_abs(out["adv"][m], ref["adv"][m])
        err_r = _max_abs(out["ret"][m], ref["ret"][m])
        scale = 1.0 + ref["adv"][m].abs().max().item() if m.any() else 1.0
        return err_a <= 1e-5 * scale and err_r <= 1e-5 * scale, f"adv err {err_a:.1e}, ret err {err_r:.1e}"


class GroupAdvantagesOp(_AdvantageOp):
    name = "group_advantages"
    description = "GRPO group advantages from [B, T] token rewards, groups of 8 (verl's id2score loops vs fastpo)"

    GROUP = 8

    def cases(self, quick: bool, device: str) -> List[Dict[str, Any]]:
        shapes = [(64, 512), (256, 1024)] if quick else [(64, 1024), (256, 1024), (256, 4096), (1024, 1024)]
        return [{"B": b, "T": t, "mask": "ragged+holes"} for b, t in shapes]

    def impls(self, p: Dict[str, Any], device: str) -> List[str]:
        return ["eager", COMPILE, "verl", "fastpo"]

    def make_inputs(self, p: Dict[str, Any], device: str) -> Dict[str, Any]:
        rewards, _, mask = self._batch(p, device, 12)
        rewards = rewards * mask  # token rewards are zero outside the response (verl relies on it)
        # Prompts in a shuffled order (as after a rollout): group ids as verl keeps them (uid strings)
        # and as an integer tensor for fastpo.
        ids = torch.randperm(p["B"], generator=torch.Generator().manual_seed(p["B"])) // self.GROUP
        uids = [f"uid-{i}" for i in ids.tolist()]
        return {"rewards": rewards, "mask": mask, "ids": ids.to(device), "uids": uids,
                "uids_np": np.array(uids, dtype=object)}

    def _run(self, impl: str, inputs: Dict[str, Any]) -> torch.Tensor:
        if impl == "eager":
            return verl_grpo(inputs["rewards"], inputs["mask"], inputs["uids"])
        if impl == "verl":
            core = require("verl", inputs["rewards"].device.type)
            adv, _ = core.compute_grpo_outcome_advantage(inputs["rewards"], inputs["mask"].to(inputs["rewards"].dtype),
                                                         inputs["uids_np"])
            return adv
        if impl == "fastpo":
            import fastpo

            return fastpo.group_advantages(inputs["rewards"], inputs["mask"], group_ids=inputs["ids"])
        raise ValueError(f"unknown impl {impl!r}")


    def outputs(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        return {"adv": self._run(impl, inputs)}

    def compare(self, ref, out, p, device) -> Tuple[bool, str]:
        err = _max_abs(out["adv"], ref["adv"])
        return err <= 1e-4, f"adv err {err:.1e}"
