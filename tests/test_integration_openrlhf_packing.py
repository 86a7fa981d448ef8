"""fastpo serves OpenRLHF 0.11's ``Actor.forward`` with ``packing_samples=True`` (no ring attention).

The reference is OpenRLHF's own packed forward: the installed ``openrlhf/models/ring_attn_utils.py``, unchanged,
loaded over a torch stand-in of the four ``flash_attn.bert_padding`` helpers it imports (flash-attn cannot be
installed on CPU; the stand-in follows flash-attn's definitions: the row-major indices of the mask's nonzeros,
gather, and scatter into zeros). It runs the backbone on the ``(1, M)`` packed row with per-sample position ids
and no attention mask; transformers' sdpa path then builds the block-diagonal mask from the position ids. The
packed action log-probs also equal OpenRLHF's padded forward (so the stand-in and the mask are right). While
fastpo serves, the lm_head, OpenRLHF's log-prob / entropy functions and its unpad / pad helpers raise.
"""

import importlib.util
import os
import sys
import types

import pytest
import torch

from test_integration_openrlhf_actor import (A, B, N_ACT, S, _batch, _block, _close, _grads, fa, fo,  # noqa: F401
                                             make_actor, model_dirs)


def _flash_attn_standin():
    """``flash_attn.bert_padding`` as flash-attn defines it (torch only) and ``flash_attn.utils.distributed``."""
    import einops

    def unpad_input(hidden_states, attention_mask, unused_mask=None):
        seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
        indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
        cu = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
        flat = einops.rearrange(hidden_states, "b s ... -> (b s) ...")
        return flat[indices], indices, cu, int(seqlens.max()), seqlens

    def pad_input(hidden_states, indices, batch, seqlen):
        out = hidden_states.new_zeros((batch * seqlen, *hidden_states.shape[1:]))
        out = out.index_put((indices,), hidden_states)
        return einops.rearrange(out, "(b s) ... -> b s ...", b=batch)

    def all_gather(*args, **kwargs):
        raise AssertionError("ring attention is not used here")

    bert = types.ModuleType("flash_attn.bert_padding")
    bert.unpad_input, bert.pad_input, bert.rearrange = unpad_input, pad_input, einops.rearrange
    bert.index_first_axis = lambda x, indices: x[indices]
    dist = types.ModuleType("flash_attn.utils.distributed")
    dist.all_gather = all_gather
    return {"flash_attn": types.ModuleType("flash_attn"), "flash_attn.bert_padding": bert,
            "flash_attn.utils": types.ModuleType("flash_attn.utils"), "flash_attn.utils.distributed": dist}


@pytest.fixture
def openrlhf_packing(monkeypatch):
    """OpenRLHF's actor module with its real packing helpers (over the stand-in) in place."""
    for name, mod in _flash_attn_standin().items():
        monkeypatch.setitem(sys.modules, name, mod)
    path = os.path.join(os.path.dirname(A.__file__), "ring_attn_utils.py")
    spec = importlib.util.spec_from_file_location("openrlhf_ring_attn_utils_installed", path)
    ring = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ring)
    monkeypatch.setattr(A, "unpad_and_slice_tensor", ring.unpad_and_slice_tensor)
    monkeypatch.setattr(A, "gather_and_pad_tensor", ring.gather_and_pad_tensor)
    return ring


def _block_packing(monkeypatch):
    def raise_(*args, **kwargs):
        raise AssertionError("fastpo used OpenRLHF's packing helpers")

    monkeypatch.setattr(A, "unpad_and_slice_tensor", raise_)
    monkeypatch.setattr(A, "gather_and_pad_tensor", raise_)


def _call(actor, seq, attn, action_mask, entropy):
    logp, output = actor(seq, action_mask, attention_mask=attn, return_output=True, return_entropy=entropy)
    g = torch.Generator().manual_seed(7)
    loss = (logp * torch.randn(logp.shape, generator=g)).sum()
    ent = None
    if entropy:
        ent = output.entropy
        loss = loss + (ent * torch.randn(ent.shape, generator=g)).sum()
    loss.backward()
    return logp.detach(), None if ent is None else ent.detach(), _grads(actor)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [False, True])
def test_packed_forward_equals_openrlhf(make_actor, openrlhf_packing, monkeypatch, arch, temperature, entropy):
    actor = make_actor(arch, temperature)
    seq, attn, action_mask = _batch()
    lp_pad, _, _ = _call(actor, seq, attn, action_mask, False)  # OpenRLHF, padded
    actor.packing_samples = True
    lp_ref, ent_ref, grads_ref = _call(actor, seq, attn, action_mask, entropy)  # OpenRLHF, packed
    _close(lp_ref, lp_pad)  # the packed row's block-diagonal attention = the padded batch's

    assert fo.install() and fa.actor_installed()
    _block(monkeypatch, actor)
    _block_packing(monkeypatch)
    fo.STATS.clear()
    shapes = []
    backbone = actor.model.get_base_model() if hasattr(actor.model, "get_base_model") else actor.model
    hook = backbone.model.register_forward_pre_hook(
        lambda mod, args, kw: shapes.append((tuple(kw["input_ids"].shape), kw["attention_mask"])), with_kwargs=True)
    lp, ent, grads = _call(actor, seq, attn, action_mask, entropy)
    hook.remove()
    assert shapes == [((1, int(attn.sum())), None)]  # the packed row, no mask
    assert fo.STATS == {"served:Actor.forward": 1}, fo.STATS
    assert lp.shape == lp_ref.shape == (B, N_ACT)
    _close(lp, lp_ref)
    if entropy:
        assert ent.shape == ent_ref.shape == (B, S - 1)
        _close(ent, ent_ref)
        assert bool((ent[attn[:, :-1] == 0] == 0).all())  # padding: 0, as OpenRLHF's pad_input
    assert grads.keys() == grads_ref.keys() and len(grads) == len(list(actor.parameters()))
    for name in grads_ref:
        _close(grads[name], grads_ref[name])


def test_packed_full_logprobs(make_actor, openrlhf_packing, monkeypatch):
    """``return_logprobs=True`` without an action mask (the reference model's call), no grad."""
    actor = make_actor("llama", 0.9)
    actor.packing_samples = True
    seq, attn, _ = _batch(5)
    with torch.no_grad():
        ref = actor(seq, attention_mask=attn, return_logprobs=True)
        fa.install_actor()
        _block(monkeypatch, actor)
        _block_packing(monkeypatch)
        fo.STATS.clear()
        got = actor(seq, attention_mask=attn, return_logprobs=True)
    assert fo.STATS == {"served:Actor.forward": 1}
    assert got.shape == ref.shape == (B, S - 1)
    _close(got, ref)


def test_ring_attention_handed_back(make_actor, openrlhf_packing):
    """A ring_attn_group goes to OpenRLHF's own forward (its sequence-parallel slicing needs the group)."""
    actor = make_actor("llama")
    actor.packing_samples = True
    seq, attn, action_mask = _batch()
    fa.install_actor()
    fo.STATS.clear()
    with pytest.raises(Exception):  # OpenRLHF's ring path: dist.get_rank on a fake group
        actor(seq, action_mask, attn, ring_attn_group=object())
    assert fo.STATS == {"delegated:Actor.forward": 1}
