"""fastpo._C.token_loss_forward directly and through policy_loss: the parallel path, masked garbage
(also on the Triton path), and argument checking (every violation raises before any output is written)."""

import dataclasses

import numpy as np
import pytest
import torch

import fastpo
from fastpo import _C
from fastpo.ops import cpu_policy
from fastpo.ops.loss_spec import STATS, policy_spec


def _flat(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 0.5 - 1.0
    ins = dict(x=x, old=x + 0.3 * torch.randn(n, generator=g, dtype=torch.float64),
               adv=torch.randn(n, generator=g, dtype=torch.float64),
               ref=x + 0.3 * torch.randn(n, generator=g, dtype=torch.float64),
               ent=torch.rand(n, generator=g, dtype=torch.float64))
    ins["roll"] = ins["old"] + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    return {k: v.to(dtype) for k, v in ins.items()}, torch.rand(n, generator=g) > 0.2


CONFIG = dataclasses.replace(fastpo.GRPO, entropy_coef=0.01, rollout_is="sequence_truncate", dual_clip=3.0)


def _spec(config=CONFIG):
    return policy_spec(config, has_ref=True, has_entropy=True, norm_length=0, num_tokens=-1.0)


def test_parallel_batch_equals_sequences_alone():
    """Enough tokens to wake the OpenMP team; each sequence's per-token derivative does not depend on
    the others (seq_mean_token_mean weights are per sequence), so it must equal a one-sequence call."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 20_000, (40,), generator=g)  # ~400k tokens >= 2^18: the parallel path
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    ins, m = _flat(int(cu[-1]), seed=4)
    args = (ins["x"], ins["old"], ins["adv"], ins["ref"], ins["ent"], ins["roll"], m)
    loss, stats, unit, unit_ent = cpu_policy.token_loss_forward(*args, cu, None, _spec())
    for i in range(0, 40, 9):
        s, e = int(cu[i]), int(cu[i + 1])
        _, _, u1, ue1 = cpu_policy.token_loss_forward(*(t[s:e] for t in args), torch.tensor([0, e - s]), None,
                                                      _spec())
        assert torch.equal(u1, unit[s:e]) and torch.equal(ue1, unit_ent[s:e])
    # ... and the whole batch against the reference (float64 reference, float32 kernel): sequences of
    # thousands of tokens, so every vectorised block and ragged block tail is compared
    x = ins["x"].double().requires_grad_()
    ent = ins["ent"].double().requires_grad_()
    want = fastpo.reference.policy_loss(x, ins["old"].double(), ins["adv"].double(), m, cu_seqlens=cu,
                                        ref_logp=ins["ref"].double(), entropy=ent,
                                        rollout_logp=ins["roll"].double(), config=CONFIG)
    want.loss.backward()
    torch.testing.assert_close(loss.double(), want.loss.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close((unit * stats[1]).double(), x.grad, atol=1e-9, rtol=1e-5)
    torch.testing.assert_close((unit_ent * stats[1]).double(), ent.grad, atol=1e-9, rtol=1e-5)
    for k, v in want.metrics.items():
        torch.testing.assert_close(stats[STATS.index(k)].double(), v, atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("surrogate", ["clip", "cispo", "sapo", "reinforce", "dppo_tv", "dppo_kl", "dro", "geo_mean",
                                       "vespo", "ratio"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_mask_equals_bool_mask(surrogate, dtype):
    """The kernel reads a float32/float64 mask (verl's response_mask) itself, non-zero = counted (NaN too, as
    torch's mask != 0): bitwise the results of the bool mask, across sequences, empty ones and the parallel path."""
    g = torch.Generator().manual_seed(11)
    lengths = torch.tensor([0, 5, 300, 1]) if dtype == torch.float64 else torch.randint(0, 20_000, (30,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    ins, m = _flat(int(cu[-1]), seed=12, dtype=dtype)
    ins["old"] = ins["old"].clamp(max=-1e-3)  # DPPO reads probabilities
    config = dataclasses.replace(fastpo.GRPO, surrogate=surrogate, dro_beta=0.3, aggregation="seq_mean_token_mean")
    spec = policy_spec(config, has_ref=True, has_entropy=False, norm_length=0, num_tokens=-1.0)
    args = (ins["x"], ins["old"], ins["adv"], ins["ref"], None, None)
    want = cpu_policy.token_loss_forward(*args, m, cu, None, spec)
    values = torch.where(m, torch.rand(m.shape, generator=g) * 3 + 0.5, torch.zeros(m.shape))
    for mask in (m.float(), m.double(), values.float(), torch.where(m, float("nan"), 0.0)):
        got = cpu_policy.token_loss_forward(*args, mask, cu, None, spec)
        for w, o in zip(want, got):
            assert torch.equal(w, o), (surrogate, mask.dtype)


@pytest.mark.parametrize("config", [CONFIG, fastpo.GSPO, fastpo.PPO], ids=["grpo+is", "gspo", "ppo"])
def test_masked_tokens_may_hold_garbage(config, backend):
    """Padding may hold anything (NaN, inf): it never reaches the loss, the gradient or a metric."""
    ins, m = _flat(24, seed=5)
    ins, m, cu = {k: v.to(backend) for k, v in ins.items()}, m.to(backend), torch.tensor([0, 10, 10, 24], device=backend)
    garbage = {k: torch.where(m, v, float("nan")) for k, v in ins.items()}
    garbage["old"] = torch.where(m, ins["old"], float("inf"))

    def step(t):
        x = t["x"].clone().requires_grad_()
        out = fastpo.policy_loss(x, t["old"], t["adv"], m, cu_seqlens=cu, ref_logp=t["ref"], entropy=t["ent"],
                                 rollout_logp=t["roll"], config=config)
        out.loss.backward()
        return out.loss, x.grad, out.metrics

    clean, dirty = step(ins), step(garbage)
    assert torch.isfinite(dirty[0]) and torch.isfinite(dirty[1]).all()
    torch.testing.assert_close(dirty[0], clean[0])
    torch.testing.assert_close(dirty[1], clean[1])
    for k in clean[2]:
        torch.testing.assert_close(dirty[2][k], clean[2][k], msg=k)


def _raw_args(n=12, dtype=np.float32):
    ins, m = _flat(n, seed=6)
    spec = dict(cpu_policy._kernel_spec(_spec(), None))  # a copy: the cases edit it, the module caches it
    a = {k: v.numpy().astype(dtype) for k, v in ins.items()}
    return dict(x=a["x"], old=a["old"], adv=a["adv"], ref=a["ref"], entropy=a["ent"], rollout=a["roll"],
                mask=m.numpy(), cu_seqlens=np.array([0, 5, 5, n], np.int64), unit=np.full(n, 7, dtype),
                unit_entropy=np.full(n, 7, dtype), stats=np.full(len(STATS), 7, dtype), spec=spec)


def test_raw_call_matches_policy_path():
    args = _raw_args()
    _C.token_loss_forward(**args)
    assert np.isfinite(args["stats"]).all() and not (args["unit"] == 7).any()


def _drop(key):
    def edit(a):
        a["spec"] = {k: v for k, v in a["spec"].items() if k != key}
    return edit


def _set(key, value):
    def edit(a):
        if key in a:
            a[key] = value
        else:
            a["spec"] = dict(a["spec"], **{key: value})
    return edit


def _overlap(a):
    a["unit_entropy"] = a["unit"][:]  # a second view of the same memory


ERRORS = {
    "spec_missing_key": (_drop("clip_low"), "spec: missing key 'clip_low'"),
    "spec_unknown_aggregation": (_set("aggregation", "mean"), "unknown aggregation 'mean'"),
    "spec_bad_kl": (_set("kl", 7), "kl must be"),
    "spec_unknown_key": (_set("future_option", 1.0), r"spec: 1 unknown key\(s\)"),
    "spec_bad_surrogate": (_set("surrogate", 99), "unknown surrogate code 99"),
    "ref_missing": (_set("ref", None), "ref: required"),
    "rollout_not_used": (lambda a: a["spec"].update(rollout=0, rollout_seq=False), "rollout: not used"),
    "dtype_mismatch": (_set("old", np.zeros(12, np.float64)), "old: must have the dtype of x"),
    "length_mismatch": (_set("adv", np.zeros(11, np.float32)), r"adv: expected shape \(12,\)"),
    "mask_dtype": (_set("mask", np.ones(12, np.int32)), "mask: expected bool, uint8, float32 or float64"),
    "mask_length": (_set("mask", np.ones(11, np.float32)), r"mask: expected shape \(12,\)"),
    "strided": (_set("ref", np.zeros(24, np.float32)[::2]), "ref: must be contiguous"),
    "cu_end": (_set("cu_seqlens", np.array([0, 5, 11], np.int64)), "cu_seqlens: must start at 0 and end at N=12"),
    "cu_decreasing": (_set("cu_seqlens", np.array([0, 6, 5, 12], np.int64)), "non-decreasing"),
    "stats_length": (_set("stats", np.zeros(3, np.float32)), r"stats: expected shape \(12,\)"),
    "outputs_overlap": (_overlap, "unit: overlaps unit_entropy"),
    "output_is_input": (lambda a: a.update(unit=a["x"]), r"unit: overlaps an input \(x\)"),
    "readonly_output": (lambda a: a["stats"].setflags(write=False), "stats: must be a writable array"),
    "not_an_array": (_set("x", [1.0, 2.0]), "x: expected an array supporting the buffer protocol"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_raise_before_writing(case):
    edit, fragment = ERRORS[case]
    args = _raw_args()
    edit(args)
    outputs = {k: args[k].copy() for k in ("unit", "unit_entropy", "stats") if isinstance(args[k], np.ndarray)}
    exc = TypeError if case == "not_an_array" else ValueError
    with pytest.raises(exc, match=fragment):
        _C.token_loss_forward(**args)
    for k, before in outputs.items():
        if case != "output_is_input" or k != "unit":
            np.testing.assert_array_equal(args[k], before, err_msg=k)
