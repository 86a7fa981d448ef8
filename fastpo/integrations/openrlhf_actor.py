"""OpenRLHF 0.11's ``Actor.forward`` log-probs (and entropy) served by :func:`fastpo.linear_token_logprobs`.

OpenRLHF's forward runs the whole HF CausalLM, so the ``[B, S, V]`` logits are built, cast to float32 and
divided by the temperature τ; then ``log_probs = log_probs_from_logits(logits, roll(sequences, -1))[:, :-1]``
(``log p(s_{t+1} | s_≤t)`` at z/τ), ``entropy = compute_entropy(logits)[:, :-1]`` when ``return_entropy``, and
with ``action_mask [B, A]`` the last A columns times the mask. :func:`fastpo_forward` runs the backbone only
(the same ``position_ids`` from the attention mask) and the head through ``linear_token_logprobs``, so no
logits are built. With an ``action_mask`` and no entropy only the action tokens are scored (compaction:
the prompt and the padding cost nothing; the other entries are 0, as OpenRLHF's product with the mask).

Sample packing (``packing_samples=True`` without ring attention) is served: fastpo unpads the ``[B, S]`` batch
itself (no flash-attn import), runs the backbone on the ``(1, M)`` packed row with each sample's position ids
and no attention mask, as OpenRLHF does, and scores the packed tokens; the results come back in the
``[B, S - 1]`` layout with 0 at padding (OpenRLHF's ``pad_input``), entropy included.

``return_output=True`` gives a ``CausalLMOutputWithPast`` with ``logits=None`` (the backbone's
``past_key_values`` / ``hidden_states`` / ``attentions``) and ``.entropy`` set as OpenRLHF sets it; the PPO
actor, SFT and DPO trainers read only ``entropy`` and ``aux_loss`` from it.

Handed back to OpenRLHF's own forward (logged once, counted in ``fastpo.integrations.openrlhf.STATS``):
a call that wants the logits (no ``action_mask`` and no ``return_logprobs``), ring attention
(``ring_attn_group``: flash-attn's ring kernels and the sequence-parallel all-gather), VLMs and multimodal inputs, MoE router logits (``aux_loss``), model types outside
:data:`PLAIN_HEAD_TYPES` (whose CausalLM head is exactly ``lm_head(hidden)``: no softcapping or logit scale),
an lm_head that is not a plain ``nn.Linear`` (LoRA on the head), a DeepSpeed ZeRO-3 partitioned or DTensor
head weight, PEFT adapters other than LoRA, a missing attention mask and a temperature that is not a
positive real.
"""

from __future__ import annotations

from numbers import Real
from typing import Optional

import torch

from fastpo.integrations._head import head_logprobs, is_dtensor

from openrlhf.models.actor import Actor  # noqa: E402  (ImportError where OpenRLHF's actor cannot import)

__all__ = ["fastpo_forward", "install_actor", "uninstall_actor", "actor_installed", "PLAIN_HEAD_TYPES"]

PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_ORIGINAL_FORWARD = Actor.forward


def _parts(actor):
    """(causal LM, backbone, lm_head) of ``actor.model``, or a reason to hand back."""
    model = actor.model
    if hasattr(model, "get_base_model"):  # PEFT
        if any(str(getattr(c, "peft_type", "")).upper().split(".")[-1] != "LORA"
               for c in getattr(model, "peft_config", {}).values()):
            return "a PEFT adapter other than LoRA"
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return f"model_type {getattr(config, 'model_type', None)!r}"
    if getattr(config, "output_router_logits", False):
        return "MoE router logits (aux_loss)"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"lm_head of type {type(head).__name__}"
    if hasattr(head.weight, "ds_id") or is_dtensor(head.weight):
        return "a partitioned lm_head weight (ZeRO-3 / DTensor)"
    backbone = getattr(model, model.base_model_prefix, None)
    if backbone is None:
        return "no backbone attribute"
    return model, backbone, head


def _reason(actor, action_mask, attention_mask, return_logprobs, ring_attn_group, mm_inputs):
    if ring_attn_group is not None:
        return "ring attention (ring_attn_group)"
    if getattr(actor, "is_vlm", False) or mm_inputs:
        return "VLM / multimodal inputs"
    if action_mask is None and not return_logprobs:
        return "the logits were asked for"
    if attention_mask is None:
        return "attention_mask=None"
    t = actor.temperature
    if isinstance(t, bool) or not isinstance(t, Real) or not t > 0:
        return f"temperature {t!r}"
    return None


def _backbone(backbone, sequences, attention_mask, packed: bool):
    """The backbone's hidden states ``[M, D]``, the label of each (``roll(sequences, -1)``) and its flat index
    in ``[B*S]``. Padded: all B*S tokens, OpenRLHF's position ids. Packed (``packing_samples``, OpenRLHF's
    ``unpad_and_slice_tensor`` without ring attention): the M real tokens in one ``(1, M)`` row, each
    sample's position ids restarting at 0, no attention mask (flash-attn's varlen path on GPU; transformers'
    packed-sequence block-diagonal mask from the position ids with sdpa / eager)."""
    rolled = torch.roll(sequences, shifts=-1, dims=1).reshape(-1)
    if packed:
        index = attention_mask.reshape(-1).nonzero().squeeze(1)
        position_ids = torch.clip(attention_mask.long().cumsum(-1) - 1, min=0).reshape(-1)[index].unsqueeze(0)
        out = backbone(input_ids=sequences.reshape(-1)[index].unsqueeze(0), attention_mask=None,
                       position_ids=position_ids, use_cache=False)
        return out, out.last_hidden_state[0], rolled[index], index
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    out = backbone(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state
    return out, hidden.reshape(-1, hidden.size(-1)), rolled, torch.arange(rolled.numel(), device=rolled.device)


def fastpo_forward(self, sequences: torch.LongTensor, action_mask: Optional[torch.Tensor] = None,
                   attention_mask: Optional[torch.Tensor] = None, return_output=False, allgather_logits=False,
                   return_logprobs=False, ring_attn_group=None, packed_seq_lens=None, return_entropy=False,
                   **mm_inputs):
    """OpenRLHF 0.11's ``Actor.forward`` (same signature and returns), its log-probs from fastpo."""
    from fastpo.integrations.openrlhf import STATS, _delegate

    reason = _reason(self, action_mask, attention_mask, return_logprobs, ring_attn_group, mm_inputs)
    parts = _parts(self) if reason is None else reason
    if isinstance(parts, str):
        _delegate("Actor.forward", parts)
        return _ORIGINAL_FORWARD(self, sequences, action_mask, attention_mask, return_output, allgather_logits,
                                 return_logprobs, ring_attn_group, packed_seq_lens, return_entropy, **mm_inputs)
    if return_entropy and not return_output:
        raise ValueError("return_entropy=True needs return_output=True (OpenRLHF asserts the same)")
    batch, seqlen = sequences.shape
    n_act = None if action_mask is None else action_mask.shape[1]
    if n_act is not None and not 0 < n_act < seqlen:
        raise ValueError(f"action_mask {tuple(action_mask.shape)} must have 1..{seqlen - 1} columns for "
                         f"sequences {tuple(sequences.shape)}")
    model, backbone, head = parts
    packed = bool(getattr(self, "packing_samples", False))
    out, hidden, labels, index = _backbone(backbone, sequences, attention_mask, packed)
    # the [B, S] positions scored: OpenRLHF keeps log_probs[:, :-1]; with an action mask and no entropy only
    # the action tokens (compaction: prompt and padding cost nothing, the other entries are 0 as its product)
    want = torch.zeros(batch, seqlen, dtype=torch.bool, device=sequences.device)
    if n_act is not None and not return_entropy:
        want[:, seqlen - 1 - n_act:seqlen - 1] = action_mask.bool()
    else:
        want[:, :-1] = True
    keep = want.reshape(-1)[index]
    rows = index[keep]
    res = head_logprobs(hidden[keep], head.weight, labels[keep], bias=head.bias, temperature=self.temperature,
                        return_entropy=return_entropy)
    lp, ent = res if return_entropy else (res, None)

    def place(x):  # [B, S-1]; positions not scored (and packed padding, as OpenRLHF's pad_input) are 0
        return x.new_zeros(batch * seqlen).scatter(0, rows, x).view(batch, seqlen)[:, :-1]

    log_probs = place(lp)
    entropy = None if ent is None else place(ent)
    if n_act is not None:
        log_probs = log_probs[:, -n_act:] * action_mask.float()
    STATS["served:Actor.forward"] += 1
    output = None
    if return_output:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        output = CausalLMOutputWithPast(logits=None, past_key_values=getattr(out, "past_key_values", None),
                                        hidden_states=getattr(out, "hidden_states", None),
                                        attentions=getattr(out, "attentions", None))
        if entropy is not None:
            setattr(output, "entropy", entropy)
    return (log_probs, output) if return_output else log_probs


def install_actor() -> None:
    """``openrlhf.models.actor.Actor.forward`` becomes :func:`fastpo_forward` (idempotent)."""
    Actor.forward = fastpo_forward


def uninstall_actor() -> None:
    Actor.forward = _ORIGINAL_FORWARD


def actor_installed() -> bool:
    return Actor.forward is fastpo_forward
