"""Token batches for training: prompt + response sequences, right-padded for the model, with the
response tokens addressed in packed form.

A response token ``t`` of sample ``i`` is scored by the hidden state one position before it, so the
batch keeps, for every response token, the (row, position) of that hidden state and the token id
as its label. The response tokens of all samples, back to back, are the packed layout
(``cu_seqlens [B+1]``) every fastpo op takes: nothing of size ``[B, T, V]`` (or even ``[B, T]``
padding) reaches the losses, and log-probs come from ``linear_token_logprobs`` on ``[N, D]``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

import fastpo

from .packing import decoder_states
from .precision import FULL, Precision, head_operands


@dataclass
class TokenBatch:
    input_ids: torch.Tensor        # [B, L] prompt + response, right-padded
    attention_mask: torch.Tensor   # [B, L]
    rows: torch.Tensor             # [N] batch row of the hidden state that scores each response token
    positions: torch.Tensor        # [N] its position
    labels: torch.Tensor           # [N] the response token ids
    cu_seqlens: torch.Tensor       # [B+1] int64 offsets of each sample's response tokens
    lengths: torch.Tensor          # [B] response lengths

    @property
    def num_sequences(self) -> int:
        return self.lengths.numel()

    @property
    def num_response_tokens(self) -> int:
        return self.labels.numel()

    def per_token(self, values: torch.Tensor) -> torch.Tensor:
        """A per-sample value ``[B]`` repeated over each sample's response tokens -> ``[N]``."""
        return values.repeat_interleave(self.lengths)

    def last_token_index(self) -> torch.Tensor:
        """Index into ``[N]`` of each non-empty sample's last response token (``-1`` for empty ones)."""
        return torch.where(self.lengths > 0, self.cu_seqlens[1:] - 1, torch.full_like(self.lengths, -1))

    def token_span(self, start: int, stop: int) -> Tuple[int, int]:
        """The ``[N]`` range of the response tokens of samples ``start..stop-1``."""
        return int(self.cu_seqlens[start]), int(self.cu_seqlens[stop])

    def select(self, start: int, stop: int) -> "TokenBatch":
        """Samples ``start..stop-1`` as a batch of their own, its padding trimmed to its longest
        sequence (right padding: the kept positions see the same tokens under causal attention)."""
        t0, t1 = self.token_span(start, stop)
        attention_mask = self.attention_mask[start:stop]
        width = int(attention_mask.sum(dim=1).max()) if stop > start else 0
        return TokenBatch(self.input_ids[start:stop, :width], attention_mask[:, :width], self.rows[t0:t1] - start,
                          self.positions[t0:t1], self.labels[t0:t1], self.cu_seqlens[start:stop + 1] - t0,
                          self.lengths[start:stop])


def sequence_chunks(start: int, stop: int, size: Optional[int]) -> List[Tuple[int, int]]:
    """``[start, stop)`` in consecutive ranges of ``size`` samples (the last may be shorter); one
    range when ``size`` is None."""
    if size is None or size >= stop - start:
        return [(start, stop)]
    return [(a, min(a + size, stop)) for a in range(start, stop, size)]


def even_chunks(n: int, parts: int) -> List[Tuple[int, int]]:
    """``[0, n)`` in ``parts`` consecutive ranges whose sizes differ by at most one."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def score_in_chunks(fn: Callable[["TokenBatch"], object], batch: "TokenBatch", size: Optional[int]):
    """``fn(batch)`` (a tensor ``[N]`` or a tuple of them) computed ``size`` samples at a time and
    concatenated: the no-gradient scoring passes (old policy, reference, critic) under
    ``--micro-batch-size``."""
    chunks = sequence_chunks(0, batch.num_sequences, size)
    if len(chunks) == 1:
        return fn(batch)
    outs = [fn(batch.select(a, b)) for a, b in chunks]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def make_token_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                     device: torch.device) -> TokenBatch:
    """Build a :class:`TokenBatch` from token-id lists (one prompt and one response per sample)."""
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses differ in length: {len(prompts)} vs {len(responses)}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the first response token is scored from it)")
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows: List[int] = []
    positions: List[int] = []
    labels: List[int] = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = seqs[i]
        input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, :len(seq)] = 1
        rows += [i] * len(r)
        positions += range(len(p) - 1, len(p) - 1 + len(r))
        labels += r
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    cu = torch.zeros(len(responses) + 1, dtype=torch.long)
    cu[1:] = torch.cumsum(lengths, 0)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)
    return TokenBatch(input_ids.to(device), attention_mask.to(device), as_long(rows), as_long(positions),
                      as_long(labels), cu.to(device), lengths.to(device))


class TokenScorer(torch.nn.Module):
    """A causal LM as ``batch -> log p(response tokens) [N]`` (and entropies): the decoder runs, the
    hidden states that score response tokens are gathered (``[N, D]``) and
    ``fastpo.linear_token_logprobs`` applies the lm_head chunk by chunk, so the ``[B, L, V]`` logits
    never exist. Everything happens inside ``forward``, so DDP and FSDP wrap this module as usual.
    ``top_k`` / ``top_p`` (0 / 1.0: off; ``--score-truncated``) score under the rollout's truncated
    sampling distribution, as vLLM's processed log-probs are."""

    def __init__(self, lm: torch.nn.Module, *, temperature: float = 1.0, chunk_size: Optional[int] = None,
                 precision: Precision = FULL, top_k: int = 0, top_p: float = 1.0):
        super().__init__()
        self.lm = lm
        self.temperature = temperature
        self.top_k, self.top_p = top_k, top_p
        self.chunk_size = chunk_size
        self.precision = precision  # --bf16, --cast-lm-head-fp32 (precision.py), --padding-free (packing.py)

    def forward(self, input_ids, attention_mask, rows, positions, labels, return_entropy: bool = False,
                policy_loss: Optional[dict] = None):
        """Log-probs ``[N]`` (and entropies), or with ``policy_loss`` (the keyword inputs of
        ``fastpo.linear_policy_loss`` but the head's) that loss's ``LossOutput``, computed from the
        hidden states in three lm_head GEMMs where the config allows."""
        hidden = decoder_states(self.lm.get_decoder(), input_ids, attention_mask, rows, positions, self.precision)
        h, weight, bias = head_operands(hidden, self.lm.get_output_embeddings(), self.precision)
        truncation = {} if (self.top_k == 0 and self.top_p >= 1.0) else {"top_k": self.top_k, "top_p": self.top_p}
        if policy_loss is not None:
            if truncation:  # (linear_policy_loss has no top_k / top_p: scored here, then the loss)
                return _truncated_policy_loss(h, weight, bias, labels, self.temperature, self.chunk_size,
                                              truncation, policy_loss)
            return fastpo.linear_policy_loss(h, weight, labels, bias=bias, temperature=self.temperature,
                                             chunk_size=self.chunk_size, **policy_loss)
        return fastpo.linear_token_logprobs(h, weight, labels, bias=bias, temperature=self.temperature,
                                            return_entropy=return_entropy, chunk_size=self.chunk_size, **truncation)


_HEAD_ONLY = ("temperature", "bias", "ignore_index", "logit_softcap", "logit_scale", "compute_entropy", "chunk_size")


def _truncated_policy_loss(h, weight, bias, labels, temperature, chunk_size, truncation, kwargs):
    """``fastpo.policy_loss`` of the truncated log-probs (and entropies) of the response tokens: the
    composition ``linear_token_logprobs(..., top_k=, top_p=)`` then the loss (one extra [N] pair)."""
    logp, entropy = fastpo.linear_token_logprobs(h, weight, labels, bias=bias, temperature=temperature,
                                                 return_entropy=True, chunk_size=chunk_size, **truncation)
    rest = {k: v for k, v in kwargs.items() if k not in _HEAD_ONLY}
    return fastpo.policy_loss(logp, entropy=entropy, **rest)


def policy_loss_of(scorer: torch.nn.Module, batch: TokenBatch, old_logp: torch.Tensor, advantages: torch.Tensor,
                   **kwargs):
    """``fastpo.linear_policy_loss`` of the batch's response tokens under a :class:`TokenScorer` (or a
    DDP/FSDP wrapper of one): the policy loss straight from the hidden states, packed by ``cu_seqlens``."""
    return scorer(batch.input_ids, batch.attention_mask, batch.rows, batch.positions, batch.labels,
                  policy_loss=dict(kwargs, old_logp=old_logp, advantages=advantages, cu_seqlens=batch.cu_seqlens))


def token_logprobs(scorer: torch.nn.Module, batch: TokenBatch, *, return_entropy: bool = False):
    """log p of the batch's response tokens ``[N]`` (and the entropy ``[N]`` when asked) under a
    :class:`TokenScorer` (or a DDP/FSDP wrapper of one)."""
    return scorer(batch.input_ids, batch.attention_mask, batch.rows, batch.positions, batch.labels,
                  return_entropy=return_entropy)


def packed_rollout_logp(rollout_logp: Sequence[Sequence[float]], device) -> torch.Tensor:
    """The rollout engine's sampled-token log-probs, packed like the batch's response tokens ``[N]``."""
    flat = [x for row in rollout_logp for x in row]
    return torch.tensor(flat, dtype=torch.float32, device=device)
