"""Rollout with ``transformers``' ``generate``, on the training model itself (CPU or GPU).

The sampled-token log-probs come from the processed scores ``generate`` samples from (temperature,
then top-k / top-p filtering, renormalised): ``rollout_logp = log_softmax(processed_scores)[token]``.
With ``top_p = 1`` and ``top_k = 0`` that is ``log_softmax(z / τ)``, exactly what the trainer's
``linear_token_logprobs(..., temperature=τ)`` computes, so the two agree to rounding."""

from __future__ import annotations

from typing import List

import torch

from .base import Rollout, RolloutEngine, SamplingSettings, cut_at_eos, eos_ids_of


class HFGenerateRollout(RolloutEngine):
    """Samples with ``model.generate``; the model is the one being trained, so weights are always
    current. ``batch_size`` caps the prompts per ``generate`` call (memory)."""

    name = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int = 64, full_weights=None,
                 synced: bool = False):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before rollout")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        # FSDP2: ``full_weights`` is the fully_shard root whose own parameters (embeddings, lm_head)
        # are gathered around generation (the sharded layers gather theirs in their forward), and
        # ``synced`` keeps every rank stepping until all are done (generate's synced_gpus).
        self.full_weights = full_weights
        self.synced = synced
        self.eos_ids = eos_ids_of(model, tokenizer)

    @torch.no_grad()
    def generate(self, prompts: List[str], settings: SamplingSettings) -> Rollout:
        out = Rollout([], [], [], [], [], [])
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(settings.seed)  # the sample depends on the seed only, not on earlier calls
        if self.full_weights is not None:
            self.full_weights.unshard()
        try:
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start:start + self.batch_size]
                self._generate_chunk(chunk, start, settings, device, out)
        finally:
            if self.full_weights is not None:
                self.full_weights.reshard()
            torch.random.set_rng_state(generator_state)
            self.model.train(was_training)
        return out

    def _generate_chunk(self, prompts, first_index, s: SamplingSettings, device, out: Rollout) -> None:
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"  # generation continues every row from the same position
        try:
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        input_ids = enc["input_ids"].to(device)
        attention_mask = enc["attention_mask"].to(device)
        kwargs = dict(max_new_tokens=s.max_new_tokens, pad_token_id=tok.pad_token_id,
                      eos_token_id=sorted(self.eos_ids), return_dict_in_generate=True, output_scores=True,
                      synced_gpus=self.synced)
        if s.greedy:
            kwargs.update(do_sample=False, num_return_sequences=s.n)
        else:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                          num_return_sequences=s.n)
        gen = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        prompt_len = input_ids.shape[1]
        new_tokens = gen.sequences[:, prompt_len:]                       # [P·n, steps]
        # scores: one [P·n, V] per generated position, after temperature / top-k / top-p; gathered one
        # position at a time so no [P·n, steps, V] tensor is built.
        logp = torch.stack([torch.log_softmax(sc.float(), dim=-1).gather(-1, new_tokens[:, i, None]).squeeze(-1)
                            for i, sc in enumerate(gen.scores)], dim=1)  # [P·n, steps]
        for row in range(new_tokens.shape[0]):
            p = row // s.n
            ids = input_ids[p][attention_mask[p].bool()].tolist()
            response, finished = cut_at_eos(new_tokens[row].tolist(), self.eos_ids, tok.pad_token_id)
            out.prompt_ids.append(ids)
            out.response_ids.append(response)
            out.rollout_logp.append(logp[row, :len(response)].tolist())
            out.completions.append(tok.decode(response, skip_special_tokens=True))
            out.group_index.append(first_index + p)
            out.finished.append(finished)
