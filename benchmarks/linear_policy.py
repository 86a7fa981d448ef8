"""Hidden states → policy loss against the three lm_head GEMMs it cannot avoid (issue 19's table).

``python -m benchmarks.linear_policy [--heads 512x32768x512,896x151936x512] [--threads 1] [--no-memory]``

One forward + backward into the hidden states and the lm_head weight (float32), per implementation:

``3-gemm``            the GEMMs alone: logits h·Wᵀ, ∂h = G·W, ∂W = Gᵀ·h (G a fixed [N, V] tensor)
``eager``             h·Wᵀ → log_softmax → gather → the eager GRPO loss (benchmarks.fused)
``trl``               TRL 1.16's ``ChunkedLogProbFunction`` (its own chunk size) → the same eager loss
``liger``             Liger-Kernel's chunked ``LigerFusedLinearGRPOLoss`` (uncompiled on CPU)
``fastpo``            ``policy_loss(linear_token_logprobs(...))``: four GEMMs
``fastpo-linear``     ``linear_policy_loss``: three GEMMs on its one-pass path

GRPO cases (clip 0.2, k3 KL 0.04, seq-mean-token-mean) run every implementation, checked against
float64 eager; DAPO and CISPO cases run the fastpo ones, checked against ``fastpo.reference``.
Times are medians of interleaved repeats in one process, reported as multiples of ``3-gemm``;
extra peak RSS comes from one fresh subprocess per implementation, reported as a share of eager's.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Tuple

import torch

from .fused import LinearGrpoOp
from .harness import device_info, git_commit, header_lines, run_op
from .peers import require
from .policy import eager_policy_loss, preset_knobs

GEMM3 = "3-gemm"
FASTPO_IMPLS = ["fastpo", "fastpo-linear"]
CONFIGS = ("GRPO", "DAPO", "CISPO")
DEFAULT_HEADS = "512x32768x512,512x32768x2048,896x151936x512"


def _config(name: str):
    import fastpo

    return getattr(fastpo, name)


class LinearPolicyOp(LinearGrpoOp):
    name = "linear-policy"
    description = "hidden states → policy loss, fwd+bwd, as a multiple of the three lm_head GEMMs"
    heads: List[Tuple[int, int, int]] = [tuple(int(x) for x in h.split("x")) for h in DEFAULT_HEADS.split(",")]

    def cases(self, quick: bool, device: str) -> List[Dict[str, Any]]:
        dt = "bfloat16" if device == "cuda" else "float32"
        return [{"B": n // 256, "T": 256, "D": d, "V": v, "dtype": dt, "mode": "fwdbwd", "config": c}
                for d, v, n in self.heads for c in CONFIGS]

    def label(self, p: Dict[str, Any]) -> str:
        return f"{p['config']} N={p['B'] * p['T']} D={p['D']} V={p['V']} {p['dtype']} fwd+bwd"

    def impls(self, p: Dict[str, Any], device: str) -> List[str]:
        peers = ["eager", "trl", "liger"] if p["config"] == "GRPO" else []
        return [GEMM3] + peers + FASTPO_IMPLS

    def case_baseline(self, p: Dict[str, Any]) -> str:
        return GEMM3

    def tiny(self, p: Dict[str, Any]) -> Dict[str, Any]:
        return dict(p, B=2, T=16, D=32, V=1000)

    def estimate_bytes(self, impl: str, p: Dict[str, Any]) -> int:
        base = "fastpo" if impl.startswith("fastpo") else ("eager" if impl in (GEMM3, "trl") else impl)
        return super().estimate_bytes(base, p)

    def _loss(self, impl: str, inputs: Dict[str, Any], hidden, weight):
        import fastpo

        labels, old, ref, mask, adv = (inputs[k] for k in ("labels", "old_logp", "ref_logp", "mask", "advantages"))
        config = _config(inputs["config"])
        adv_t = adv[:, None].expand_as(old)
        if impl == "fastpo-linear":
            return fastpo.linear_policy_loss(hidden, weight, labels, old, adv_t, mask, ref_logp=ref,
                                             config=config).loss
        if impl == "fastpo":
            logp = fastpo.linear_token_logprobs(hidden, weight, labels)
            return fastpo.policy_loss(logp, old, adv_t, mask, ref_logp=ref, config=config).loss
        if impl == "trl":
            require("trl", hidden.device.type)
            from trl.kernels.chunked_logprob import ChunkedLogProbFunction
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

            n, d = labels.numel(), hidden.shape[-1]
            logp = ChunkedLogProbFunction.apply(hidden.reshape(n, d), weight, None, labels.reshape(n), 1.0,
                                                _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ())[0].view(labels.shape)
            return eager_policy_loss(logp, old, adv_t, ref, mask, **preset_knobs("GRPO"))[0]
        return super()._loss(impl, inputs, hidden, weight)

    def make_inputs(self, p: Dict[str, Any], device: str) -> Dict[str, Any]:
        inputs = super().make_inputs(p, device)
        inputs["config"] = p["config"]
        if any(impl == GEMM3 for impl in self.impls(p, device)):
            n = p["B"] * p["T"]
            g = torch.Generator(device=device).manual_seed(7)
            inputs["grad_logits"] = torch.randn((n, p["V"]), generator=g, device=device, dtype=inputs["hidden"].dtype)
        return inputs

    def make_step(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]):
        if impl != GEMM3:
            return super().make_step(impl, p, inputs)
        h = inputs["hidden"].reshape(-1, p["D"])
        w, g = inputs["weight"], inputs["grad_logits"]

        def step():
            torch.nn.functional.linear(h, w)
            torch.mm(g, w)
            torch.mm(g.t(), h)

        return step, (lambda: None)

    def outputs(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        if impl == GEMM3:
            return {}
        return super().outputs(impl, p, inputs)

    def reference(self, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        tensors = {k: v for k, v in inputs.items() if k not in ("config", "grad_logits")}
        if p["config"] == "GRPO":
            return super().reference(p, tensors)
        from fastpo import reference

        d = {k: (v.double() if v.is_floating_point() else v) for k, v in tensors.items()}
        hidden, weight = d["hidden"].requires_grad_(True), d["weight"].requires_grad_(True)
        loss = reference.linear_policy_loss(hidden, weight, d["labels"], d["old_logp"],
                                            d["advantages"][:, None].expand_as(d["old_logp"]), d["mask"],
                                            ref_logp=d["ref_logp"], config=_config(p["config"])).loss
        loss.backward()
        return {"loss": loss.detach(), "grad_hidden": hidden.grad, "grad_weight": weight.grad}

    def compare(self, ref, out, p, device) -> Tuple[bool, str]:
        if not out:
            return True, "the GEMMs alone (no loss)"
        return super().compare(ref, out, p, device)


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}x"


def table(records) -> List[str]:
    lines = ["| case | implementation | median ms | × 3-GEMM time | extra peak RSS MiB | × eager's extra peak |",
             "|---|---|---:|---:|---:|---:|"]
    by_case: Dict[str, Dict[str, Any]] = {}
    for r in records:
        by_case.setdefault(r.case, {})[r.impl] = r
    for case, recs in by_case.items():
        base = recs.get(GEMM3)
        base_t = base.timing["median_ms"] if base is not None and base.timing else None
        eager = recs.get("eager")
        eager_m = eager.memory["extra_peak_mib"] if eager is not None and eager.memory else None
        for impl, r in recs.items():
            if r.status != "ok" or not r.timing:
                lines.append(f"| {case} | {impl} | {r.status}: {r.detail} | | | |")
                continue
            t = r.timing["median_ms"]
            m = r.memory["extra_peak_mib"] if r.memory else None
            lines.append(f"| {case} | {impl} | {t:.1f} | {_fmt(t / base_t if base_t else None)} | "
                         f"{'–' if m is None else f'{m:.0f}'} | {_fmt(m / eager_m if m is not None and eager_m else None)} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default=DEFAULT_HEADS, help="DxVxN,... (N a multiple of 256)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--impls", default=None, help="comma-separated subset")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from . import get_op

    op = get_op(LinearPolicyOp.name)
    op.heads = [tuple(int(x) for x in h.split("x")) for h in args.heads.split(",")]
    info = device_info(args.device)
    records = run_op(op, args.device, quick=False, measure_memory=not args.no_memory,
                     impl_filter=args.impls.split(",") if args.impls else None)
    print("\n".join(header_lines(info)))
    print(f"commit {git_commit()}, torch.set_num_threads({args.threads})\n")
    print("\n".join(table(records)))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
