"""fastpo as OpenRLHF 0.11's ``Actor.forward`` log-probs, against OpenRLHF's own forward.

The installed ``openrlhf/models/actor.py`` is loaded by tests/openrlhf_loader.py (its flash-attn packing
helpers and deepspeed are not installable here), and an ``Actor`` is built by OpenRLHF's own constructor from
a tiny random Llama / Qwen2 saved to disk. The same batch (left-padded prompts, right-padded responses, the
PPO trainer's layout) runs through OpenRLHF's forward and through fastpo's: action log-probs, full log-probs,
entropy and every parameter gradient must agree. While fastpo serves, the lm_head's forward and OpenRLHF's
``log_probs_from_logits`` / ``compute_entropy`` raise, so no logits are built and nothing is delegated.
"""

import pytest
import torch

from openrlhf_loader import load_openrlhf_actor

A = load_openrlhf_actor()
if A is None:
    pytest.skip("openrlhf is not installed: pip install --no-deps openrlhf==0.11.2", allow_module_level=True)

from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from fastpo.integrations import openrlhf as fo  # noqa: E402
from fastpo.integrations import openrlhf_actor as fa  # noqa: E402

if not fo.openrlhf_supported():
    pytest.skip("the installed openrlhf is outside fastpo's tested range", allow_module_level=True)

V, B, S, N_ACT = 80, 3, 12, 5


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    dirs = {}
    for arch, cls, cfg in (("llama", LlamaForCausalLM, LlamaConfig(tie_word_embeddings=False, **common)),
                           ("qwen2", Qwen2ForCausalLM, Qwen2Config(tie_word_embeddings=True, **common))):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(arch)
        cls(cfg).save_pretrained(path)
        dirs[arch] = str(path)
    return dirs


@pytest.fixture
def make_actor(model_dirs):
    def build(arch, temperature=1.0, fp32=True):
        actor = A.Actor(model_dirs[arch], attn_implementation="sdpa", param_dtype="bf16", temperature=temperature)
        if fp32:
            actor.model.float()
        return actor

    yield build
    fa.uninstall_actor()


def _batch(seed=0):
    """OpenRLHF's PPO layout: prompts left-padded, responses right-padded; action_mask over the last N_ACT."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, V, (B, S), generator=g)
    attn = torch.ones(B, S, dtype=torch.long)
    attn[1, :3] = 0  # left padding of the prompt
    attn[2, -2:] = 0  # right padding of a short response
    action_mask = attn[:, -N_ACT:].bool()
    action_mask[0, -1] = False
    return seq, attn, action_mask


def _block(monkeypatch, actor):
    def raise_(*args, **kwargs):
        raise AssertionError("fastpo built logits or delegated to OpenRLHF's log-prob code")

    monkeypatch.setattr(actor.model.get_output_embeddings(), "forward", raise_)
    monkeypatch.setattr(A, "log_probs_from_logits", raise_)
    monkeypatch.setattr(A, "compute_entropy", raise_)


def _grads(actor):
    grads = {n: p.grad.clone() for n, p in actor.named_parameters() if p.grad is not None}
    actor.zero_grad(set_to_none=True)
    return grads


def _close(a, b, tol=2e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=1e-4)


def _ppo_call(actor, seq, attn, action_mask, entropy):
    """ppo_actor.training_step's call, then a backward of a random mix of the outputs it uses."""
    logp, output = actor(seq, action_mask, attention_mask=attn, return_output=True, return_entropy=entropy)
    g = torch.Generator().manual_seed(7)
    loss = (logp * torch.randn(logp.shape, generator=g)).sum()
    ent = None
    if entropy:
        ent = output.entropy
        loss = loss + (ent[:, -N_ACT:] * torch.randn(B, N_ACT, generator=g)).sum()
    loss.backward()
    return logp.detach(), None if ent is None else ent.detach(), _grads(actor)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [False, True])
def test_ppo_forward_equals_openrlhf(make_actor, monkeypatch, arch, temperature, entropy):
    actor = make_actor(arch, temperature)
    seq, attn, action_mask = _batch()
    lp_ref, ent_ref, grads_ref = _ppo_call(actor, seq, attn, action_mask, entropy)
    assert fo.install()
    assert fa.actor_installed()
    _block(monkeypatch, actor)
    fo.STATS.clear()
    lp, ent, grads = _ppo_call(actor, seq, attn, action_mask, entropy)
    assert fo.STATS == {"served:Actor.forward": 1}, fo.STATS
    assert lp.shape == lp_ref.shape == (B, N_ACT) and lp.dtype == lp_ref.dtype == torch.float32
    _close(lp, lp_ref)
    assert bool((lp[~action_mask] == 0).all())
    if entropy:
        assert ent.shape == ent_ref.shape == (B, S - 1)
        _close(ent, ent_ref)
    assert grads.keys() == grads_ref.keys() and len(grads) == len(list(actor.parameters()))
    for name in grads_ref:
        _close(grads[name], grads_ref[name])


def test_full_logprobs_and_no_grad(make_actor, monkeypatch):
    """return_logprobs without action_mask (SFT / DPO) gives [B, S-1]; the experience maker's no-grad call."""
    actor = make_actor("llama", 0.9)
    seq, attn, action_mask = _batch(1)
    full_ref = actor(seq, attention_mask=attn, return_logprobs=True)
    with torch.no_grad():
        act_ref = actor(seq, action_mask, attn)
    fa.install_actor()
    _block(monkeypatch, actor)
    fo.STATS.clear()
    full = actor(seq, attention_mask=attn, return_logprobs=True)
    assert full.requires_grad
    with torch.no_grad():
        act = actor(seq, action_mask, attn)
    assert fo.STATS == {"served:Actor.forward": 2}
    assert full.shape == full_ref.shape == (B, S - 1)
    _close(full.detach(), full_ref.detach())
    _close(act, act_ref)


def test_bf16_model(make_actor, monkeypatch):
    """OpenRLHF's default bf16 weights: fastpo's head keeps fp32 accumulators where OpenRLHF rounds the logits
    to bf16 before its fp32 cast, so the two agree to bf16 logit rounding."""
    actor = make_actor("llama", fp32=False)
    seq, attn, action_mask = _batch(2)
    with torch.no_grad():
        ref = actor(seq, action_mask, attn)
        fa.install_actor()
        _block(monkeypatch, actor)
        got = actor(seq, action_mask, attn)
    assert got.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.02)


def test_hands_back(make_actor):
    """The logits call, ring attention and a non-plain model type go to OpenRLHF's own forward (counted)."""
    actor = make_actor("llama")
    seq, attn, action_mask = _batch(3)
    fa.install_actor()
    fo.STATS.clear()
    out = actor(seq, attention_mask=attn, return_output=True)
    assert out.logits.shape == (B, S, V)  # OpenRLHF's own output: the logits were asked for
    assert fo.STATS == {"delegated:Actor.forward": 1}
    actor.model.config.model_type = "gemma2"  # softcapped head: not served
    ref = actor(seq, action_mask, attn)
    assert fo.STATS == {"delegated:Actor.forward": 2}
    actor.model.config.model_type = "llama"
    _close(actor(seq, action_mask, attn), ref)
    assert fo.STATS["served:Actor.forward"] == 1
    actor.packing_samples = True
    with pytest.raises(ImportError, match="flash-attn"):  # OpenRLHF's ring-attention path, without flash-attn
        actor(seq, action_mask, attn, ring_attn_group=object())
    assert fo.STATS == {"delegated:Actor.forward": 3, "served:Actor.forward": 1}


def test_validation(make_actor):
    actor = make_actor("llama")
    seq, attn, _ = _batch()
    fa.install_actor()
    with pytest.raises(ValueError, match=r"action_mask \(3, 12\) must have 1..11 columns"):
        actor(seq, torch.ones(B, S, dtype=torch.bool), attn)
    with pytest.raises(ValueError, match="return_entropy=True needs return_output=True"):
        actor(seq, torch.ones(B, 2, dtype=torch.bool), attn, return_entropy=True)
    fa.uninstall_actor()
    assert not fa.actor_installed() and A.Actor.forward is fa._ORIGINAL_FORWARD
