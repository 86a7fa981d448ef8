"""Drop-in fastpo for TRL 1.15-1.16: ``FastpoGRPOTrainer``, ``FastpoRLOOTrainer``, ``FastpoDPOTrainer``,
``FastpoKTOTrainer`` and their mixins.

Use the ready classes in place of TRL's (same arguments), or put the mixin first in your own subclass::

    from fastpo.integrations.trl import FastpoGRPOMixin, FastpoGRPOTrainer
    trainer = FastpoGRPOTrainer(model="path/to/model", reward_funcs=reward, args=GRPOConfig(...))
    class MyTrainer(FastpoGRPOMixin, MyGRPOTrainer): ...

What fastpo serves:

* every trainer: TRL's fused LM head (``model(..., fused_lm_head=True)``) on the policy and the reference
  model through :func:`fastpo.linear_token_logprobs`, scoring the label positions only
  (:mod:`fastpo.integrations.trl_head`, which lists what it hands back to TRL);
* GRPO: ``_compute_loss`` through one :func:`fastpo.policy_loss` call for the loss types grpo, bnpo,
  dr_grpo, dapo, luspo, cispo (``epsilon_high >= 1``), sapo and vespo (without the vLLM ratio), token or
  sequence ratio, ``beta`` with or without ``use_bias_correction_kl`` (sequence ratio: without), ``delta``
  (also below 1 + epsilon_high),
  ``top_entropy_quantile`` / ``off_policy_mask_threshold`` / the vLLM ``importance_sampling_ratio`` as
  per-token weights (``is_weights``; under a sequence ratio only sequence-constant ones);
  the entropy bonus (static or adaptive) and the MoE aux loss stay TRL's terms, on fastpo's entropies;
* RLOO: ``_compute_loss`` as a one-token-per-sequence ``fastpo.policy_loss``.

Everything else (multi-dimensional
advantages under a sequence ratio, the cases above excluded) runs TRL's own ``_compute_loss`` (``super()``),
logged once per reason. The metrics keep TRL's names and its cross-process reductions (computed from detached
tensors as TRL does). Log-ratios are clamped to +-20 before the exponential (fastpo's convention; TRL does not
clamp), so they differ only when |logp - old_logp| > 20. Counts of served and delegated passes are in
:data:`STATS`.

Outside the tested TRL range (:data:`TESTED_TRL`) the classes warn and behave exactly as TRL's. The ready
classes are built on first access (module ``__getattr__``), so importing this module does not import TRL.
"""

from __future__ import annotations

import inspect
import logging
import warnings

import torch

from fastpo.integrations import trl_losses
from fastpo.integrations.trl_head import STATS, head_settings, record_delegation, wrap_fused_lm_head

__all__ = [
    "FastpoGRPOMixin", "FastpoRLOOMixin", "FastpoDPOMixin", "FastpoKTOMixin", "FastpoGRPOTrainer",
    "FastpoRLOOTrainer", "FastpoDPOTrainer", "FastpoKTOTrainer", "TESTED_TRL", "STATS", "trl_supported",
    "wrap_fused_lm_head", "head_settings",
]

logger = logging.getLogger("fastpo.integrations.trl")

TESTED_TRL = ((1, 15), (1, 17))  # [low, high): the TRL versions the parity tests ran against
_PER_TOKEN_KWARGS = ("compute_entropy", "compute_aux_loss", "pixel_values", "token_type_ids")


def _version_tuple(text: str):
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def trl_supported(version: str | None = None) -> bool:
    """True when ``version`` (default: the installed trl's) lies in :data:`TESTED_TRL`."""
    if version is None:
        import trl

        version = trl.__version__
    return TESTED_TRL[0] <= _version_tuple(version) < TESTED_TRL[1]


class _FastpoTRLMixin:
    """Shared by the mixins: the version gate and the LM-head wrapping after TRL's ``__init__``.

    Class attributes (override in a subclass, or set on the instance before training):
    ``fastpo_lm_head`` (wrap the fused head), ``fastpo_loss`` (serve ``_compute_loss``), ``fastpo_compact``
    (score only label positions).
    """

    fastpo_lm_head = True
    fastpo_loss = True
    fastpo_compact = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import trl

        self.fastpo_active = trl_supported(trl.__version__)
        if not self.fastpo_active:
            warnings.warn(f"fastpo.integrations.trl was tested with trl >= {'.'.join(map(str, TESTED_TRL[0]))}, "
                          f"< {'.'.join(map(str, TESTED_TRL[1]))}; trl {trl.__version__} is installed: "
                          f"{type(self).__name__} runs TRL's own code unchanged", stacklevel=2)
            return
        if self.fastpo_lm_head:
            for target in self._fastpo_head_targets():
                wrap_fused_lm_head(target, compact=self.fastpo_compact)

    def _fastpo_head_targets(self):
        """The modules TRL gave a fused head: the policy (its base model under PEFT) and ``ref_model``."""
        from accelerate.utils import is_peft_model

        model = self.accelerator.unwrap_model(self.model)
        targets = [model.get_base_model() if is_peft_model(model) else model]
        if getattr(self, "ref_model", None) is not None:
            targets.append(self.accelerator.unwrap_model(self.ref_model))
        return targets

    _fastpo_attributes: tuple = ()  # trainer attributes ("args.x" for TrainingArguments fields) the loss reads

    def _fastpo_contract(self) -> str | None:
        """None when ``_get_per_token_logps_and_entropies`` has the signature the loss hook calls and the
        trainer has every attribute the hook reads (the runtime contract check)."""
        params = inspect.signature(self._get_per_token_logps_and_entropies).parameters
        missing = [name for name in _PER_TOKEN_KWARGS if name not in params]
        if missing:
            return f"_get_per_token_logps_and_entropies lacks {missing}"
        absent = [name for name in self._fastpo_attributes
                  if not hasattr(self.args if name.startswith("args.") else self, name.removeprefix("args."))]
        return f"the trainer lacks {absent}" if absent else None

    def _fastpo_per_token(self, model, inputs):
        """TRL's own policy pass (the same call as its ``_compute_loss``): (logps, entropies, aux_loss, mask)."""
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        kw = {name: inputs.get(name) for name in ("pixel_values", "image_grid_thw", "num_images",
                                                  "pixel_attention_mask", "spatial_shapes", "num_tiles",
                                                  "image_sizes", "token_type_ids", "mm_token_type_ids",
                                                  "image_position_ids")}
        logps, entropies, aux = self._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1), completion_ids.size(1),
            compute_entropy=True, compute_aux_loss=self.aux_loss_enabled, **kw)
        return logps, entropies, aux

    def _fastpo_global_masked_mean(self, x, mask):
        if x.shape[1] == 1:  # one value per sequence (sequence ratio)
            local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
        else:
            local = torch.stack([(x * mask).sum(), mask.sum().float()])
        totals = self.accelerator.reduce(local, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()


class _FastpoLossMixin(_FastpoTRLMixin):
    """``_compute_loss`` served by ``trl_losses.<name>_loss`` unless ``<name>_delegation`` gives a reason."""

    _fastpo_name = ""

    def _compute_loss(self, model, inputs):
        reason = self._fastpo_loss_reason(inputs)
        if reason is not None:
            record_delegation(f"{self._fastpo_name}_loss", reason)
            return super()._compute_loss(model, inputs)
        return getattr(trl_losses, f"{self._fastpo_name}_loss")(self, model, inputs)

    def _fastpo_loss_reason(self, inputs):
        if not getattr(self, "fastpo_active", False):
            return "fastpo inactive (untested trl version)"
        if not self.fastpo_loss:
            return "fastpo_loss=False"
        return self._fastpo_contract() or getattr(trl_losses, f"{self._fastpo_name}_delegation")(self, inputs)


class FastpoGRPOMixin(_FastpoLossMixin):
    """GRPO: the fused head (policy, old and reference passes) and ``_compute_loss`` by ``fastpo.policy_loss``
    (:mod:`fastpo.integrations.trl_losses` has the mapping and what is delegated)."""

    _fastpo_name = "grpo"
    _fastpo_attributes = (
        "loss_type", "beta", "epsilon_low", "epsilon_high", "importance_sampling_level", "top_entropy_quantile",
        "off_policy_mask_threshold", "use_vllm", "vllm_importance_sampling_correction", "max_completion_length",
        "aux_loss_enabled", "router_aux_loss_coef",
        "_entropy_bonus_enabled", "_metrics", "get_high_entropy_mask", "get_off_policy_mask",
        "get_gamma_weights", "args.delta", "args.use_bias_correction_kl", "args.steps_per_generation",
        "args.sapo_temperature_pos", "args.sapo_temperature_neg", "args.vespo_k_pos", "args.vespo_lambda_pos",
        "args.vespo_k_neg", "args.vespo_lambda_neg", "entropy_coef", "use_adaptive_entropy", "_last_world_entropy",
        "args.entropy_target", "args.entropy_coef_delta", "args.entropy_coef_min", "args.entropy_coef_max")


class FastpoRLOOMixin(_FastpoLossMixin):
    """RLOO: the fused head and ``_compute_loss`` by ``fastpo.policy_loss`` (one token per sequence)."""

    _fastpo_name = "rloo"
    _fastpo_attributes = ("epsilon_low", "epsilon_high", "aux_loss_enabled", "router_aux_loss_coef", "_metrics")


class FastpoDPOMixin(_FastpoTRLMixin):
    """DPO: fastpo serves the reference and policy log-prob passes (the policy's ``is_top1`` /
    ``log_sum_sq_probs`` through ``linear_token_logprobs(outputs=)``, see :mod:`fastpo.integrations.trl_head`).
    The loss stays TRL's: it is ``[B]``-sized, fastpo would not gain there."""


class FastpoKTOMixin(_FastpoTRLMixin):
    """KTO: fastpo serves the policy (log-probs, entropy, mean logits) and reference log-prob passes."""


def _ready(name, mixin, base_name):
    import trl

    base = getattr(trl, base_name)
    return type(name, (mixin, base), {"__doc__": f"TRL's ``{base_name}`` with fastpo ({mixin.__name__})."})


def __getattr__(name):  # the ready classes import TRL lazily
    pairs = {"FastpoGRPOTrainer": (FastpoGRPOMixin, "GRPOTrainer"),
             "FastpoRLOOTrainer": (FastpoRLOOMixin, "RLOOTrainer"),
             "FastpoDPOTrainer": (FastpoDPOMixin, "DPOTrainer"),
             "FastpoKTOTrainer": (FastpoKTOMixin, "KTOTrainer")}
    if name in pairs:
        cls = _ready(name, *pairs[name])
        cls.__module__ = __name__
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
