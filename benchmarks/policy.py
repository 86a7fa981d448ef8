"""Policy-loss benchmark: ``fastpo.policy_loss`` forward+backward against the eager composite that
verl / TRL write today.

Implementations compared
------------------------
``eager``
    GRPO as verl's ``compute_policy_loss`` + ``kl_penalty("low_var_kl")`` + ``agg_loss`` compute it
    (written here from their description): clamp the log-ratio to ±20, ``exp``, the two clipped
    branches and their max, the k3 KL clamped to ±10, ``seq-mean-token-mean`` aggregation, and the
    metrics verl logs (clip fraction, ppo_kl, ref KL, ratio mean) — about 30 small torch ops and a
    dozen ``[B, T]`` temporaries; the backward is autograd's.
``compiled``
    ``torch.compile`` of the same function (CUDA only: on CPU its compile time dominates short runs).
``fastpo``
    ``fastpo.policy_loss(..., config=fastpo.GRPO)`` (CUDA: one Triton forward kernel + its epilogue and
    one backward kernel; CPU: one fused C++ pass per sequence, ``fastpo._C.token_loss_forward``).

Inputs are padded ``[B, T]`` float32 tensors with a mask whose rows have random lengths; the step is
forward + ``loss.backward()`` into ``logp`` (the metrics are computed too).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from .harness import BenchOp

CLIP, KL_COEF = 0.2, 0.04


def eager_grpo_loss(logp, old_logp, advantages, ref_logp, mask):
    """verl-style GRPO loss: token-level clipped ratio + k3 KL, seq-mean-token-mean, verl's metrics."""
    m = mask.float()

    def masked_mean(x):
        return (x * m).sum() / m.sum().clamp_min(1.0)

    neg_kl = torch.clamp(logp - old_logp, -20.0, 20.0)
    ratio = torch.exp(neg_kl)
    ppo_kl = masked_mean(-neg_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - CLIP, 1.0 + CLIP)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float())
    kl = torch.clamp(ref_logp - logp, -20.0, 20.0)
    kld = torch.clamp(torch.exp(kl) - kl - 1.0, -10.0, 10.0)
    loss_mat = pg_losses + KL_COEF * kld
    seq_len = m.sum(-1)
    seq_losses = (loss_mat * m).sum(-1) / seq_len.clamp_min(1.0)
    nonempty = (seq_len > 0).float()
    loss = (seq_losses * nonempty).sum() / nonempty.sum().clamp_min(1.0)
    metrics = {"clip_frac": clipfrac.detach(), "ppo_kl": ppo_kl.detach(), "ref_kl": masked_mean(kld).detach(),
               "ratio_mean": masked_mean(ratio).detach()}
    return loss, metrics


_compiled = None


def _compiled_loss():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(eager_grpo_loss)
    return _compiled


class PolicyLossOp(BenchOp):
    name = "policy"
    description = "policy_loss fwd+bwd (GRPO: clip 0.2, k3 KL 0.04, seq_mean_token_mean), padded [B, T] fp32"

    def cases(self, quick: bool, device: str) -> List[Dict[str, Any]]:
        if quick:
            shapes = [(8, 512), (16, 2048)]
        else:
            shapes = [(16, 1024), (64, 8192)]
        return [{"B": b, "T": t, "dtype": "float32", "mode": "fwdbwd"} for b, t in shapes]

    def label(self, p: Dict[str, Any]) -> str:
        return f"B={p['B']} T={p['T']} fwd+bwd"

    def impls(self, p: Dict[str, Any], device: str) -> List[str]:
        return ["eager", "compiled", "fastpo"] if device == "cuda" else ["eager", "fastpo"]

    def tiny(self, p: Dict[str, Any]) -> Dict[str, Any]:
        return dict(p, B=2, T=64)

    def make_inputs(self, p: Dict[str, Any], device: str) -> Dict[str, Any]:
        b, t = p["B"], p["T"]
        g = torch.Generator(device=device).manual_seed(4321 + b + t)
        logp = -torch.rand((b, t), generator=g, device=device) * 3
        lengths = torch.randint(t // 4, t + 1, (b, 1), generator=g, device=device)
        return {
            "logp": logp,
            "old_logp": logp + 0.2 * torch.randn((b, t), generator=g, device=device),
            "ref_logp": logp + 0.2 * torch.randn((b, t), generator=g, device=device),
            "advantages": torch.randn((b, 1), generator=g, device=device).expand(b, t).contiguous(),
            "mask": torch.arange(t, device=device)[None, :] < lengths,
        }

    def input_bytes(self, p: Dict[str, Any]) -> int:
        return p["B"] * p["T"] * (4 * 4 + 1)

    def estimate_bytes(self, impl: str, p: Dict[str, Any]) -> int:
        n = p["B"] * p["T"]
        return self.input_bytes(p) + n * 4 * (30 if impl != "fastpo" else 6)

    def _loss(self, impl: str, inputs: Dict[str, Any], logp: torch.Tensor):
        args = (inputs["old_logp"], inputs["advantages"])
        if impl == "fastpo":
            import fastpo

            out = fastpo.policy_loss(logp, *args, inputs["mask"], ref_logp=inputs["ref_logp"], config=fastpo.GRPO)
            return out.loss, out.metrics
        fn = eager_grpo_loss if impl == "eager" else _compiled_loss()
        return fn(logp, *args, inputs["ref_logp"], inputs["mask"])

    def make_step(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]):
        logp = inputs["logp"].detach().clone().requires_grad_(True)

        def setup():
            logp.grad = None

        def step():
            loss, _ = self._loss(impl, inputs, logp)
            loss.backward()

        return step, setup

    def outputs(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        logp = inputs["logp"].detach().clone().requires_grad_(True)
        loss, metrics = self._loss(impl, inputs, logp)
        loss.backward()
        return {"loss": loss.detach(), "grad": logp.grad, **{k: metrics[k] for k in ("clip_frac", "ppo_kl", "ref_kl")}}

    def reference(self, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        """Eager in float64."""
        d = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
        logp = d["logp"].clone().requires_grad_(True)
        loss, metrics = eager_grpo_loss(logp, d["old_logp"], d["advantages"], d["ref_logp"], d["mask"])
        loss.backward()
        return {"loss": loss.detach(), "grad": logp.grad, **{k: metrics[k] for k in ("clip_frac", "ppo_kl", "ref_kl")}}

    def compare(self, ref, out, p, device) -> Tuple[bool, str]:
        errs = {k: (out[k].double().cpu() - ref[k].cpu()).abs().max().item() for k in ref}
        scale = ref["grad"].abs().max().item()
        ok = errs["loss"] <= 1e-5 and errs["grad"] <= 1e-5 * max(scale, 1e-30) + 1e-9 \
            and all(errs[k] <= 1e-5 for k in ("clip_frac", "ppo_kl", "ref_kl"))
        return ok, f"loss err {errs['loss']:.1e}, grad err {errs['grad']:.1e}"
