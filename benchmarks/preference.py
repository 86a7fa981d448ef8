"""Preference benchmark: token log-probs → per-sequence log-probs → DPO loss, forward+backward.

Implementations compared
------------------------
``eager``
    What TRL's DPOTrainer writes (from its description): padded: ``(logp * mask).sum(-1)`` (or
    ``/ mask.sum(-1)`` for IPO-style averages); packed: a Python loop over the ``cu_seqlens``
    ranges (as packed trainers split the flat batch); then ``-logsigmoid(β·x)`` and the reward metrics.
``torch.compile``
    ``torch.compile(dynamic=False)`` of the eager function, padded layout only: on the packed
    layout dynamo unrolls the Python loop over the sequences (and graph-breaks on
    ``cu_seqlens.tolist()``), compiling for minutes per batch.
``fastpo``
    ``fastpo.sequence_logprobs`` (CUDA: the Triton segment kernels; CPU: the vectorised torch path)
    then ``fastpo.dpo_loss`` with its metrics.

The first half of the batch is the chosen responses, the second the rejected; the reference
sequence log-probs are given. The step is forward + ``loss.backward()`` into the token log-probs.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

from .harness import BenchOp
from .peers import COMPILE, compiled

BETA = 0.1


def _eager_sequences(token_logp, mask, cu_seqlens, average):
    if cu_seqlens is None:
        m = mask.to(token_logp.dtype)
        total = (token_logp * m).sum(-1)
        return total / m.sum(-1).clamp_min(1.0) if average else total
    bounds = cu_seqlens.tolist()
    pieces = [token_logp[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.stack([p.mean() if average and p.numel() else p.sum() for p in pieces])


def eager_dpo(token_logp, mask, cu_seqlens, ref_logp, average):
    seq = _eager_sequences(token_logp, mask, cu_seqlens, average)
    pairs = seq.shape[0] // 2
    chosen, rejected = seq[:pairs] - ref_logp[:pairs], seq[pairs:] - ref_logp[pairs:]
    loss = -F.logsigmoid(BETA * (chosen - rejected)).mean()
    rc, rr = (BETA * chosen).detach(), (BETA * rejected).detach()
    return loss, {"reward_margin": (rc - rr).mean(), "reward_accuracy": (rc > rr).float().mean()}


class SequenceDpoOp(BenchOp):
    memory_in_quick_cpu = False  # a few MiB; measured in full mode
    name = "dpo"
    description = "sequence_logprobs + dpo_loss fwd+bwd from token log-probs (padded with a mask, or packed)"

    def cases(self, quick: bool, device: str) -> List[Dict[str, Any]]:
        shapes = [(16, 1024), (64, 4096)] if quick else [(16, 1024), (64, 4096), (256, 8192)]
        return [{"B": b, "T": t, "layout": layout, "average": layout == "padded"}
                for b, t in shapes for layout in ("padded", "packed")]

    def label(self, p: Dict[str, Any]) -> str:
        return f"B={p['B']} T={p['T']} {p['layout']}{' mean' if p['average'] else ' sum'} fwd+bwd"

    def impls(self, p: Dict[str, Any], device: str) -> List[str]:
        return ["eager", COMPILE, "fastpo"]

    def skip_reason(self, impl: str, p: Dict[str, Any], device: str):
        if impl == COMPILE and p["layout"] == "packed":
            return "not timed: dynamo unrolls the per-sequence Python loop of the packed eager code"
        return super().skip_reason(impl, p, device)

    def plot_keys(self, p: Dict[str, Any]):
        return [(f"{p['layout']} {'mean' if p['average'] else 'sum'} fwd+bwd", "tokens B·T", p["B"] * p["T"])]

    def tiny(self, p: Dict[str, Any]) -> Dict[str, Any]:
        return dict(p, B=4, T=16)

    def make_inputs(self, p: Dict[str, Any], device: str) -> Dict[str, Any]:
        b, t = p["B"], p["T"]
        g = torch.Generator(device=device).manual_seed(77 + b + t)
        lengths = torch.randint(t // 4, t + 1, (b,), generator=g, device=device)
        ref_logp = -torch.rand(b, generator=g, device=device) * t
        if p["layout"] == "padded":
            logp = -torch.rand((b, t), generator=g, device=device) * 3
            mask = torch.arange(t, device=device)[None, :] < lengths[:, None]
            return {"logp": logp, "mask": mask, "cu_seqlens": None, "ref_logp": ref_logp}
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        logp = -torch.rand(int(cu[-1]), generator=g, device=device) * 3
        return {"logp": logp, "mask": None, "cu_seqlens": cu, "ref_logp": ref_logp}

    def input_bytes(self, p: Dict[str, Any]) -> int:
        return p["B"] * p["T"] * 5

    def estimate_bytes(self, impl: str, p: Dict[str, Any]) -> int:
        return self.input_bytes(p) * 4 + 16 * 1024 * 1024

    def _loss(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any], logp: torch.Tensor):
        mask, cu, ref = inputs["mask"], inputs["cu_seqlens"], inputs["ref_logp"]
        if impl == "eager":
            return eager_dpo(logp, mask, cu, ref, p["average"])
        if impl == COMPILE:
            return compiled(eager_dpo)(logp, mask, cu, ref, p["average"])
        import fastpo

        seq = fastpo.sequence_logprobs(logp, mask, cu_seqlens=cu, average=p["average"])
        pairs = seq.shape[0] // 2
        out = fastpo.dpo_loss(seq[:pairs], seq[pairs:], ref[:pairs], ref[pairs:], beta=BETA)
        return out.loss, out.metrics

    def make_step(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]):
        logp = inputs["logp"].detach().clone().requires_grad_(True)

        def setup():
            logp.grad = None

        def step():
            self._loss(impl, p, inputs, logp)[0].backward()

        return step, setup

    def outputs(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        logp = inputs["logp"].detach().clone().requires_grad_(True)
        loss, metrics = self._loss(impl, p, inputs, logp)
        loss.backward()
        return {"loss": loss.detach(), "grad": logp.grad, "reward_margin": metrics["reward_margin"]}

    def reference(self, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        """Eager in float64."""
        d = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in inputs.items()}
        return self.outputs("eager", p, d)

    def compare(self, ref, out, p, device) -> Tuple[bool, str]:
        errs = {k: (out[k].double().cpu() - ref[k].cpu()).abs().max().item() for k in ref}
        scale = max(ref["grad"].abs().max().item(), 1e-30)
        loss_tol = 1e-5 * (1.0 + ref["loss"].abs().item())
        margin_tol = 1e-5 * (1.0 + ref["reward_margin"].abs().item())
        ok = errs["loss"] <= loss_tol and errs["grad"] <= 1e-5 * scale and errs["reward_margin"] <= margin_tol
        return ok, f"loss err {errs['loss']:.1e}, grad err {errs['grad']:.1e}"
