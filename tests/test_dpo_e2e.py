"""End to end: DPO steps on a tiny randomly initialised transformers model, through
linear_token_logprobs (no [N, V] logits) → sequence_logprobs → dpo_loss."""

import copy

import pytest
import torch

import fastpo

transformers = pytest.importorskip("transformers")

PAIRS, PROMPT_LEN, LENGTH, VOCAB = 3, 4, 14, 200


def _tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def _batch():
    """Chosen responses then rejected ones, sharing prompts, right-padded; labels shifted by one."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (2 * PAIRS, LENGTH), generator=g)
    input_ids[PAIRS:, :PROMPT_LEN] = input_ids[:PAIRS, :PROMPT_LEN]
    response_len = torch.tensor([10, 6, 3, 7, 9, 2])
    attention_mask = torch.arange(LENGTH) < PROMPT_LEN + response_len[:, None]
    input_ids[~attention_mask] = 0
    labels = input_ids[:, 1:].clone()
    labels[:, : PROMPT_LEN - 1] = -100
    labels[~attention_mask[:, 1:]] = -100
    return input_ids, attention_mask, labels


def _fastpo_seq_logp(model, input_ids, attention_mask, labels):
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    token_logp = fastpo.linear_token_logprobs(hidden, model.lm_head.weight, labels)
    return fastpo.sequence_logprobs(token_logp, labels != -100)


def _eager_seq_logp(model, input_ids, attention_mask, labels):
    """What a trainer without fastpo does: full logits, log-softmax, gather, masked sum."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    keep = labels != -100
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * keep).sum(-1)


def test_first_step_matches_eager_dpo(cpu_backend):
    """Loss, metrics and parameter gradients equal the textbook DPO computed from full logits."""
    policy = _tiny_llama()
    reference = copy.deepcopy(policy).requires_grad_(False)
    batch = _batch()
    with torch.no_grad():
        ref = _fastpo_seq_logp(reference, *batch)
    logp = _fastpo_seq_logp(policy, *batch)
    out = fastpo.dpo_loss(logp[:PAIRS], logp[PAIRS:], ref[:PAIRS], ref[PAIRS:], beta=0.1)
    out.loss.backward()
    ours = {name: p.grad.clone() for name, p in policy.named_parameters()}
    policy.zero_grad()

    eager = _eager_seq_logp(policy, *batch)
    ratio = eager - ref
    want = -torch.nn.functional.logsigmoid(0.1 * (ratio[:PAIRS] - ratio[PAIRS:])).mean()
    want.backward()
    torch.testing.assert_close(out.loss, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.loss, torch.log(torch.tensor(2.0)), atol=1e-6, rtol=0)  # policy == reference
    for name, p in policy.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert ours["lm_head.weight"].abs().sum() > 0


def test_dpo_steps_raise_the_margin(cpu_backend):
    policy = _tiny_llama()
    reference = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    batch = _batch()
    with torch.no_grad():
        ref = _fastpo_seq_logp(reference, *batch)
    losses, margins = [], []
    for _ in range(8):
        logp = _fastpo_seq_logp(policy, *batch)
        out = fastpo.dpo_loss(logp[:PAIRS], logp[PAIRS:], ref[:PAIRS], ref[PAIRS:], beta=0.1)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        margins.append(out.metrics["reward_margin"].item())
    with torch.no_grad():
        logp = _fastpo_seq_logp(policy, *batch)
        final = fastpo.dpo_loss(logp[:PAIRS], logp[PAIRS:], ref[:PAIRS], ref[PAIRS:], beta=0.1)
    margins.append(final.metrics["reward_margin"].item())
    assert margins[0] == 0.0  # the policy starts as the reference
    assert margins[-1] > 0.5, margins  # chosen-over-rejected implicit reward margin grew
    assert all(b > a for a, b in zip(margins, margins[1:])), margins
    assert final.loss.item() < losses[0] - 0.05
    assert final.metrics["reward_accuracy"].item() == 1.0
