"""fastpo as verl 0.9.1's fused log-prob + entropy head, through verl's own patched HF forward.

A tiny random Llama (and a Qwen2 with tied embeddings) is patched by verl's ``apply_monkey_patch(...,
use_fused_kernels=True, fused_kernels_backend="torch"|"liger")``, the call verl's FSDP engine makes; its
``forward_with_torch_backend`` then imports ``FusedLinearForPPO`` at call time. The same model and inputs run
once with verl's own class and once with fastpo's installed: log-probs, entropy and the gradients of every
parameter (lm_head and backbone) must agree. While fastpo serves, verl's autograd function and chunk
kernels raise, so a swap that quietly fell back to verl fails here; fastpo's served count must move.
"""

import os
import subprocess
import sys

import pytest
import torch

try:
    import verl.models.transformers.monkey_patch as verl_patch
    from verl.utils.experimental import torch_functional as verl_tf
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"verl is not importable ({type(exc).__name__}: {exc}); pip install --no-deps verl==0.9.1",
                allow_module_level=True)

from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import fastpo.integrations.verl as fastpo_verl  # noqa: E402
from fastpo.integrations import verl_head  # noqa: E402

V = 96


def _config(arch):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        return LlamaForCausalLM, LlamaConfig(tie_word_embeddings=False, **common)
    return Qwen2ForCausalLM, Qwen2Config(tie_word_embeddings=True, **common)


@pytest.fixture
def patched_model(monkeypatch):
    """Builds a tiny model of a fresh subclass (verl patches ``model.__class__.forward``: nothing leaks into
    the transformers classes) and applies verl's monkey patch to it."""

    def build(arch, backend="torch"):
        base, config = _config(arch)
        cls = type(f"Tiny{base.__name__}", (base,), {})
        torch.manual_seed(0)
        model = cls(config).float()
        # trl 1.16 no longer has the AutoModelForCausalLMWithValueHead that verl patches when trl is present
        monkeypatch.setattr(verl_patch, "is_trl_available", lambda: False)
        verl_patch.apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True,
                                      fused_kernels_backend=backend)
        assert cls.forward is not base.forward  # verl's forward_with_torch_backend
        return model

    yield build
    verl_head.uninstall()


class _Blocked:
    @staticmethod
    def apply(*args, **kwargs):
        raise AssertionError("fastpo delegated to verl's FusedLinearForPPOFunction")


def _block_verl(monkeypatch):
    monkeypatch.setattr(verl_tf, "FusedLinearForPPOFunction", _Blocked)
    for name in ("_fused_linear_for_ppo_fwd", "_fused_linear_for_ppo_bwd", "_LIGER_FUSED_LINEAR_SCALED_CROSS_ENTROPY"):
        monkeypatch.setattr(verl_tf, name, _Blocked.apply if name.startswith("_fused") else None)


def _run(model, inputs, temperature, seed=1):
    """Forward through verl's patched forward, backward of a random mix of log-probs and entropy."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, temperature=temperature, return_dict=True)
    g = torch.Generator().manual_seed(seed)
    w_lp = torch.randn(out.log_probs.shape, generator=g)
    w_ent = torch.randn(out.entropy.shape, generator=g)
    ((out.log_probs * w_lp).sum() + (out.entropy * w_ent).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.log_probs.detach(), out.entropy.detach(), grads


def _inputs(layout):
    g = torch.Generator().manual_seed(2)
    if layout == "padded":  # [B, T] with a left-padded row; the forward rolls input_ids itself
        ids = torch.randint(0, V, (3, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        return dict(input_ids=ids, attention_mask=mask)
    # verl's engine layout: one packed row (1, nnz), its own position_ids and globally rolled shift_labels
    ids = torch.randint(0, V, (1, 13), generator=g)
    pos = torch.cat([torch.arange(6), torch.arange(7)]).unsqueeze(0)
    return dict(input_ids=ids, position_ids=pos, shift_labels=torch.roll(ids, -1, dims=-1))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_head_equals_verl(patched_model, monkeypatch, arch, layout, temperature, backend):
    monkeypatch.setenv("FASTPO_BACKEND", backend)
    model = patched_model(arch)
    inputs = _inputs(layout)
    verl_head.uninstall()
    lp_ref, ent_ref, grads_ref = _run(model, inputs, temperature)

    fastpo_verl.install_fused_head()
    assert verl_head.installed() and verl_tf.FusedLinearForPPO is verl_head.FastpoFusedLinearForPPO
    _block_verl(monkeypatch)
    served = verl_head.STATS["served:fused_linear"]
    lp, ent, grads = _run(model, inputs, temperature)
    assert verl_head.STATS["served:fused_linear"] == served + 1

    assert lp.dtype == lp_ref.dtype == torch.float32 and ent.dtype == ent_ref.dtype
    assert lp.shape == lp_ref.shape == inputs["input_ids"].shape and ent.shape == ent_ref.shape
    torch.testing.assert_close(lp, lp_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_ref, atol=2e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) == len(list(model.parameters()))  # every layer
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=2e-5, rtol=1e-4, msg=name)


def test_liger_backend_served(patched_model, monkeypatch):
    """impl_backend=liger goes through the same class: fastpo serves it too (verl's torch math as reference)."""
    model = patched_model("llama", backend="liger")
    assert model._verl_fused_kernels_backend == "liger"
    inputs = _inputs("padded")
    monkeypatch.setattr(verl_tf, "_LIGER_FUSED_LINEAR_SCALED_CROSS_ENTROPY", None)  # verl's torch fallback
    lp_ref, ent_ref, grads_ref = _run(model, inputs, 0.9)
    fastpo_verl.install_fused_head()
    _block_verl(monkeypatch)
    lp, ent, grads = _run(model, inputs, 0.9)
    torch.testing.assert_close(lp, lp_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_ref, atol=2e-5, rtol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=2e-5, rtol=1e-4, msg=name)


def test_autocast_dtypes(patched_model, monkeypatch):
    """Under bf16 autocast the head runs in bf16 (as verl's matmul); log-probs fp32, entropy in the hidden
    states' dtype, gradients in the parameters' dtype, values close to verl's."""
    model = patched_model("llama")
    inputs = _inputs("padded")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp_ref, ent_ref, grads_ref = _run(model, inputs, 1.0)
        fastpo_verl.install_fused_head()
        _block_verl(monkeypatch)
        lp, ent, grads = _run(model, inputs, 1.0)
    assert lp.dtype == lp_ref.dtype == torch.float32 and ent.dtype == ent_ref.dtype
    torch.testing.assert_close(lp, lp_ref, atol=0.1, rtol=0.02)
    torch.testing.assert_close(ent, ent_ref, atol=0.1, rtol=0.02)
    for name in grads_ref:
        assert grads[name].dtype == grads_ref[name].dtype == torch.float32
    g, g_ref = grads["lm_head.weight"].flatten(), grads_ref["lm_head.weight"].flatten()
    cos = torch.nn.functional.cosine_similarity(g, g_ref, 0)
    assert cos > 0.99


def test_tensor_temperature_handed_back(patched_model):
    """A tensor temperature (verl's engine asserts a scalar) goes to verl's own class, counted and logged."""
    model = patched_model("llama")
    inputs = _inputs("padded")
    lp_ref, ent_ref, _ = _run(model, inputs, 0.8)
    fastpo_verl.install_fused_head()
    before = dict(verl_head.STATS)
    lp, ent, _ = _run(model, inputs, torch.tensor(0.8))
    delegated = [k for k in verl_head.STATS if k.startswith("delegated:temperature")]
    assert delegated and verl_head.STATS[delegated[0]] == before.get(delegated[0], 0) + 1
    assert verl_head.STATS["served:fused_linear"] == before.get("served:fused_linear", 0)
    torch.testing.assert_close(lp, lp_ref)
    torch.testing.assert_close(ent, ent_ref)


def test_constructor_and_validation():
    verl_head.install()
    try:
        head = verl_tf.FusedLinearForPPO(chunk_size=4, impl_backend="torch")
        assert isinstance(head, verl_head._ORIGINAL) and head.chunk_size == 4
        with pytest.raises(ValueError, match="Unsupported FusedLinearForPPO backend"):
            verl_tf.FusedLinearForPPO(impl_backend="triton")
        h, w = torch.randn(2, 3, 8), torch.randn(V, 8)
        with pytest.raises(ValueError, match=r"input_ids \(2, 4\) must match hidden_states \(2, 3, 8\)"):
            head(h, w, torch.zeros(2, 4, dtype=torch.long))
        with pytest.raises(ValueError, match="labels"):
            head(h, w, torch.full((2, 3), V))
        lp, ent = head(h, w, torch.zeros(2, 3, dtype=torch.int32))  # verl casts its ids to int64
        assert lp.shape == ent.shape == (2, 3)
    finally:
        verl_head.uninstall()
    assert verl_tf.FusedLinearForPPO is verl_head._ORIGINAL and not verl_head.installed()


def test_env_opt_in(monkeypatch):
    for value, expect in (("1", True), ("true", True), ("0", False), ("", False)):
        verl_head.uninstall()
        monkeypatch.setenv(verl_head.ENV_VAR, value)
        assert verl_head.install_from_env() is expect and verl_head.installed() is expect
    monkeypatch.setenv(verl_head.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="FASTPO_VERL_FUSED_HEAD"):
        verl_head.install_from_env()
    verl_head.uninstall()


@pytest.mark.parametrize("value", ["1", None])
def test_external_lib_import_opts_in(value):
    """verl's workers import ``external_lib`` with verl's own import_external_libs: the env var decides."""
    env = {k: v for k, v in os.environ.items() if k != verl_head.ENV_VAR}
    if value is not None:
        env[verl_head.ENV_VAR] = value
    code = ("from verl.utils.import_utils import import_external_libs\n"
            "import_external_libs('fastpo.integrations.verl')\n"
            "from verl.utils.experimental import torch_functional as t\n"
            "from verl.trainer.ppo import core_algos\n"
            "assert 'fastpo_vanilla' in core_algos.POLICY_LOSS_REGISTRY\n"
            "print(t.FusedLinearForPPO.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    name = out.stdout.strip().splitlines()[-1]
    assert name == ("FastpoFusedLinearForPPO" if value else "FusedLinearForPPO")



def _block_verl_triton(monkeypatch):
    """verl's Triton kernel entry points raise while fastpo serves impl_backend=triton."""
    from verl.utils.kernel import kernels, linear_cross_entropy as verl_lce

    monkeypatch.setattr(verl_lce.LinearCrossEntropy, "apply", _Blocked.apply)
    for name in ("efficient_entropy_forward", "efficient_entropy_backward"):
        monkeypatch.setattr(kernels, name, _Blocked.apply)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_triton_backend_served(patched_model, monkeypatch, arch, layout, temperature, backend):
    """impl_backend=triton: verl's forward_with_triton_backend calls linear_cross_entropy (verl's CUDA-only
    kernel: on CPU it fails); installed, fastpo serves it with verl's outputs ([N] float32), equal to verl's
    torch backend on the same weights, gradients included."""
    from verl.utils.kernel import linear_cross_entropy as verl_lce

    monkeypatch.setenv("FASTPO_BACKEND", backend)
    inputs = _inputs(layout)
    verl_head.uninstall()
    lp_ref, ent_ref, grads_ref = _run(patched_model(arch, "torch"), inputs, temperature)

    model = patched_model(arch, "triton")
    assert model._verl_fused_kernels_backend == "triton"
    with pytest.raises((AssertionError, RuntimeError)):  # verl's own kernel: CUDA only (nvtx, is_cuda asserts)
        _run(model, inputs, temperature)

    fastpo_verl.install_fused_head()
    assert verl_head.installed() and verl_lce.linear_cross_entropy is verl_head.fastpo_linear_cross_entropy
    _block_verl(monkeypatch)
    _block_verl_triton(monkeypatch)
    served = verl_head.STATS["served:linear_cross_entropy"]
    lp, ent, grads = _run(model, inputs, temperature)
    assert verl_head.STATS["served:linear_cross_entropy"] == served + 1

    n = inputs["input_ids"].numel()
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (n,)  # verl's kernel's layout
    torch.testing.assert_close(lp, lp_ref.reshape(-1), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_ref.reshape(-1).float(), atol=2e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) == len(list(model.parameters()))
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=2e-5, rtol=1e-4, msg=name)


def test_linear_cross_entropy_reductions_and_delegation(monkeypatch):
    """verl's reductions (sum / mean of the log-probs, entropies per token) and its call conventions; a
    dist_process_group goes to verl's own function (counted)."""
    from verl.utils.kernel import linear_cross_entropy as verl_lce

    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(2, 5, 16, generator=g), torch.randn(V, 16, generator=g)
    y = torch.randint(0, V, (2, 5), generator=g)
    z = (h.reshape(-1, 16) @ w.T) / 0.8
    want_lp = z.log_softmax(-1).gather(1, y.reshape(-1, 1)).squeeze(1)
    want_ent = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    fastpo_verl.install_fused_head()
    try:
        _block_verl_triton(monkeypatch)
        lp, ent = verl_lce.linear_cross_entropy(h, w, y, 0.8, "none")
        torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=1e-5)
        for reduction, reduce in (("sum", torch.sum), ("mean", torch.mean)):
            lp, ent = verl_lce.linear_cross_entropy(h, w, y, 0.8, reduction)
            assert lp.shape == () and ent.shape == (10,)
            torch.testing.assert_close(lp, reduce(want_lp), atol=1e-4, rtol=1e-5)
        with pytest.raises(ValueError, match=r"labels \(2, 4\) must hold one label per row of hidden \(2, 5, 16\)"):
            verl_lce.linear_cross_entropy(h, w, y[:, :4], 0.8, "none")
        before = dict(verl_head.STATS)
        with pytest.raises((AssertionError, RuntimeError)):  # verl's own function got the call (CUDA only)
            verl_lce.linear_cross_entropy(h, w, y, 0.8, "none", object())
        key = "delegated:a dist_process_group (Megatron vocab-parallel head)"
        assert verl_head.STATS[key] == before.get(key, 0) + 1
        assert verl_head.STATS["served:linear_cross_entropy"] == before["served:linear_cross_entropy"]
    finally:
        verl_head.uninstall()
    assert verl_lce.linear_cross_entropy is verl_head._ORIGINAL_LCE and not verl_head.installed()
