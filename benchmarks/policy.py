"""Policy-loss benchmark: ``fastpo.policy_loss`` forward+backward for each preset (PPO, GRPO, DAPO,
DR_GRPO, GSPO) against the eager composite that verl / TRL write today.

Implementations compared
------------------------
``eager``
    The preset as verl's ``compute_policy_loss`` (vanilla; ``gspo`` for GSPO) +
    ``kl_penalty("low_var_kl")`` + ``agg_loss`` compute it, written here from their description:
    clamp the log-ratio to ±20, ``exp`` (GSPO: the sequence ratio ``exp(logp − sg(logp) +
    sg(mean Δ))``), the two clipped branches and their max, the dual clip for PPO, the k3 KL clamped
    to ±10 for GRPO, the aggregation, and the metrics verl logs (clip fraction, ppo_kl, ref KL) —
    about 30 small torch ops and a dozen ``[B, T]`` temporaries; the backward is autograd's.
``torch.compile``
    ``torch.compile(dynamic=False)`` of that eager function, compiled once per shape in warm-up.
``verl``
    verl's own ``core_algos.get_policy_loss_fn("vanilla" | "gspo")`` with an ``ActorConfig`` holding
    the preset's clip ranges, plus ``kl_penalty(..., "low_var_kl")`` aggregated by ``agg_loss`` for
    GRPO (verl adds the KL loss to the policy loss in its actor the same way). Conventions: verl's
    vanilla loss always applies the dual clip (``clip_ratio_c``); presets without one get
    ``clip_ratio_c = 1e9`` (no token reaches it). fastpo's ``token_sum_norm`` (DR_GRPO) is verl's
    ``seq-mean-token-sum-norm`` with the padded length as the norm (equal when every sequence has a
    counted token, as here). verl's metric means add 1e-8 to their denominators.
``fastpo``
    ``fastpo.policy_loss(..., config=fastpo.<PRESET>)`` (CUDA: one Triton forward kernel + its
    epilogue and one backward kernel; CPU: one fused C++ pass per sequence).

Surrogate rows (``preset`` = ``verl:<name>``, one per verl 0.9 built-in policy loss): ``verl`` is
``core_algos.get_policy_loss_fn(<name>)`` (token-mean, default ``ActorConfig``; ``dro_beta`` 0.3;
``bypass_mode``: REINFORCE with token IS weights truncated at 2, ``BYPASS_CORRECTION``),
``torch.compile`` is ``torch.compile`` of that same function, and ``fastpo`` is ``fastpo_<name>``
from ``fastpo.integrations.verl`` through the same registry (same signature and metrics, as a verl
run calls it). The guard compares the loss and the gradient with verl's function in float64
(clip_cov's random pick is seeded identically for every implementation).

Inputs are padded ``[B, T]`` float32 tensors with a mask whose rows have random lengths (every row
has counted tokens); the step is forward + ``loss.backward()`` into ``logp`` (metrics included).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from .harness import BenchOp
from .peers import COMPILE, Skip, compiled, require

PRESETS = ("PPO", "GRPO", "DAPO", "DR_GRPO", "GSPO")
VERL_LOSSES = ("vanilla", "dppo_tv", "dppo_kl", "gspo", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean", "dro",
               "cispo", "bypass_mode")
# bypass_mode's row: REINFORCE with token-level IS weights truncated at 2 (verl's rollout_correction defaults)
BYPASS_CORRECTION = dict(loss_type="reinforce", rollout_is="token", rollout_is_threshold=2.0)
VERL_PREFIX = "verl:"


def verl_loss_name(preset: str) -> Optional[str]:
    """``sapo`` for the surrogate row ``verl:sapo``, None for a fastpo preset row."""
    return preset[len(VERL_PREFIX):] if preset.startswith(VERL_PREFIX) else None


_verl_loss_configs: Dict[str, Any] = {}


def verl_loss_config(name: str):
    cfg = _verl_loss_configs.get(name)
    if cfg is None:
        from verl.workers.config import ActorConfig
        from verl.workers.config.actor import PolicyLossConfig as VerlPolicyLossConfig

        kw = {"dro_beta": 0.3} if name == "dro" else {}
        if name == "bypass_mode":
            from verl.trainer.config.algorithm import RolloutCorrectionConfig

            kw["rollout_correction"] = RolloutCorrectionConfig(**BYPASS_CORRECTION)
        cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                          policy_loss=VerlPolicyLossConfig(**kw))
        _verl_loss_configs[name] = cfg
    return cfg


def verl_surrogate_loss(logp, old_logp, advantages, mask, fn, name: str):
    """One of verl's registered policy losses (``fn``: verl's, fastpo's, or a torch.compile of verl's), handed
    the bool ``response_mask`` that verl 0.9's ``ppo_loss`` passes (``data["response_mask"].to(bool)``, made
    once per micro-batch before the loss, so outside the timed step)."""
    return fn(old_log_prob=old_logp, log_prob=logp, advantages=advantages, response_mask=mask,
              loss_agg_mode="token-mean", config=verl_loss_config(name))
_VERL_AGG = {"token_mean": "token-mean", "seq_mean_token_mean": "seq-mean-token-mean",
             "token_sum_norm": "seq-mean-token-sum-norm"}


def preset_knobs(preset: str) -> Dict[str, Any]:
    """The numbers of a fastpo preset as plain Python values (what the eager code is given)."""
    import fastpo

    cfg = getattr(fastpo, preset)
    return {"clip_low": cfg.clip_low, "clip_high": cfg.clip_high, "dual_clip": cfg.dual_clip,
            "kl_coef": cfg.kl_coef, "kl_clamp": cfg.kl_clamp, "aggregation": cfg.aggregation,
            "sequence_ratio": cfg.ratio_level == "sequence"}


def eager_policy_loss(logp, old_logp, advantages, ref_logp, mask, clip_low: float, clip_high: float,
                      dual_clip: Optional[float], kl_coef: float, kl_clamp: float, aggregation: str,
                      sequence_ratio: bool):
    """verl-style clipped policy loss (+ k3 KL), its aggregation and its metrics."""
    m = mask.to(logp.dtype)
    count = m.sum().clamp_min(1.0)

    def masked_mean(x):
        return (x * m).sum() / count

    neg_kl = torch.clamp(logp - old_logp, -20.0, 20.0)
    if sequence_ratio:  # GSPO: s_i = exp(mean_t Δ), token-gradient form
        log_s = (neg_kl * m).sum(-1) / m.sum(-1).clamp_min(1.0)
        ratio = torch.exp(logp - logp.detach() + log_s.detach().unsqueeze(-1))
    else:
        ratio = torch.exp(neg_kl)
    ppo_kl = masked_mean(-neg_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).to(logp.dtype))
    if dual_clip is not None:
        pg_losses3 = -advantages * dual_clip
        pg_losses = torch.where(advantages < 0, torch.minimum(pg_losses3, pg_losses), pg_losses)
    loss_mat = pg_losses
    metrics = {"clip_frac": clipfrac.detach(), "ppo_kl": ppo_kl.detach()}
    if kl_coef != 0.0:
        kl = torch.clamp(ref_logp - logp, -20.0, 20.0)
        kld = torch.clamp(torch.exp(kl) - kl - 1.0, -kl_clamp, kl_clamp)
        loss_mat = loss_mat + kl_coef * kld
        metrics["ref_kl"] = masked_mean(kld).detach()
    if aggregation == "token_mean":
        loss = (loss_mat * m).sum() / count
    elif aggregation == "token_sum_norm":
        loss = (loss_mat * m).sum() / (m.shape[0] * m.shape[-1])
    elif aggregation == "seq_mean_token_mean":
        seq_len = m.sum(-1)
        seq_losses = (loss_mat * m).sum(-1) / seq_len.clamp_min(1.0)
        nonempty = (seq_len > 0).to(logp.dtype)
        loss = (seq_losses * nonempty).sum() / nonempty.sum().clamp_min(1.0)
    else:
        raise ValueError(f"aggregation {aggregation!r} is not benchmarked")
    return loss, metrics


_verl_configs: Dict[str, Any] = {}


def verl_policy_loss(logp, old_logp, advantages, ref_logp, mask, preset: str):
    """verl's own functions for the preset (see the module docstring for the conventions)."""
    core = require("verl", str(logp.device.type))
    k = preset_knobs(preset)
    cfg = _verl_configs.get(preset)
    if cfg is None:
        from verl.workers.config import ActorConfig

        cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                          clip_ratio=k["clip_low"], clip_ratio_low=k["clip_low"], clip_ratio_high=k["clip_high"],
                          clip_ratio_c=k["dual_clip"] if k["dual_clip"] is not None else 1e9,
                          loss_agg_mode=_VERL_AGG[k["aggregation"]])
        _verl_configs[preset] = cfg
    mode = _VERL_AGG[k["aggregation"]]
    m = mask.to(logp.dtype)
    fn = core.get_policy_loss_fn("gspo" if k["sequence_ratio"] else "vanilla")
    loss, raw = fn(old_log_prob=old_logp, log_prob=logp, advantages=advantages, response_mask=m,
                   loss_agg_mode=mode, config=cfg)
    metrics = {"clip_frac": torch.tensor(float(raw["actor/pg_clipfrac"]), dtype=logp.dtype),
               "ppo_kl": torch.as_tensor(raw["actor/ppo_kl"], dtype=logp.dtype).detach()}
    if k["kl_coef"] != 0.0:
        kld = core.kl_penalty(logp, ref_logp, "low_var_kl")
        loss = loss + k["kl_coef"] * core.agg_loss(kld, m, mode)
        metrics["ref_kl"] = ((kld * m).sum() / m.sum()).detach()
    return loss, metrics


class PolicyLossOp(BenchOp):
    memory_in_quick_cpu = False  # a few MiB; measured in full mode
    name = "policy"
    description = "policy_loss fwd+bwd for each preset, padded [B, T] fp32"

    def cases(self, quick: bool, device: str) -> List[Dict[str, Any]]:
        if quick:
            grid = [("GRPO", 8, 512)] + [(p, 16, 2048) for p in PRESETS] + [(VERL_PREFIX + "sapo", 8, 512)]
        elif device == "cuda":
            grid = [("GRPO", 16, 1024), ("GRPO", 64, 2048)] + [(p, 64, 8192) for p in PRESETS] + [("GRPO", 256, 8192)]
            grid += [(VERL_PREFIX + n, 64, 8192) for n in VERL_LOSSES]
        else:
            grid = [("GRPO", 16, 1024), ("GRPO", 64, 2048)] + [(p, 64, 8192) for p in PRESETS]
            grid += [(VERL_PREFIX + n, 64, 8192) for n in VERL_LOSSES]
        return [{"preset": p, "B": b, "T": t, "dtype": "float32", "mode": "fwdbwd"} for p, b, t in grid]

    def label(self, p: Dict[str, Any]) -> str:
        return f"{p['preset']} B={p['B']} T={p['T']} fwd+bwd"

    def impls(self, p: Dict[str, Any], device: str) -> List[str]:
        if verl_loss_name(p["preset"]):
            return ["verl", COMPILE, "fastpo"]  # torch.compile of verl's function
        return ["eager", COMPILE, "verl", "fastpo"]

    def case_baseline(self, p: Dict[str, Any]) -> str:
        return "verl" if verl_loss_name(p["preset"]) else self.baseline()  # surrogate rows: x verl's eager time

    def plot_keys(self, p: Dict[str, Any]):
        return [(f"{p['preset']} fwd+bwd", "tokens B·T", p["B"] * p["T"])]

    def tiny(self, p: Dict[str, Any]) -> Dict[str, Any]:
        return dict(p, B=2, T=64)

    def make_inputs(self, p: Dict[str, Any], device: str) -> Dict[str, Any]:
        b, t = p["B"], p["T"]
        g = torch.Generator(device=device).manual_seed(4321 + b + t)
        logp = -torch.rand((b, t), generator=g, device=device) * 3
        lengths = torch.randint(t // 4, t + 1, (b, 1), generator=g, device=device)
        old = logp + 0.2 * torch.randn((b, t), generator=g, device=device)
        if verl_loss_name(p["preset"]):  # DPPO reads probabilities: old log-probs < 0
            old = old.clamp(max=-1e-3)
        return {
            "logp": logp,
            "old_logp": old,
            "ref_logp": logp + 0.2 * torch.randn((b, t), generator=g, device=device),
            "advantages": torch.randn((b, 1), generator=g, device=device).expand(b, t).contiguous(),
            "mask": torch.arange(t, device=device)[None, :] < lengths,
        }

    def input_bytes(self, p: Dict[str, Any]) -> int:
        return p["B"] * p["T"] * (4 * 4 + 1)

    def estimate_bytes(self, impl: str, p: Dict[str, Any]) -> int:
        n = p["B"] * p["T"]
        return self.input_bytes(p) + n * 4 * (30 if impl != "fastpo" else 6)

    def _loss(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any], logp: torch.Tensor):
        preset = p["preset"]
        name = verl_loss_name(preset)
        if name is not None:
            core = require("verl", str(logp.device.type))
            if impl == "fastpo":
                import fastpo.integrations.verl  # noqa: F401  (registers fastpo_<name>)
            fn = core.get_policy_loss_fn(("fastpo_" if impl == "fastpo" else "") + name)
            if impl == COMPILE:
                fn = compiled(fn)
            elif impl not in ("verl", "fastpo"):
                raise ValueError(f"unknown impl {impl!r}")
            return verl_surrogate_loss(logp, inputs["old_logp"], inputs["advantages"], inputs["mask"], fn, name)
        args = (inputs["old_logp"], inputs["advantages"], inputs["ref_logp"], inputs["mask"])
        if impl == "fastpo":
            import fastpo

            out = fastpo.policy_loss(logp, inputs["old_logp"], inputs["advantages"], inputs["mask"],
                                     ref_logp=inputs["ref_logp"], config=getattr(fastpo, preset))
            return out.loss, out.metrics
        if impl == "verl":
            return verl_policy_loss(logp, *args, preset=preset)
        k = preset_knobs(preset)
        if impl == "eager":
            return eager_policy_loss(logp, *args, **k)
        if impl == COMPILE:
            return compiled(eager_policy_loss)(logp, *args, **k)
        raise ValueError(f"unknown impl {impl!r}")

    def make_step(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]):
        logp = inputs["logp"].detach().clone().requires_grad_(True)

        def setup():
            logp.grad = None

        def step():
            loss, _ = self._loss(impl, p, inputs, logp)
            loss.backward()

        return step, setup

    def _metric_keys(self, p: Dict[str, Any]) -> Tuple[str, ...]:
        if verl_loss_name(p["preset"]):
            return ()  # verl's own keys per loss (the parity tests compare them)
        return ("clip_frac", "ppo_kl") + (("ref_kl",) if preset_knobs(p["preset"])["kl_coef"] else ())

    def outputs(self, impl: str, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        logp = inputs["logp"].detach().clone().requires_grad_(True)
        torch.manual_seed(1234)  # clip_cov's random pick: the same draw for every implementation
        loss, metrics = self._loss(impl, p, inputs, logp)
        loss.backward()
        missing = [k for k in self._metric_keys(p) if k not in metrics]
        if missing:
            raise Skip(f"{impl} returns no {', '.join(missing)}")
        return {"loss": loss.detach(), "grad": logp.grad, **{k: metrics[k] for k in self._metric_keys(p)}}

    def reference(self, p: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        """Eager in float64."""
        d = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
        logp = d["logp"].clone().requires_grad_(True)
        name = verl_loss_name(p["preset"])
        if name is not None:  # verl's own function, eager, in float64
            torch.manual_seed(1234)
            fn = require("verl", str(logp.device.type)).get_policy_loss_fn(name)
            loss, _ = verl_surrogate_loss(logp, d["old_logp"], d["advantages"], d["mask"], fn, name)
            loss.backward()
            return {"loss": loss.detach(), "grad": logp.grad}
        loss, metrics = eager_policy_loss(logp, d["old_logp"], d["advantages"], d["ref_logp"], d["mask"],
                                          **preset_knobs(p["preset"]))
        loss.backward()
        return {"loss": loss.detach(), "grad": logp.grad, **{k: metrics[k] for k in self._metric_keys(p)}}

    def compare(self, ref, out, p, device) -> Tuple[bool, str]:
        errs = {k: (torch.as_tensor(out[k]).double().cpu() - ref[k].cpu()).abs().max().item() for k in ref}
        scale = ref["grad"].abs().max().item()
        loss_tol = 1e-5 * (1.0 + ref["loss"].abs().item())
        ok = errs["loss"] <= loss_tol and errs["grad"] <= 1e-5 * max(scale, 1e-30) + 1e-9 \
            and all(errs[k] <= 1e-5 for k in self._metric_keys(p))
        return ok, f"loss err {errs['loss']:.1e}, grad err {errs['grad']:.1e}"
