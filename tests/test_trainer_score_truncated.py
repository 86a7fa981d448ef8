"""--score-truncated: the flag's default from the sampling settings, and TokenScorer scoring (and its policy
loss) under the rollout's top-p-truncated distribution."""

import pytest
import torch

import fastpo
from fastpo.trainer.batch import TokenScorer, make_token_batch, policy_loss_of, token_logprobs
from fastpo.trainer.cli import parse_config
from fastpo.trainer.truncated_scoring import apply_scoring_truncation, score_truncated, scoring_truncation


@pytest.mark.parametrize("flags,on", [([], False), (["--top-p", "0.9"], True),
                                      (["--top-p", "0.9", "--no-score-truncated"], False),
                                      (["--score-truncated"], False),  # nothing to truncate at top-p 1
                                      (["--top-p", "0.5", "--score-truncated"], True)])
def test_flag_default_follows_top_p(flags, on):
    cfg = parse_config(flags)
    assert score_truncated(cfg) is on
    assert scoring_truncation(cfg) == ({"top_p": cfg.top_p, "top_k": 0} if on else {})


@pytest.fixture(scope="module")
def lm(small_lm):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(small_lm, dtype=torch.float32)
    with torch.no_grad():  # a less flat head than the random one: top-p 0.7 keeps a few tokens, not hundreds
        model.get_output_embeddings().weight.mul_(3)
    return model


def _batch(lm):
    g = torch.Generator().manual_seed(1)
    vocab = lm.get_output_embeddings().weight.shape[0]
    prompts = [torch.randint(3, vocab, (4,), generator=g).tolist() for _ in range(3)]
    responses = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 5, 2)]
    return make_token_batch(prompts, responses, 0, torch.device("cpu"))


def _greedy_labels(lm, batch):
    """The batch with labels replaced by each position's argmax (always kept by top-p)."""
    scorer = TokenScorer(lm)
    seen = {}

    def grab(hidden, weight, labels, **kw):
        seen["logits"] = hidden @ weight.t()
        return fastpo.reference.linear_token_logprobs(hidden, weight, labels)

    real = fastpo.linear_token_logprobs
    fastpo.linear_token_logprobs = grab
    try:
        with torch.no_grad():
            token_logprobs(scorer, batch)
    finally:
        fastpo.linear_token_logprobs = real
    batch.labels.copy_(seen["logits"].argmax(-1))
    return batch, seen["logits"]


def test_scorer_scores_the_truncated_distribution(lm):
    batch, logits = _greedy_labels(lm, _batch(lm))
    cfg = parse_config(["--top-p", "0.7", "--temperature", "0.8"])
    scorer = apply_scoring_truncation(TokenScorer(lm, temperature=0.8), cfg)
    with torch.no_grad():
        cut = token_logprobs(scorer, batch)
        full = token_logprobs(TokenScorer(lm, temperature=0.8), batch)
    want = fastpo.reference.token_logprobs(logits, batch.labels, 0.8, -100, False, None, None, 1.0, 0, 0.7)
    torch.testing.assert_close(cut, want.float(), atol=1e-5, rtol=1e-5)
    assert (cut - full).min() >= -1e-6 and (cut - full).max() > 1e-3  # renormalised over the nucleus


def test_truncated_policy_loss_is_the_loss_of_the_truncated_logprobs(lm):
    batch, logits = _greedy_labels(lm, _batch(lm))
    scorer = TokenScorer(lm, temperature=1.0, top_p=0.7)
    with torch.no_grad():
        old = token_logprobs(scorer, batch) - 0.05
    adv = torch.linspace(-1, 1, old.numel())
    config = fastpo.PolicyLossConfig(kl_coef=0.0)
    loss = policy_loss_of(scorer, batch, old, adv, config=config)
    loss.loss.backward()
    assert torch.isfinite(loss.loss)
    grads = [p.grad for p in lm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        logp = token_logprobs(scorer, batch)
    want = fastpo.policy_loss(logp, old, adv, cu_seqlens=batch.cu_seqlens, config=config)
    torch.testing.assert_close(loss.loss.detach(), want.loss, atol=1e-5, rtol=1e-5)
    lm.zero_grad()


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_trainer_scores_truncated_and_drops_unscorable_tokens(algo, small_lm, tmp_path):
    """With --top-p < 1 the trainer's policy and reference scorers truncate; a sampled token the trainer's
    logits put outside the nucleus (old log-prob −inf) leaves the loss instead of making it NaN."""
    from test_trainer_microbatch import make_trainer

    trainer = make_trainer(algo, small_lm, tmp_path, "--top-p", "0.7", "--kl-coef", "0.05")
    for scorer in (trainer.policy_eval, trainer.ref):
        assert getattr(scorer, "module", scorer).top_p == 0.7
    real = trainer.algo.old_policy

    def old_policy(batch):  # as if the engine kept a token that the trainer's nucleus drops
        logp, entropy = real(batch)
        return logp.index_fill(0, torch.tensor([0, 3]), float("-inf")), entropy

    trainer.algo.old_policy = old_policy
    exp = trainer.algo.experience(1)
    mask = exp.tensors["mask"]
    assert mask[0] == 0 and mask[3] == 0 and int(mask.sum()) == mask.numel() - 2
    assert exp.metrics["unscorable_frac"] == pytest.approx(2 / mask.numel())
    assert all(v is None or v == v and abs(v) != float("inf") for v in exp.metrics.values() if isinstance(v, float))
    loss, metrics = trainer.algo.loss(exp)
    params = [p for p in trainer.policy.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert torch.isfinite(loss) and all(g is None or bool(torch.isfinite(g).all()) for g in grads)
