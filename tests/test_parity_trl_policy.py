"""TRL 1.16's GRPO loss types against fastpo.policy_loss, through TRL's own ``GRPOTrainer._compute_loss``.

``_compute_loss`` is called unbound on a stand-in trainer (``FakeTrainer``): it holds the attributes the
method reads, and its ``_get_per_token_logps_and_entropies`` returns our log-probs instead of running a
model. Everything after that (ratios, clipping, CISPO, SAPO, VESPO's gamma weights, LUSPO, the KL with
``use_bias_correction_kl``, the vLLM importance-sampling ratio, each loss type's normaliser and the clip
metrics) is TRL's code. Compared: the loss, ∂loss/∂logp and TRL's clip metrics.
"""

import collections
from types import SimpleNamespace

import pytest
import torch

try:
    from trl.trainer.grpo_trainer import GRPOTrainer
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"trl is not importable ({type(exc).__name__}: {exc}); pip install 'fastpo[parity]'",
                allow_module_level=True)

import fastpo  # noqa: E402
from fastpo import PolicyLossConfig  # noqa: E402
from fastpo.ops.token_selection import high_entropy_mask, off_policy_sequence_mask  # noqa: E402

B, T, MAX_LEN = 6, 9, 16
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04


class _Accelerator:
    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def fake_trainer(loss_type, logp, entropy, *, beta=BETA, level="token", bias_kl=True, delta=None,
                 eps_high=EPS_HIGH, use_vllm=False, top_entropy_quantile=1.0, opsm=None):
    args = SimpleNamespace(use_bias_correction_kl=bias_kl, delta=delta, sapo_temperature_pos=1.0,
                           sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                           vespo_lambda_neg=2.0, steps_per_generation=1)
    t = SimpleNamespace(
        args=args, loss_type=loss_type, beta=beta, epsilon_low=EPS_LOW, epsilon_high=eps_high,
        importance_sampling_level=level, top_entropy_quantile=top_entropy_quantile, off_policy_mask_threshold=opsm,
        use_vllm=use_vllm, vllm_importance_sampling_correction=use_vllm, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=MAX_LEN, accelerator=_Accelerator(),
        _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask, get_gamma_weights=GRPOTrainer.get_gamma_weights)
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, entropy, None)
    t.get_high_entropy_mask = lambda *a: GRPOTrainer.get_high_entropy_mask(t, *a)
    return t


def make_batch(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 6, 0, 3, 8, 1])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    logp = -torch.rand(B, T, generator=g) * 2 - 0.05
    old = logp + 0.4 * torch.randn(B, T, generator=g)
    ref = logp + 0.4 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    is_ratio = torch.rand(B, T, generator=g) * 1.5 + 0.2
    return logp, old, ref, adv, mask, is_ratio


def entropies():
    return torch.rand(B, T, generator=torch.Generator().manual_seed(11)) * 3


def trl_loss(loss_type, batch, **kw):
    logp, old, ref, adv, mask, is_ratio = batch
    x = logp.clone().requires_grad_()
    trainer = fake_trainer(loss_type, x, entropies(), **kw)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum(), "sampling_per_token_logps": sampling_logps(batch)}
    if kw.get("use_vllm"):  # TRL puts the ratio in the inputs only when it generates with vLLM
        inputs["importance_sampling_ratio"] = is_ratio
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return loss.detach(), x.grad, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def fastpo_config(loss_type, *, beta=BETA, level="token", bias_kl=True, delta=None, eps_high=EPS_HIGH):
    """The fastpo equivalent of a TRL GRPOConfig (see the table in the README)."""
    kw = dict(clip_low=EPS_LOW, clip_high=eps_high, kl_coef=beta, kl_estimator="k3", kl_clamp=None,
              kl_bias_correction=bias_kl, ratio_level=level, delta=delta)
    per_type = {
        "grpo": dict(aggregation="seq_mean_token_mean", count_empty_sequences=True),
        "bnpo": dict(aggregation="token_mean"),
        "dr_grpo": dict(aggregation="token_sum_norm", norm_length=MAX_LEN),
        "dapo": dict(aggregation="token_mean"),
        "luspo": dict(aggregation="seq_mean_token_sum", count_empty_sequences=True),
        "cispo": dict(surrogate="cispo_upper", clip_high=eps_high - 1.0, aggregation="token_mean"),
        "sapo": dict(surrogate="sapo", aggregation="seq_mean_token_mean", count_empty_sequences=True),
        "vespo": dict(surrogate="vespo", aggregation="token_mean"),
    }[loss_type]
    return PolicyLossConfig(**{**kw, **per_type})


def sampling_logps(batch):
    """vLLM's log-probs: the old ones shifted, with NaN where it could not score a token."""
    old = batch[1]
    s = old - 0.3 * torch.rand(B, T, generator=torch.Generator().manual_seed(12))
    s[0, 2] = s[3, 1] = float("nan")
    return s


def fastpo_loss(loss_type, batch, *, use_vllm=False, top_entropy_quantile=1.0, opsm=None, **kw):
    logp, old, ref, adv, mask, is_ratio = batch
    x = logp.clone().requires_grad_()
    cfg = fastpo_config(loss_type, **kw)
    num_tokens = int(mask.sum()) if cfg.aggregation == "token_mean" and loss_type != "bnpo" else None
    w = is_ratio.clone() if use_vllm else torch.ones(B, T)
    if top_entropy_quantile < 1.0:
        w = w * high_entropy_mask(entropies(), mask, top_entropy_quantile)
    if opsm is not None:
        w = w * off_policy_sequence_mask(x, sampling_logps(batch), adv, mask, opsm)
    out = fastpo.policy_loss(x, old, adv[:, None].expand(B, T), mask.bool(), ref_logp=ref,
                             is_weights=w, num_tokens=num_tokens, config=cfg)
    out.loss.backward()
    return out.loss.detach(), x.grad, out.metrics


def compare(got, want, *, metrics=True):
    torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=2e-5, msg=lambda m: f"loss: {m}")
    torch.testing.assert_close(got[1], want[1], atol=2e-6, rtol=2e-5, msg=lambda m: f"grad: {m}")
    if metrics and "clip_ratio/low_mean" in want[2]:
        for trl_key, key in (("clip_ratio/low_mean", "clip_frac_low"), ("clip_ratio/high_mean", "clip_frac_high"),
                             ("clip_ratio/region_mean", "clip_frac")):
            assert float(got[2][key]) == pytest.approx(want[2][trl_key], abs=1e-6), trl_key
    if metrics and "kl" in want[2]:
        assert float(got[2]["ref_kl"]) == pytest.approx(want[2]["kl"], abs=1e-6, rel=1e-5)


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("bias_kl", [True, False])
def test_loss_types(loss_type, bias_kl, cpu_backend):
    kw = dict(bias_kl=bias_kl)
    if loss_type == "cispo":
        kw["eps_high"] = 1.3  # TRL's raw cap ε_max (ScaleRL uses 5.0): one these ratios reach
    if loss_type == "luspo":
        kw.update(level="sequence", beta=0.0)  # LUSPO needs the sequence ratio (and see test_sequence_level)
    for seed in (0, 1):
        batch = make_batch(seed)
        # TRL's clip metrics are per sequence under a sequence ratio (fastpo's per token)
        compare(fastpo_loss(loss_type, batch, **kw), trl_loss(loss_type, batch, **kw), metrics=loss_type != "luspo")


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_vllm_importance_sampling_ratio(loss_type, backend):
    """TRL multiplies the policy term by inputs["importance_sampling_ratio"]: fastpo's is_weights."""
    batch = make_batch(2)
    kw = {"eps_high": 1.3} if loss_type == "cispo" else {}
    compare(fastpo_loss(loss_type, batch, use_vllm=True, **kw), trl_loss(loss_type, batch, use_vllm=True, **kw))


def test_delta_two_sided_clip(backend):
    batch = make_batch(3)
    compare(fastpo_loss("grpo", batch, delta=1.25), trl_loss("grpo", batch, delta=1.25))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "sapo"])
def test_sequence_level(loss_type, cpu_backend):
    """importance_sampling_level="sequence" (GSPO): TRL's gradient flows through the sequence mean, fastpo's
    sequence ratio is the token-gradient form; with the advantage constant per sequence (TRL's) both give
    the same loss and gradient. Without the KL term: KL·r under a sequence ratio is where they part
    (see the README's divergences). TRL's clip metrics are per sequence there, fastpo's per token."""
    batch = make_batch(4)
    compare(fastpo_loss(loss_type, batch, level="sequence", beta=0.0),
            trl_loss(loss_type, batch, level="sequence", beta=0.0), metrics=False)


def test_fastpo_really_computes(monkeypatch, cpu_backend):
    """The comparison can fail: a wrong clip bound is caught."""
    batch = make_batch(0)
    got = fastpo_loss("bnpo", batch, eps_high=0.1)
    with pytest.raises(AssertionError):
        compare(got, trl_loss("bnpo", batch))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "sapo"])
@pytest.mark.parametrize("quantile,opsm", [(0.2, None), (0.5, None), (1.0, -0.3), (0.4, -0.4)])  # -0.3: drops row 3, not row 1
def test_entropy_mask_and_off_policy_mask(loss_type, quantile, opsm, cpu_backend):
    """top_entropy_quantile (TRL's get_high_entropy_mask) and off_policy_mask_threshold (get_off_policy_mask,
    vLLM's NaN log-probs included) as fastpo.ops.token_selection masks in is_weights."""
    batch = make_batch(5)
    kw = dict(top_entropy_quantile=quantile, opsm=opsm)
    compare(fastpo_loss(loss_type, batch, **kw), trl_loss(loss_type, batch, **kw))
