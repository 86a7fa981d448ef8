"""End to end from the policy's hidden states: lm_head → per-token log-probs → GRPO loss, forward +
backward into the hidden states and the lm_head weight. This is what Liger-Kernel's chunked
``LigerFusedLinearGRPOLoss`` fuses, so it is where Liger is compared.

Implementations compared
------------------------
``eager``
    ``hidden @ weight.T`` → ``log_softmax(float)`` → ``gather`` → the verl-style GRPO loss of
    :func:`benchmarks.policy.eager_policy_loss` (clip 0.2, k3 KL 0.04 clamped ±10,
    seq-mean-token-mean) — the full ``[N, V]`` logits and their log-softmax exist at once.
``torch.compile``
    ``torch.compile(dynamic=False)`` of that whole eager function.
``liger`` (peer, when liger-kernel imports)
    ``LigerFusedLinearGRPOLoss(loss_type="grpo", beta=0.04, epsilon_low=epsilon_high=0.2,
    use_ref_model=True)`` called with the reference and old per-token log-probs; it processes
    ``chunk_size=1`` sequence at a time. ``compiled=False`` on CPU (its chunk functions would
    otherwise be compiled by torch.compile for every new shape; on CUDA it runs compiled, its
    default). Conventions: Liger takes one advantage per sequence (the ``[B]`` vector that the
    other implementations see broadcast over the tokens), its "grpo" mean over sequences divides by
    B (equal to fastpo's mean over sequences with counted tokens here: every row has some), and it
    neither clamps the log-ratio to ±20 nor the KL estimate to ±10 (no input here comes near).
``liger-triton`` (peer, CUDA only)
    ``hidden @ weight.T`` (eager matmul, the full logits) then Liger's Triton
    ``liger_kernel.transformers.grpo_loss.triton_grpo_loss(logits, old, ref, ids, advantages, mask,
    temperature=1.0, beta=0.04, eps_low=eps_high=0.2, loss_type="grpo", reduce=True)``. It expects
    logits for T+1 positions (it drops the last, as a causal LM's logits are shifted): the hidden
    states get one zero row appended per sequence.
``fastpo``
    ``fastpo.linear_token_logprobs`` (chunked, never building ``[N, V]``) then
    ``fastpo.policy_loss(..., config=fastpo.GRPO)``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from .harness import BenchOp
from .peers import COMPILE, compiled, require
from .policy import eager_policy_loss, preset_knobs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def eager_linear_grpo(hidden, weight, labels, old_logp, advantages, ref_logp, mask, clip_low: float,
                      clip_high: float, dual_clip: Optional[float], kl_coef: float, kl_clamp: float,
                      aggregation: str, sequence_ratio: bool):
    logits = hidden @ weight.T
    # float32 math for 16-bit logits, as trainers upcast (float64 stays float64: the reference)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    adv = advantages.unsqueeze(-1).expand_as(logp)
    return eager_policy_loss(logp, old_logp, adv, ref_logp, mask, clip_low, clip_high, dual_clip, kl_coef,
                             kl_clamp, aggregation, sequence_ratio)


class LinearGrpoOp(BenchOp):
    name = "linear-grpo"
    description = ("hidden states → lm_head → log-probs → GRPO loss, fwd+bwd into hidden and weight "
                   "(Liger's fused GRPO loss vs fastpo)")

    def cases(self, quick: bool, device: str) -> List[Dict[str, Any]]:
        if device == "cuda":
            shapes = [(8, 512, 4096, 128256)] if quick else \
                [(8, 512, 4096, 32000), (8, 512, 4096, 128256), (8, 512, 4096, 151936), (16, 1024, 4096, 128256)]
            dt = "bfloat16"
        else:
            shapes = [(4, 256, 256, 32000)] if quick else \
                [(4, 512, 256, 32000), (4, 512, 256, 128256), (8, 1024, 256, 32000)]
            dt = "float32"
        return [{"B": b, "T": t, "D": d, "V": v, "dtype": dt, "mode": "fwdbwd"} for b, t, d, v in shapes]

    def label(self, p: Dict[str, Any]) -> str:
        return f"GRPO B={p['B']} T={p['T']} D={p['D']} V={p['V']} {p['dtype']} fwd+bwd"

    def impls(self, p: Dict[str, Any], device: str) -> List[str]:
        return ["eager", COMPILE, "liger", "liger-triton", "fastpo"]

    def plot_keys(self, p: Dict[str, Any]):
        n = p["B"] * p["T"]
        return [(f"GRPO {p['dtype']} fwd+bwd, N={n} tokens", "vocabulary size V", p["V"]),
                (f"GRPO {p['dtype']} fwd+bwd, V={p['V']}", "tokens N", n)]

    def tiny(self, p: Dict[str, Any]) -> Dict[str, Any]:
        return dict(p, B=2, T=16, D=32, V=1000)

    def make_inputs(self, p: Dict[str, Any], device: str) -> Dict[str, Any]:
        b, t, d, v = p["B"], p["T"], p["D"], p["V"]
        dt = DTYPES[p["dtype"]]
        g = torch.Generator(device=device).manual_seed(99 + b + t + d + v)
        hidden = torch.randn((b, t, d), generator=g, device=device, dtype=dt)
        weight = torch.randn((v, d), generator=g, device=device, dtype=dt).mul_(d ** -0.5)
        labels = torch.randint(0, v, (b, t), generator=g, device=device)
        # log-probs near the policy's own: the rollout and reference differ by small noise
        with torch.no_grad():
            logp = torch.cat([torch.log_softmax((hidden[i] @ weight.T).float(), -1)
                              .gather(-1, labels[i].unsqueeze(-1)).squeeze(-1)[None] for i in range(b)])
        lengths = torch.randint(t // 4, t + 1, (b, 1), generator=g, device=device)
        return {
            "hidden": hidden, "weight": weight, "labels": labels,
            "old_logp": logp + 0.1 * torch.randn((b, t), generator=g, device=device),
            "ref_logp": logp + 0.1 * torch.randn((b, t), generator=g, device=device),
            "advantages": torch.randn((b,), generator=g, device=device),
            "mask": torch.arange(t, device=device)[None, :] < lengths,
        }

    def input_bytes(self, p: Dict[str, Any]) -> int:
        n = p["B"] * p["T"]
        es = 2 if p["dtype"] == "bfloat16" else 4
        return (n + p["V"]) * p["D"] * es + n * (8 + 4 * 3 + 1)

    def estimate_bytes(self, impl: str, p: Dict[str, Any]) -> int:
        n = p["B"] * p["T"]
        nv4 = n * p["V"] * 4
        grads = (n + p["V"]) * p["D"] * 4
        if impl in ("eager", COMPILE):
            extra = 6 * nv4
        elif impl == "liger":
            extra = 4 * p["T"] * p["V"] * 4 + grads
        else:
            extra = 4 * min(n, 4096) * p["V"] * 4
        return int(1.1 * (self.input_bytes(p) + extra + grads) + 128 * 1024 * 1024)

    def _loss(self, impl: str, inputs: Dict[str, Any], hidden, weight):
        labels, old, ref, mask, adv = (inputs[k] for k in ("labels", "old_logp", "ref_logp", "mask", "advantages"))
        if impl == "fastpo":
            import fastpo

            logp = fastpo.linear_token_logprobs(hidden, weight, labels)
            out = fastpo.policy_loss(logp, old, adv[:, None].expand_as(old), mask, ref_logp=ref, config=fastpo.GRPO)
            return out.loss
        if impl == "liger":
            chunked = require("liger", hidden.device.type)
            k = preset_knobs("GRPO")
            loss_fn = chunked.LigerFusedLinearGRPOLoss(
                beta=k["kl_coef"], epsilon_low=k["clip_low"], epsilon_high=k["clip_high"], loss_type="grpo",
                use_ref_model=True, compiled=hidden.device.type == "cuda")
            loss, _ = loss_fn(hidden, weight, labels, mask.to(hidden.dtype), adv,
                              ref_per_token_logps=ref, old_per_token_logps=old)
            return loss
        if impl == "liger-triton":
            require("liger-triton", hidden.device.type)
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss

            k = preset_knobs("GRPO")
            logits = torch.nn.functional.pad(hidden, (0, 0, 0, 1)) @ weight.T  # [B, T + 1, V]
            loss, _ = triton_grpo_loss(logits, old, ref, labels, adv, mask.to(old.dtype), temperature=1.0,
                                       beta=k["kl_coef"], eps_low=k["clip_low"], eps_high=k["clip_high"],
                                       inplace=True, loss_type="grpo", reduce=True)
            return loss
        fn = eager_linear_grpo if impl == "eager" else compiled(eager_linear_grpo) if impl == COMPILE else None
        if fn is None:
            raise ValueError(f"unknown impl {impl!r}")
        return fn(hidden, weight, labels, old, adv, ref, mask, **preset_knobs("GRPO"))[0]

    def make_step(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]):
        hidden = inputs["hidden"].detach().clone().requires_grad_(True)
        weight = inputs["weight"].detach().clone().requires_grad_(True)

        def setup():
            hidden.grad = weight.grad = None

        def step():
            self._loss(impl, inputs, hidden, weight).backward()

        return step, setup

    def outputs(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        hidden = inputs["hidden"].detach().clone().requires_grad_(True)
        weight = inputs["weight"].detach().clone().requires_grad_(True)
        loss = self._loss(impl, inputs, hidden, weight)
        loss.backward()
        return {"loss": loss.detach().float(), "grad_hidden": hidden.grad.float(), "grad_weight": weight.grad.float()}

    def reference(self, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        """Eager, with the matmuls in float64 on CPU (float32 on CUDA, where memory is tighter)."""
        dt = torch.float64 if inputs["hidden"].device.type == "cpu" else torch.float32
        d = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in inputs.items()}
        hidden = d["hidden"].requires_grad_(True)
        weight = d["weight"].requires_grad_(True)
        loss = eager_linear_grpo(hidden, weight, d["labels"], d["old_logp"], d["advantages"], d["ref_logp"],
                                 d["mask"], **preset_knobs("GRPO"))[0]
        loss.backward()
        return {"loss": loss.detach(), "grad_hidden": hidden.grad, "grad_weight": weight.grad}

    def compare(self, ref, out, p, device) -> Tuple[bool, str]:
        bf = p["dtype"] != "float32"
        tol = 5e-2 if bf else (1e-2 if device == "cuda" else 1e-4)  # TF32 matmuls on CUDA
        msgs, ok = [], True
        for key in ("loss", "grad_hidden", "grad_weight"):
            a, b = out[key].double().cpu(), ref[key].double().cpu()
            err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
            msgs.append(f"{key} rel err {err:.1e}")
            ok &= err <= tol
        return bool(ok), ", ".join(msgs)
