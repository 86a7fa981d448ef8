"""Log-prob benchmark cases: per-token log-probs (and entropy) from logits, and from the lm_head
(the linear path), against the ways frameworks compute them today.

Implementations compared
------------------------
``eager``
    ``torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)``; entropy as
    ``-(p * logp).sum(-1)`` over the full log-softmax. The linear path first builds
    ``hidden @ weight.T``. This is the baseline every ratio is taken against.
``torch.compile``
    ``torch.compile(dynamic=False)`` of the eager function, compiled once per case in warm-up.
``trl`` (peer, when TRL imports)
    TRL's own ``trl.trainer.utils.selective_log_softmax`` (fp32: ``gather − logsumexp`` with the
    logsumexp from a loop over the batch dimension; bf16: a loop over the batch of
    ``log_softmax(row.float())``) and ``entropy_from_logits`` (log-softmax over 128-row chunks).
``flash-attn`` (peer, CUDA only)
    flash-attn's Triton ``cross_entropy_loss(logits, labels)``: per-token loss = ``-logp``
    (no entropy: skipped in entropy cases).
``cce`` (peer, linear path, CUDA only)
    cut-cross-entropy's ``linear_cross_entropy(hidden, weight, labels, reduction="none",
    filter_eps=None)``: ``-logp`` without building the logits; ``filter_eps=None`` turns off its
    gradient filtering, which would otherwise drop small softmax entries (an approximation the
    correctness guard would reject). No entropy: skipped in entropy cases.
``fastpo``
    ``fastpo.token_logprobs`` / ``fastpo.linear_token_logprobs`` (CUDA: Triton; CPU: the CPU path,
    or whatever ``FASTPO_BACKEND`` forces).
``fastpo-inplace``
    ``fastpo.token_logprobs(..., inplace_backward=True)`` in forward+backward cases: the gradient is
    written into the logits buffer.

Logits are shaped ``[B, T, V]`` with ``T = 1024`` tokens per sequence (``B = N / 1024``), the layout
trainers pass; every implementation receives the same tensor. Forward+backward is the backward of
``logp.sum()`` (``logp.sum() + entropy.sum()`` with entropy); every implementation then owns a
leaf ``logits`` (or ``hidden`` and ``weight``) with ``requires_grad=True``.
"""

from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Tuple

import torch

from .harness import MIB, BenchOp, cpu_extra_peak_many, memory_budget_bytes
from .peers import COMPILE, compiled, require

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENS_PER_SEQ = 1024
_REF_CHUNK = 1024  # rows per chunk of the memory-bounded reference
_N_SAMPLE_ROWS = 48  # gradient rows compared exactly (all rows are compared through their norm)


def _esize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def _mode_label(params: Dict[str, Any]) -> str:
    m = "fwd" if params["mode"] == "fwd" else "fwd+bwd"
    return m + (" +entropy" if params.get("entropy") else "")


def _fastpo():
    try:
        import fastpo
    except Exception as exc:
        raise NotImplementedError(f"fastpo not importable: {exc}") from exc
    if not hasattr(fastpo, "token_logprobs") or not hasattr(fastpo, "linear_token_logprobs"):
        raise NotImplementedError("fastpo has no token_logprobs / linear_token_logprobs yet")
    return fastpo


# --------------------------------------------------------------------------------------------
# Baselines, written the way frameworks write them
# --------------------------------------------------------------------------------------------


def eager_logprobs(logits: torch.Tensor, labels: torch.Tensor, return_entropy: bool = False):
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def trl_logprobs(logits: torch.Tensor, labels: torch.Tensor, return_entropy: bool = False):
    """TRL's own functions (the peer): ``selective_log_softmax`` and ``entropy_from_logits``."""
    utils = require("trl", logits.device.type)
    logp = utils.selective_log_softmax(logits, labels)
    if not return_entropy:
        return logp
    return logp, utils.entropy_from_logits(logits)


def flash_attn_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """flash-attn's Triton cross-entropy: its per-token loss is ``lse − logit[label] = −logp``."""
    ce = require("flash-attn", logits.device.type)
    v = logits.shape[-1]
    res = ce.cross_entropy_loss(logits.reshape(-1, v), labels.reshape(-1))
    losses = res[0] if isinstance(res, tuple) else res  # (losses, z_losses) in flash-attn 2.x
    return (-losses).reshape(labels.shape)


def cce_linear_logprobs(hidden, weight, labels) -> torch.Tensor:
    """cut-cross-entropy: per-token ``-logp`` from hidden states and the classifier weight."""
    cce = require("cce", hidden.device.type)
    return -cce.linear_cross_entropy(hidden, weight, labels, reduction="none", filter_eps=None)


def eager_linear_logprobs(hidden, weight, labels, return_entropy: bool = False):
    logits = hidden @ weight.T
    return eager_logprobs(logits, labels, return_entropy)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _split(res, entropy: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if entropy:
        logp, ent = res
        return logp, ent
    return res, None


def _loss(logp: torch.Tensor, ent: Optional[torch.Tensor]) -> torch.Tensor:
    return logp.sum() if ent is None else logp.sum() + ent.sum()


def _sample_rows(n: int) -> torch.Tensor:
    k = min(n, _N_SAMPLE_ROWS)
    return torch.linspace(0, n - 1, k).round().long().unique()


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.detach().double().abs().max().item()
    return _max_abs(a, b) / max(scale, 1e-30)


def _close_scalar(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-30)


# --------------------------------------------------------------------------------------------
# token_logprobs: logits -> log-probs
# --------------------------------------------------------------------------------------------


class TokenLogprobsOp(BenchOp):
    name = "logprobs"
    description = "token log-probs (and entropy) from [B, T, V] logits"

    def cases(self, quick: bool, device: str) -> List[Dict[str, Any]]:
        """A vocabulary sweep (32k / 128k / 152k at a fixed token count), a token-count sweep at 32k
        vocabulary, and entropy cases; quick mode keeps the 32k vocabulary only."""

        def case(n, v, dt, mode, ent=False):
            return {"N": n, "V": v, "dtype": dt, "mode": mode, "entropy": ent}

        out: List[Dict[str, Any]] = []

        def add(c):
            if c not in out:
                out.append(c)

        both = ("fwd", "fwdbwd")
        if device == "cuda":
            if quick:
                for v in (32000, 128256):
                    for m in both:
                        add(case(4096, v, "bfloat16", m))
                for m in both:
                    add(case(4096, 32000, "float32", m))
                add(case(4096, 32000, "bfloat16", "fwdbwd", True))
                return out
            for dt in ("float32", "bfloat16"):
                for v in (32000, 128256, 151936):
                    for m in both:
                        add(case(8192, v, dt, m))
            for n in (2048, 4096, 16384):
                for m in both:
                    add(case(n, 128256, "bfloat16", m))
            for m in both:
                add(case(8192, 128256, "bfloat16", m, True))
            return out
        if quick:
            for m in both:
                add(case(2048, 32000, "float32", m))
            add(case(2048, 32000, "bfloat16", "fwd"))
            add(case(1024, 32000, "float32", "fwdbwd", True))
            return out
        for dt in ("float32", "bfloat16"):
            for v in (32000, 128256, 151936):
                for m in both:
                    add(case(2048, v, dt, m))
        for n in (1024, 4096, 8192):
            for m in both:
                add(case(n, 32000, "float32", m))
        for m in both:
            add(case(2048, 32000, "float32", m, True))
        return out

    def plot_keys(self, p: Dict[str, Any]):
        what = f"{p['dtype']} {_mode_label(p)}"
        return [(f"{what}, N={p['N']} tokens", "vocabulary size V", p["V"]),
                (f"{what}, V={p['V']}", "tokens N", p["N"])]

    def label(self, p: Dict[str, Any]) -> str:
        return f"N={p['N']} V={p['V']} {p['dtype']} {_mode_label(p)}"

    def impls(self, p: Dict[str, Any], device: str) -> List[str]:
        names = ["eager", COMPILE, "trl", "flash-attn", "fastpo"]
        if p["mode"] == "fwdbwd":
            names.append("fastpo-inplace")
        return names

    def skip_reason(self, impl: str, p: Dict[str, Any], device: str) -> Optional[str]:
        if impl == "flash-attn" and p.get("entropy"):
            return "flash-attn's cross-entropy returns no entropy"
        return super().skip_reason(impl, p, device)

    def tiny(self, p: Dict[str, Any]) -> Dict[str, Any]:
        return dict(p, N=64, V=1000)

    # inputs ---------------------------------------------------------------------------------

    def make_inputs(self, p: Dict[str, Any], device: str) -> Dict[str, Any]:
        n, v = p["N"], p["V"]
        t = min(TOKENS_PER_SEQ, n)
        b = n // t
        assert b * t == n, "N must be a multiple of the sequence length"
        g = torch.Generator(device=device).manual_seed(1234 + n + v)
        logits = torch.randn((b, t, v), generator=g, device=device, dtype=DTYPES[p["dtype"]])
        labels = torch.randint(0, v, (b, t), generator=g, device=device)
        return {"logits": logits, "labels": labels}

    def input_bytes(self, p: Dict[str, Any]) -> int:
        return p["N"] * p["V"] * _esize(p["dtype"]) + p["N"] * 8

    # running --------------------------------------------------------------------------------

    def _forward(self, impl: str, p: Dict[str, Any], logits: torch.Tensor, labels: torch.Tensor):
        ent = bool(p.get("entropy"))
        if impl == "eager":
            return _split(eager_logprobs(logits, labels, ent), ent)
        if impl == COMPILE:
            return _split(compiled(eager_logprobs)(logits, labels, ent), ent)
        if impl == "trl":
            return _split(trl_logprobs(logits, labels, ent), ent)
        if impl == "flash-attn":
            return flash_attn_logprobs(logits, labels), None
        if impl in ("fastpo", "fastpo-inplace"):
            fastpo = _fastpo()
            res = fastpo.token_logprobs(
                logits, labels, return_entropy=ent, inplace_backward=(impl == "fastpo-inplace")
            )
            return _split(res, ent)
        raise ValueError(f"unknown impl {impl!r}")

    def make_step(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]):
        labels = inputs["labels"]
        if p["mode"] == "fwd":
            logits = inputs["logits"]

            def step():
                return self._forward(impl, p, logits, labels)

            return step, lambda: None

        logits = inputs["logits"].requires_grad_(True)

        def setup():
            logits.grad = None

        def step():
            logp, ent = self._forward(impl, p, logits, labels)
            _loss(logp, ent).backward()

        return step, setup

    def outputs(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        labels = inputs["labels"]
        if p["mode"] == "fwd":
            with torch.no_grad():
                logp, ent = self._forward(impl, p, inputs["logits"], labels)
            return {"logp": logp.detach(), "entropy": None if ent is None else ent.detach()}
        logits = inputs["logits"]
        if impl == "fastpo-inplace":
            # the backward overwrites the logits: run it on a private copy
            logits = logits.detach().clone()
        logits.requires_grad_(True)
        logits.grad = None
        logp, ent = self._forward(impl, p, logits, labels)
        _loss(logp, ent).backward()
        out = {"logp": logp.detach(), "entropy": None if ent is None else ent.detach()}
        out.update(self._grad_summary(logits.grad, p))
        logits.grad = None
        return out

    @staticmethod
    def _grad_summary(grad: Optional[torch.Tensor], p: Dict[str, Any]) -> Dict[str, Any]:
        if grad is None:
            return {"grad_rows": None, "grad_sumsq": None, "grad_dtype": None}
        flat = grad.reshape(-1, grad.shape[-1])
        rows = _sample_rows(flat.shape[0]).to(flat.device)
        sumsq = 0.0
        for block in flat.split(_REF_CHUNK, dim=0):
            sumsq += block.double().square().sum().item()
        return {"grad_rows": flat[rows].detach().float().cpu(), "grad_sumsq": sumsq, "grad_dtype": str(grad.dtype)}

    def reference(self, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        """Eager math, row block by row block: identical values to ``eager`` without its memory."""
        ent_on = bool(p.get("entropy"))
        logits = inputs["logits"].detach()
        v = logits.shape[-1]
        flat = logits.reshape(-1, v)
        flat_labels = inputs["labels"].reshape(-1)
        logps, ents, grads_sampled = [], [], {}
        sumsq = 0.0
        rows = set(_sample_rows(flat.shape[0]).tolist())
        want_grad = p["mode"] == "fwdbwd"
        for start in range(0, flat.shape[0], _REF_CHUNK):
            block = flat[start:start + _REF_CHUNK].clone().requires_grad_(want_grad)
            lab = flat_labels[start:start + _REF_CHUNK]
            with torch.set_grad_enabled(want_grad):
                logp, ent = _split(eager_logprobs(block, lab, ent_on), ent_on)
                if want_grad:
                    _loss(logp, ent).backward()
            logps.append(logp.detach())
            if ent is not None:
                ents.append(ent.detach())
            if want_grad:
                gblock = block.grad
                sumsq += gblock.double().square().sum().item()
                for r in range(start, start + gblock.shape[0]):
                    if r in rows:
                        grads_sampled[r] = gblock[r - start].float().cpu()
        out = {
            "logp": torch.cat(logps).reshape(inputs["labels"].shape),
            "entropy": torch.cat(ents).reshape(inputs["labels"].shape) if ents else None,
        }
        if want_grad:
            out["grad_rows"] = torch.stack([grads_sampled[r] for r in sorted(grads_sampled)])
            out["grad_sumsq"] = sumsq
            out["grad_dtype"] = str(logits.dtype)
        return out

    def compare(self, ref, out, p, device) -> Tuple[bool, str]:
        bf = p["dtype"] != "float32"
        atol = 1e-2 if bf else 1e-3
        msgs, ok = [], True
        err = _max_abs(out["logp"], ref["logp"])
        msgs.append(f"logp err {err:.1e}")
        ok &= err <= atol + 1e-4 * ref["logp"].abs().max().item()
        if out["logp"].dtype != torch.float32:  # e.g. TRL keeps bf16 logits in bf16
            msgs.append(f"logp returned in {str(out['logp'].dtype).replace('torch.', '')}")
        if p.get("entropy"):
            if out["entropy"] is None:
                return False, "no entropy returned"
            err = _max_abs(out["entropy"], ref["entropy"])
            msgs.append(f"entropy err {err:.1e}")
            ok &= err <= atol + 1e-4 * ref["entropy"].abs().max().item()
        if p["mode"] == "fwdbwd":
            if out.get("grad_rows") is None:
                return False, "no gradient reached the logits"
            if out["grad_dtype"] != ref["grad_dtype"]:
                ok = False
                msgs.append(f"grad dtype {out['grad_dtype']} != {ref['grad_dtype']}")
            gerr = _max_abs(out["grad_rows"], ref["grad_rows"])
            msgs.append(f"grad err {gerr:.1e}")
            ok &= gerr <= (1e-2 if bf else 1e-4)
            ok &= _close_scalar(out["grad_sumsq"], ref["grad_sumsq"], 2e-2 if bf else 1e-3)
        return bool(ok), ", ".join(msgs)

    # sizes ----------------------------------------------------------------------------------

    def estimate_bytes(self, impl: str, p: Dict[str, Any]) -> int:
        n, v = p["N"], p["V"]
        nv4 = n * v * 4
        es = _esize(p["dtype"])
        upcast = nv4 if es != 4 else 0
        t = min(TOKENS_PER_SEQ, n)
        bwd = p["mode"] == "fwdbwd"
        ent = bool(p.get("entropy"))
        grad = n * v * es if bwd else 0
        if impl in ("eager", COMPILE):
            extra = upcast + nv4 + (2 * nv4 if ent else 0) + ((3 * nv4 + upcast + grad) if bwd else 0)
        elif impl == "trl":
            extra = 3 * t * v * 4 + (3 * nv4 + grad if bwd else 0) + (nv4 if ent and bwd else 0)
        else:  # fastpo: O(N) outputs + the gradient (none with inplace_backward)
            extra = (0 if impl == "fastpo-inplace" else grad) + 64 * 1024 * 1024
        return int(1.1 * (self.input_bytes(p) + extra))

    def traffic(self, p: Dict[str, Any]) -> Dict[str, float]:
        # Bytes that must move: forward reads the logits once; forward+backward reads them twice
        # (forward, backward) and writes the gradient once.
        nvb = p["N"] * p["V"] * _esize(p["dtype"])
        return {"bytes": float(nvb if p["mode"] == "fwd" else 3 * nvb)}


# --------------------------------------------------------------------------------------------
# linear_token_logprobs: hidden, lm_head weight -> log-probs
# --------------------------------------------------------------------------------------------


class LinearLogprobsOp(BenchOp):
    name = "linear"
    description = "token log-probs from hidden states and the lm_head weight (never building [N, V])"

    def cases(self, quick: bool, device: str) -> List[Dict[str, Any]]:
        def grid(shapes, entropy_shapes=()):
            out = []
            for shape, ent in [(s, False) for s in shapes] + [(s, True) for s in entropy_shapes]:
                n, d, v, dt = shape
                for mode in ("fwd", "fwdbwd"):
                    out.append({"N": n, "D": d, "V": v, "dtype": dt, "mode": mode, "entropy": ent})
            return out

        if device == "cuda":
            if quick:
                return grid([(8192, 256, 32768, "float32"), (4096, 4096, 128256, "bfloat16")])
            return grid(
                [(8192, 256, 32768, "float32"), (4096, 4096, 128256, "bfloat16"), (8192, 4096, 151936, "bfloat16")],
                [(4096, 4096, 128256, "bfloat16")],
            )
        if quick:
            return [c for c in grid([(1024, 256, 32000, "float32")]) if c["mode"] == "fwdbwd"]
        return grid([(2048, 256, 32000, "float32"), (8192, 256, 32768, "float32"),
                     (2048, 256, 128256, "float32")], [(4096, 256, 32768, "float32")])

    def label(self, p: Dict[str, Any]) -> str:
        return f"linear N={p['N']} D={p['D']} V={p['V']} {p['dtype']} {_mode_label(p)}"

    def impls(self, p: Dict[str, Any], device: str) -> List[str]:
        return ["eager", COMPILE, "cce", "fastpo"]

    def skip_reason(self, impl: str, p: Dict[str, Any], device: str) -> Optional[str]:
        if impl == "cce" and p.get("entropy"):
            return "cut-cross-entropy returns no entropy"
        return super().skip_reason(impl, p, device)

    def plot_keys(self, p: Dict[str, Any]):
        what = f"{p['dtype']} {_mode_label(p)}, D={p['D']}"
        return [(f"{what}, N={p['N']} tokens", "vocabulary size V", p["V"]),
                (f"{what}, V={p['V']}", "tokens N", p["N"])]

    def tiny(self, p: Dict[str, Any]) -> Dict[str, Any]:
        return dict(p, N=64, D=32, V=1000)

    def make_inputs(self, p: Dict[str, Any], device: str) -> Dict[str, Any]:
        n, d, v = p["N"], p["D"], p["V"]
        g = torch.Generator(device=device).manual_seed(4321 + n + d + v)
        dt = DTYPES[p["dtype"]]
        hidden = torch.randn((n, d), generator=g, device=device, dtype=dt)
        weight = torch.randn((v, d), generator=g, device=device, dtype=dt).mul_(d ** -0.5)
        labels = torch.randint(0, v, (n,), generator=g, device=device)
        return {"hidden": hidden, "weight": weight, "labels": labels}

    def input_bytes(self, p: Dict[str, Any]) -> int:
        return (p["N"] + p["V"]) * p["D"] * _esize(p["dtype"]) + p["N"] * 8

    def _forward(self, impl, p, hidden, weight, labels):
        ent = bool(p.get("entropy"))
        if impl == "eager":
            return _split(eager_linear_logprobs(hidden, weight, labels, ent), ent)
        if impl == COMPILE:
            return _split(compiled(eager_linear_logprobs)(hidden, weight, labels, ent), ent)
        if impl == "cce":
            return cce_linear_logprobs(hidden, weight, labels), None
        if impl == "fastpo":
            fastpo = _fastpo()
            return _split(fastpo.linear_token_logprobs(hidden, weight, labels, return_entropy=ent), ent)
        raise ValueError(f"unknown impl {impl!r}")

    def make_step(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]):
        hidden, weight, labels = inputs["hidden"], inputs["weight"], inputs["labels"]
        if p["mode"] == "fwd":
            return (lambda: self._forward(impl, p, hidden, weight, labels)), (lambda: None)
        hidden.requires_grad_(True)
        weight.requires_grad_(True)

        def setup():
            hidden.grad = None
            weight.grad = None

        def step():
            logp, ent = self._forward(impl, p, hidden, weight, labels)
            _loss(logp, ent).backward()

        return step, setup

    def outputs(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        step_inputs = dict(inputs)
        if p["mode"] == "fwd":
            with torch.no_grad():
                logp, ent = self._forward(impl, p, inputs["hidden"], inputs["weight"], inputs["labels"])
            return {"logp": logp.detach(), "entropy": None if ent is None else ent.detach()}
        hidden, weight = step_inputs["hidden"], step_inputs["weight"]
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        hidden.grad = weight.grad = None
        logp, ent = self._forward(impl, p, hidden, weight, inputs["labels"])
        _loss(logp, ent).backward()
        out = {
            "logp": logp.detach(),
            "entropy": None if ent is None else ent.detach(),
            "grad_hidden": None if hidden.grad is None else hidden.grad.detach().clone(),
            "grad_weight": None if weight.grad is None else weight.grad.detach().clone(),
        }
        hidden.grad = weight.grad = None
        return out

    def reference(self, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        """Eager math over row blocks; the weight gradient is summed over the blocks in fp32."""
        ent_on = bool(p.get("entropy"))
        want_grad = p["mode"] == "fwdbwd"
        hidden = inputs["hidden"].detach()
        weight = inputs["weight"].detach().clone().requires_grad_(want_grad)
        labels = inputs["labels"]
        logps, ents, ghs = [], [], []
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad else None
        for start in range(0, hidden.shape[0], _REF_CHUNK):
            h = hidden[start:start + _REF_CHUNK].clone().requires_grad_(want_grad)
            with torch.set_grad_enabled(want_grad):
                logp, ent = _split(eager_linear_logprobs(h, weight, labels[start:start + _REF_CHUNK], ent_on), ent_on)
                if want_grad:
                    _loss(logp, ent).backward()
            logps.append(logp.detach())
            if ent is not None:
                ents.append(ent.detach())
            if want_grad:
                ghs.append(h.grad)
                gw += weight.grad.float()
                weight.grad = None
        out = {"logp": torch.cat(logps), "entropy": torch.cat(ents) if ents else None}
        if want_grad:
            out["grad_hidden"] = torch.cat(ghs)
            out["grad_weight"] = gw
        return out

    def compare(self, ref, out, p, device) -> Tuple[bool, str]:
        bf = p["dtype"] != "float32"
        # fp32 matmuls on a GPU may run in TF32 (the Triton default for tl.dot)
        if bf:
            atol, gtol = 1e-1, 5e-2
        elif device == "cuda":
            atol, gtol = 2e-2, 1e-2
        else:
            atol, gtol = 2e-3, 1e-3
        msgs, ok = [], True
        err = _max_abs(out["logp"], ref["logp"])
        msgs.append(f"logp err {err:.1e}")
        ok &= err <= atol
        if p.get("entropy"):
            if out["entropy"] is None:
                return False, "no entropy returned"
            err = _max_abs(out["entropy"], ref["entropy"])
            msgs.append(f"entropy err {err:.1e}")
            ok &= err <= atol
        if p["mode"] == "fwdbwd":
            for key in ("grad_hidden", "grad_weight"):
                if out.get(key) is None:
                    return False, f"no {key}"
                e = _rel_err(out[key], ref[key])
                msgs.append(f"{key} rel err {e:.1e}")
                ok &= e <= gtol
        return bool(ok), ", ".join(msgs)

    def estimate_bytes(self, impl: str, p: Dict[str, Any]) -> int:
        n, d, v = p["N"], p["D"], p["V"]
        es = _esize(p["dtype"])
        nv4 = n * v * 4
        bwd = p["mode"] == "fwdbwd"
        grads = (n + v) * d * 4 if bwd else 0
        if impl in ("eager", COMPILE):
            upcast = nv4 if es != 4 else 0
            extra = n * v * es + upcast + nv4 + (2 * nv4 if p.get("entropy") else 0)
            if bwd:
                extra += 3 * nv4 + upcast + n * v * es
        else:
            extra = 4 * min(n, 4096) * v * 4 + 256 * 1024 * 1024
        return int(1.1 * (self.input_bytes(p) + extra + grads))

    def traffic(self, p: Dict[str, Any]) -> Dict[str, float]:
        # Useful matmul work: 2·N·D·V forward; forward+backward adds the two gradient matmuls.
        f = 2.0 * p["N"] * p["D"] * p["V"]
        return {"flops": f if p["mode"] == "fwd" else 3 * f}


# --------------------------------------------------------------------------------------------
# The dedicated memory check
# --------------------------------------------------------------------------------------------


MEMORY_CHECK = {"N": 8192, "D": 256, "V": 32768, "dtype": "float32", "mode": "fwdbwd", "entropy": False}
MEMORY_TARGET = 0.15
MEMORY_REPEATS = 3


class LinearMemoryCheck(BenchOp):
    """One forward+backward of linear_token_logprobs at N=8192, D=256, V=32768 fp32 on CPU, against
    eager logits -> log_softmax -> gather; the extra peak RSS of each is measured in a fresh
    subprocess. Target: fastpo <= 15% of eager."""

    name = "linear-memory"
    description = "extra peak RSS of one fwd+bwd of linear_token_logprobs vs eager (CPU)"

    def run_extra(self, args, info) -> List[str]:
        linear = LinearLogprobsOp()
        p = dict(MEMORY_CHECK)
        logits_mib = p["N"] * p["V"] * 4 / MIB
        lines = []
        correct = "not checked"
        if not getattr(args, "no_check", False):
            inputs = linear.make_inputs(p, "cpu")
            try:
                ref = linear.reference(p, inputs)
                out = linear.outputs("fastpo", p, inputs)
                ok, msg = linear.compare(ref, out, p, "cpu")
                correct = ("ok (" if ok else "WRONG (") + msg + ")"
            except NotImplementedError as exc:
                correct = f"unavailable ({exc})"
            except Exception as exc:
                correct = f"FAILED ({type(exc).__name__}: {exc})"
            del inputs
        # RSS peaks move by tens of MiB from run to run (allocator state), so each side is
        # measured MEMORY_REPEATS times, each in a fresh process; the verdict uses the worst case.
        impls = ("eager", "fastpo")
        jobs = [(linear, impl, p, linear.estimate_bytes(impl, p)) for impl in impls for _ in range(MEMORY_REPEATS)]
        flat = cpu_extra_peak_many(jobs, memory_budget_bytes("cpu"), max_parallel=2)
        res: Dict[str, Dict[str, Any]] = {}
        for k, impl in enumerate(impls):
            runs = flat[k * MEMORY_REPEATS:(k + 1) * MEMORY_REPEATS]
            errors = [r["error"] for r in runs if "error" in r]
            if errors:
                res[impl] = {"error": errors[0], "runs": runs}
                continue
            peaks = sorted(r["extra_peak_mib"] for r in runs)
            res[impl] = {"max_mib": peaks[-1], "median_mib": statistics.median(peaks), "min_mib": peaks[0],
                         "method": runs[0]["method"], "runs": runs}
        e, f = res["eager"], res["fastpo"]
        lines.append(
            f"Linear-path memory check (CPU, one forward+backward, N={p['N']} D={p['D']} V={p['V']} fp32; "
            f"the [N, V] fp32 logits alone are {logits_mib:.0f} MiB). Extra peak RSS over {MEMORY_REPEATS} "
            "fresh processes per implementation:"
        )
        lines.append("")
        lines.append("| impl | extra peak RSS MiB, max | median | min | max as % of eager max | % of [N, V] fp32 logits |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        ratio = None
        for impl, r in res.items():
            if "error" in r:
                lines.append(f"| {impl} | {r['error'][:100]} | | | | |")
                continue
            of_eager = "–" if "error" in e else f"{100 * r['max_mib'] / e['max_mib']:.1f}%"
            lines.append(f"| {impl} | {r['max_mib']:.1f} | {r['median_mib']:.1f} | {r['min_mib']:.1f} | "
                         f"{of_eager} | {100 * r['max_mib'] / logits_mib:.1f}% |")
        if "error" not in e and "error" not in f and e["max_mib"] > 0:
            ratio = f["max_mib"] / e["max_mib"]
        lines.append("")
        verdict = "n/a" if ratio is None else ("PASS" if ratio <= MEMORY_TARGET else "FAIL")
        lines.append(
            f"fastpo / eager extra peak (worst fastpo run / worst eager run) = "
            f"{'n/a' if ratio is None else f'{100 * ratio:.1f}%'} (target <= {100 * MEMORY_TARGET:.0f}%): "
            f"**{verdict}**; correctness at this size: {correct}; RSS method: {e.get('method', '?')}."
        )
        self.result = {"params": p, "eager": e, "fastpo": f, "ratio": ratio, "target": MEMORY_TARGET,
                       "verdict": verdict, "correctness": correct, "logits_mib": logits_mib,
                       "repeats": MEMORY_REPEATS}
        return lines
