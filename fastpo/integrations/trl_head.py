"""fastpo as TRL's fused LM head: ``model(..., labels=, fused_lm_head=True)`` served by
:func:`fastpo.linear_token_logprobs`.

TRL (>= 1.15) installs a per-instance ``model.forward`` (``trl.trainer.utils.add_fused_lm_head``) that, called
with ``fused_lm_head=True``, runs the backbone and returns a ``FusedCausalLMOutput`` of per-token log-probs
(and the fields the trainer asked for when it patched the model) instead of logits. :func:`wrap_fused_lm_head`
wraps that forward: the calls fastpo can serve exactly run the backbone, then ``linear_token_logprobs`` on
the label positions only (compaction: prompt and padding rows cost nothing); every other call goes to TRL's
forward unchanged, and each reason is logged once. The settings (temperature, ``cast_lm_head_to_fp32``, the
requested outputs, softcapping, logit scale, the backbone attribute) are read from TRL's own closure, so the
wrapper never guesses what TRL would have done; if they cannot be read, nothing is wrapped.

Served: ``log_probs``, ``entropy`` (both differentiable), ``mean_logits``, and, where
``linear_token_logprobs`` takes ``outputs=`` (its detached per-token statistics), ``is_top1`` and
``log_sum_sq_probs`` (DPO's and SFT's policy forwards); without it ``mean_logits`` is the closed form
s·(h·mean_v W_v + mean_v b_v)/T and the other two go to TRL. TRL's logit scale s > 0 is folded into the
temperature (T/s). Delegated to TRL: ``final_logit_softcapping`` or a logit scale <= 0, MoE router
logits on transformers < 5.6 (from 5.6 the load-balancing aux loss is TRL's same call), DeepSpeed ZeRO-3
(partitioned head weight) and FSDP2 DTensor weights.

Dtypes, as TRL: the head runs in the autocast dtype when autocast is on (hidden and weight cast to it), in
float32 with ``cast_lm_head_to_fp32``, else in the hidden state's dtype; fastpo itself runs with autocast off.
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
import types
from contextlib import nullcontext
from typing import Optional

import torch

import fastpo

__all__ = ["wrap_fused_lm_head", "head_settings", "STATS", "SERVED_OUTPUTS"]

logger = logging.getLogger("fastpo.integrations.trl")

SERVED_OUTPUTS = frozenset({"log_probs", "entropy", "mean_logits"})
# served as well when fastpo.linear_token_logprobs takes outputs= (its per-token statistics)
STATISTICS = frozenset({"is_top1", "log_sum_sq_probs"})


def _has_statistics() -> bool:
    return "outputs" in inspect.signature(fastpo.linear_token_logprobs).parameters


def served_outputs() -> frozenset:
    """The ``add_fused_lm_head(outputs=...)`` fields fastpo computes in this installation."""
    return SERVED_OUTPUTS | STATISTICS if _has_statistics() else SERVED_OUTPUTS
# Counts of the passes fastpo served and of those it handed back to TRL ("delegated:<what>: <reason>").
STATS: collections.Counter = collections.Counter()
_LOGGED: set = set()
# The names TRL's _fused_forward closes over (trl 1.15 / 1.16) that decide what it computes.
_CLOSURE = ("temperature", "cast_lm_head_to_fp32", "outputs", "final_logit_softcapping", "logit_scale",
            "backbone_attr", "text_config")


def record_delegation(what: str, reason: str) -> None:
    """Count a pass handed back to TRL and log the reason once per process."""
    STATS[f"delegated:{what}"] += 1
    key = (what, reason)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.warning("fastpo: %s handed back to TRL (%s)", what, reason)


def head_settings(forward) -> Optional[dict]:
    """The settings of TRL's fused forward (a bound ``_fused_forward``), read from its closure; None when
    ``forward`` is not TRL's fused head or lacks one of the expected names (the runtime contract check)."""
    func = getattr(forward, "__func__", None)
    code = getattr(func, "__code__", None)
    # functools.wraps renamed the function; its code object keeps TRL's name
    if code is None or code.co_name != "_fused_forward" or func.__closure__ is None:
        return None
    cells = dict(zip(code.co_freevars, func.__closure__))
    if any(name not in cells for name in _CLOSURE):
        return None
    if any(name not in code.co_varnames for name in ("fused_lm_head", "labels", "shift_labels", "num_items_in_batch")):
        return None
    try:
        return {name: cells[name].cell_contents for name in _CLOSURE}
    except ValueError:  # an empty cell
        return None


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers without the deepspeed integration
        return False
    return bool(is_deepspeed_zero3_enabled())


def _delegation_reason(model, cfg: dict, kwargs: dict) -> Optional[str]:
    extra = set(cfg["outputs"]) - served_outputs()
    if extra:
        return f"outputs {sorted(extra)} are not computed by fastpo yet"
    if cfg["final_logit_softcapping"] is not None:
        return "final_logit_softcapping"
    if not float(cfg["logit_scale"]) > 0.0:
        return f"logit scale {cfg['logit_scale']}"
    if _wants_router_logits(cfg, kwargs) and _router_shape(cfg) is None:
        return "MoE router logits on transformers < 5.6 (TRL's num_experts special cases)"
    weight = model.get_output_embeddings().weight
    if type(weight).__name__ == "DTensor" or _zero3_enabled():
        return "sharded LM head weight (FSDP2 DTensor or DeepSpeed ZeRO-3)"
    return None


def _wants_router_logits(cfg, kwargs) -> bool:
    return bool(kwargs.get("output_router_logits") or getattr(cfg["text_config"], "output_router_logits", False))


def _router_shape(cfg):
    """(num_experts, num_experts_per_tok) as TRL reads them on transformers >= 5.6 (None: older)."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.6.0"):
        return None
    text_config = cfg["text_config"]
    return text_config.num_experts, text_config.num_experts_per_tok


def _head_dtype(hidden: torch.Tensor, cast_fp32: bool) -> torch.dtype:
    if cast_fp32:
        return torch.float32
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


def _serve(model, cfg, compact, args, kwargs, labels, shift_labels, num_items_in_batch):
    from trl.trainer.utils import FusedCausalLMOutput

    kwargs["use_cache"] = False
    if getattr(cfg["text_config"], "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    backbone_out = getattr(model, cfg["backbone_attr"])(*args, **kwargs)
    if shift_labels is None:
        hidden, labels = backbone_out.last_hidden_state[:, :-1], labels[:, 1:]
    else:
        hidden, labels = backbone_out.last_hidden_state, shift_labels
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    mask = labels != -100
    dt = _head_dtype(hidden, cfg["cast_lm_head_to_fp32"])
    outputs = cfg["outputs"]
    with torch.autocast(hidden.device.type, enabled=False) if torch.is_autocast_enabled(hidden.device.type) \
            else nullcontext():
        h = (hidden[mask] if compact else hidden.reshape(-1, hidden.size(-1))).to(dt)
        y = labels[mask] if compact else labels.reshape(-1)
        w = weight.to(dt)
        b = None if bias is None else bias.to(dt)
        # a logit scale s > 0 (Granite, Cohere, Falcon-H1...): z·s/T is the temperature T/s
        temperature = cfg["temperature"] / float(cfg["logit_scale"])
        fields = dict.fromkeys(("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
        if _has_statistics():
            names = ("logp",) + tuple(name for name in outputs if name != "log_probs")
            res = fastpo.linear_token_logprobs(h, w, y, bias=b, temperature=temperature, outputs=names)
            fields.update({name: getattr(res, name) for name in outputs if name != "log_probs"}, log_probs=res.logp)
        else:
            res = fastpo.linear_token_logprobs(h, w, y, bias=b, temperature=temperature,
                                               return_entropy="entropy" in outputs)
            fields["log_probs"], fields["entropy"] = res if "entropy" in outputs else (res, None)
        if "mean_logits" in outputs and fields["mean_logits"] is None:
            with torch.no_grad():
                mean_logits = h.float() @ w.float().mean(0)
                if b is not None:
                    mean_logits = mean_logits + b.float().mean()
                fields["mean_logits"] = (mean_logits * float(cfg["logit_scale"]) / cfg["temperature"]) * (y != -100)

    def place(x):
        if x is None:
            return None
        # masked_scatter keeps an all-masked micro-batch connected to the graph (a differentiable zero)
        return x.new_zeros(mask.shape).masked_scatter(mask, x) if compact else x.view(mask.shape)

    fields = {name: place(x) for name, x in fields.items()}
    log_probs = fields["log_probs"]
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / denom
    aux_loss = None
    if kwargs.get("output_router_logits"):  # TRL's MoE load-balancing loss, the same call
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        num_experts, top_k = _router_shape(cfg)
        aux_loss = load_balancing_loss_func(backbone_out.router_logits, num_experts, top_k,
                                            kwargs.get("attention_mask"))
        loss = loss + getattr(cfg["text_config"], "router_aux_loss_coef", 0.0) * aux_loss
    STATS["served:lm_head"] += 1
    return FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=aux_loss, **fields)


def wrap_fused_lm_head(model, *, compact: bool = True) -> bool:
    """Serve ``model(..., fused_lm_head=True)`` with fastpo where exact; returns False (and changes nothing)
    when ``model.forward`` is not TRL's fused head.

    ``model`` is the module TRL patched (``PreTrainedModel``; unwrap DDP/accelerate wrappers first).
    ``compact=False`` scores every position (labels -100 give 0), for static-shape compilers.
    Idempotent: a model already wrapped is left as it is.
    """
    if getattr(model, "_fastpo_trl_forward", None) is not None:
        return True
    trl_forward = model.forward
    cfg = head_settings(trl_forward)
    if cfg is None:
        record_delegation("lm_head", "model.forward is not TRL's fused head (contract check failed)")
        return False

    @functools.wraps(type(model).forward)
    def _fastpo_fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                              num_items_in_batch=None, **kwargs):
        if fused_lm_head:
            reason = _delegation_reason(self, cfg, kwargs)
            if reason is None:
                return _serve(self, cfg, compact, args, kwargs, labels, shift_labels, num_items_in_batch)
            record_delegation("lm_head", reason)
        return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                           num_items_in_batch=num_items_in_batch, **kwargs)

    model.forward = types.MethodType(_fastpo_fused_forward, model)
    model._fastpo_trl_forward = trl_forward
    return True
