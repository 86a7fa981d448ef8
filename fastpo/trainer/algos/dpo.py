"""DPO (Rafailov et al. 2023), offline on preference pairs and online on the policy's own samples.

Each pair's sequence log-probs come from ``linear_token_logprobs`` on the response tokens, summed
per response with ``fastpo.sequence_logprobs`` (packed: chosen responses first, then rejected);
the loss is ``fastpo.dpo_loss`` against a frozen reference (the initial policy, refreshable with
``--ref-update-every``). IPO uses length-averaged log-probs, as its paper does.

Offline (``dpo``): pairs from ``--data`` JSONL, ``--prompts-per-step`` pairs per step; ``rpo`` adds
the chosen responses' NLL (``--rpo-alpha``).
Online (``online_dpo``): G responses per prompt; the highest- and lowest-reward responses form the
pair (groups where all rewards tie are skipped)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

import fastpo

from ..batch import make_token_batch, token_logprobs
from .base import Algorithm, Experience


class DPO(Algorithm):
    name = "dpo"
    needs_reference = True

    def __init__(self, trainer):
        super().__init__(trainer)
        self.average = self.cfg.dpo_loss_type == "ipo"

    @torch.no_grad()
    def experience(self, step: int) -> Experience:
        pairs = self.trainer.pairs.sample(self.cfg.prompts_per_step, self.trainer.rng_for(step))
        tok = self.trainer.tokenizer
        encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        prompts = [encode(p.prompt) for p in pairs]
        chosen = [encode(p.chosen) + eos for p in pairs]
        rejected = [encode(p.rejected) + eos for p in pairs]
        return self.pair_experience(prompts, chosen, rejected, {})

    def pair_experience(self, prompts, chosen, rejected, metrics) -> Experience:
        """Pack chosen then rejected responses of the same prompts; score the reference once."""
        if not prompts:
            return Experience(None, {}, metrics, 0)
        batch = make_token_batch(prompts + prompts, chosen + rejected, self.trainer.tokenizer.pad_token_id,
                                 self.trainer.device)
        ref = self.sequence_logp(self.trainer.ref, batch)
        num_tokens = int(batch.attention_mask.sum())
        metrics.setdefault("pairs", float(len(prompts)))
        return Experience(batch, {"ref_logp": ref}, metrics, num_tokens)

    def sequence_logp(self, model, batch) -> torch.Tensor:
        token_logp = token_logprobs(model, batch)
        return fastpo.sequence_logprobs(token_logp, cu_seqlens=batch.cu_seqlens, average=self.average)

    def loss_type_terms(self, token_logp: torch.Tensor, batch) -> dict:
        """What some ``--dpo-loss-type`` s also read: ``sft`` the chosen responses' NLL (one mean over
        their tokens, as RPO's), ``sigmoid_norm`` the response lengths."""
        kind = self.cfg.dpo_loss_type
        half = batch.num_sequences // 2  # chosen responses come first
        if kind == "sft":
            return {"nll": fastpo.nll_loss(token_logp[:int(batch.cu_seqlens[half])])}
        if kind == "sigmoid_norm":
            return {"chosen_lengths": batch.lengths[:half], "rejected_lengths": batch.lengths[half:]}
        return {}

    def dpo_terms(self, token_logp: torch.Tensor, batch) -> dict:
        """Extra ``dpo_loss`` arguments of a variant (RPO's NLL term); plain DPO has none."""
        return {}

    def loss(self, exp: Experience) -> Tuple[torch.Tensor, Dict[str, Optional[float]]]:
        token_logp = token_logprobs(self.trainer.policy, exp.batch)
        seq = fastpo.sequence_logprobs(token_logp, cu_seqlens=exp.batch.cu_seqlens, average=self.average)
        ref = exp.tensors["ref_logp"]
        half = seq.numel() // 2
        out = fastpo.dpo_loss(seq[:half], seq[half:], ref[:half], ref[half:], beta=self.cfg.beta,
                              loss_type=self.cfg.dpo_loss_type, label_smoothing=self.cfg.label_smoothing,
                              **{**self.loss_type_terms(token_logp, exp.batch), **self.dpo_terms(token_logp, exp.batch)})
        m = {k: float(v) for k, v in out.metrics.items()}
        n_tok = max(exp.batch.num_response_tokens, 1)
        # mean per-token log-ratio to the reference over both responses (a k1 estimate of the KL)
        m["kl"] = float((seq.detach() - ref).sum() / n_tok) if not self.average else float((seq.detach() - ref).mean())
        m["clip_frac"] = None
        m.setdefault("entropy", None)
        if "reward_mean" not in exp.metrics:
            m["reward_mean"] = m["reward_accuracy"]
        return out.loss, m


class RPO(DPO):
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"), offline on pairs as ``dpo``:
    the DPO loss plus ``--rpo-alpha`` × the NLL of the chosen responses, one mean over all their
    tokens in the batch (``fastpo.nll_loss``; TRL's normalisation, its ``loss_type=[..., "sft"]``)."""

    name = "rpo"

    def dpo_terms(self, token_logp: torch.Tensor, batch) -> dict:
        chosen_tokens = int(batch.cu_seqlens[batch.cu_seqlens.numel() // 2])  # chosen responses come first
        return {"rpo_alpha": self.cfg.rpo_alpha, "nll": fastpo.nll_loss(token_logp[:chosen_tokens])}


class OnlineDPO(DPO):
    name = "online_dpo"

    @torch.no_grad()
    def experience(self, step: int) -> Experience:
        examples, rollout, rewards, _, term_metrics = self.scored_rollout(step, self.cfg.group_size)
        g = self.cfg.group_size
        prompts, chosen, rejected = [], [], []
        for p in range(len(examples)):
            group = rewards[p * g:(p + 1) * g]
            best, worst = int(group.argmax()), int(group.argmin())
            if group[best] > group[worst]:
                prompts.append(rollout.prompt_ids[p * g])
                chosen.append(rollout.response_ids[p * g + best])
                rejected.append(rollout.response_ids[p * g + worst])
        metrics = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                   "pairs": float(len(prompts)), "response_len": sum(map(len, rollout.response_ids)) / len(rollout),
                   **term_metrics}
        exp = self.pair_experience(prompts, chosen, rejected, metrics)
        exp.num_tokens = rollout.num_tokens
        return exp
