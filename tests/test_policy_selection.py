"""Token selection and rollout correction inside fastpo.policy_loss (fastpo.ops.policy_prepass): reference vs
C++ vs Triton (interpreter), padded vs packed, float64 gradcheck, the generator, the standalone helpers,
TRL's own mask functions, token_local, NaN rollout log-probs, validation, and global selection over two
gloo ranks against the same batch in one process."""

import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import fastpo
from fastpo import PolicyLossConfig, reference
from fastpo.ops.rollout_correction import rejection_mask, rollout_is_weights
from fastpo.ops.token_selection import clip_cov_weights, high_entropy_mask, kl_cov_tokens

B, T = 6, 24
LENGTHS = [24, 17, 0, 9, 21, 3]

CONFIGS = {
    "clip_cov": PolicyLossConfig(kl_coef=0.0, clip_cov_ratio=0.1, clip_cov_lower=-2.0, clip_cov_upper=2.0),
    "kl_cov": PolicyLossConfig(surrogate="ratio", kl_coef=0.0, kl_cov_ratio=0.1, kl_cov_coef=0.5),
    "kl_cov_seq_mean": PolicyLossConfig(surrogate="cispo", kl_coef=0.0, kl_cov_ratio=0.1,
                                        aggregation="seq_mean_token_mean"),
    "entropy": PolicyLossConfig(kl_coef=0.0, top_entropy_quantile=0.3, aggregation="seq_mean_token_sum"),
    "opsm": PolicyLossConfig(kl_coef=0.0, off_policy_mask_threshold=0.02),
    "seq_product_icepop": PolicyLossConfig(kl_coef=0.0, rollout_is="sequence_mask", rollout_is_sequence_ratio="product",
                                           rollout_is_floor=0.5, rollout_is_cap=2.0),
    "token_tis_floor_norm": PolicyLossConfig(kl_coef=0.0, rollout_is="token_truncate", rollout_is_floor=0.8,
                                             rollout_is_batch_normalize=True, aggregation="token_sum_norm"),
    "rejection_chain": PolicyLossConfig(surrogate="sapo", kl_coef=0.0, rollout_is="token_mask",
                                        rollout_rejection="token_k1,seq_max_k2", rollout_rejection_threshold="1.8,0.3"),
    "everything": PolicyLossConfig(kl_coef=0.05, entropy_coef=0.01, rollout_is="sequence_truncate",
                                   rollout_is_sequence_ratio="product", rollout_is_cap=3.0, clip_cov_ratio=0.05,
                                   clip_cov_lower=-5.0, kl_cov_ratio=0.05, top_entropy_quantile=0.6,
                                   off_policy_mask_threshold=0.05, rollout_rejection="seq_mean_k3",
                                   rollout_rejection_threshold=0.2),
}


def make_batch(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    ins = dict(logp=old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
               old_logp=old, advantages=torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).contiguous(),
               ref_logp=old + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64),
               entropy=torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
               rollout_logp=old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64))
    ins = {k: v.to(dtype) for k, v in ins.items()}
    for v in ins.values():  # padding holds garbage: it must reach nothing
        v[~mask] = float("nan")
    ins["rollout_logp"][0, 2] = float("nan")  # a token vLLM could not score
    return ins, mask


def run(fn, ins, mask, cfg, packed=False, seed=3, **kw):
    logp = ins["logp"].clone().requires_grad_()
    ent = ins["entropy"].clone().requires_grad_()
    other = {k: v for k, v in ins.items() if k not in ("logp", "entropy")}
    m, cu = mask, None
    if packed:
        sel = mask.reshape(-1)
        cu = torch.tensor([0] + LENGTHS).cumsum(0)
        logp_in = logp.reshape(-1)[sel]
        ent_in = ent.reshape(-1)[sel]
        other = {k: v.reshape(-1)[sel] for k, v in other.items()}
        m = None
    else:
        logp_in, ent_in = logp, ent
    out = fn(logp_in, other["old_logp"], other["advantages"], m, cu_seqlens=cu, ref_logp=other["ref_logp"],
             entropy=ent_in, rollout_logp=other["rollout_logp"], config=cfg,
             generator=torch.Generator().manual_seed(seed), **kw)
    out.loss.backward()
    grad = torch.where(mask, logp.grad, 0.0)
    return out.loss.detach(), grad, {k: v.detach() for k, v in out.metrics.items()}


def close(a, b, tol=1e-5):
    la, ga, ma = a
    lb, gb, mb = b
    torch.testing.assert_close(la, lb, atol=tol, rtol=tol)
    torch.testing.assert_close(ga, gb, atol=tol, rtol=tol)
    assert set(ma) == set(mb)
    for k in ma:
        torch.testing.assert_close(ma[k].double(), mb[k].double(), atol=tol, rtol=tol, msg=k)


def with_backend(monkeypatch, name):
    monkeypatch.setenv("FASTPO_BACKEND", name)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cpu_equals_reference_padded_and_packed(name, monkeypatch):
    ins, mask = make_batch(0)
    cfg = CONFIGS[name]
    want = run(reference.policy_loss, ins, mask, cfg)
    with_backend(monkeypatch, "cpu")
    close(run(fastpo.policy_loss, ins, mask, cfg), want)
    close(run(fastpo.policy_loss, ins, mask, cfg, packed=True), want)
    assert all(torch.isfinite(v) for v in want[2].values()) and torch.isfinite(want[1]).all()


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov_seq_mean", "rejection_chain", "everything"])
def test_triton_interpreter_equals_reference(name, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    ins, mask = make_batch(1)
    with_backend(monkeypatch, "triton")
    close(run(fastpo.policy_loss, ins, mask, CONFIGS[name], packed=True), run(reference.policy_loss, ins, mask,
                                                                            CONFIGS[name]))


def test_gradcheck_reference_float64():
    ins, mask = make_batch(2, torch.float64)
    cfg = dataclasses.replace(CONFIGS["everything"], clip_cov_ratio=None)  # a random cut is not smooth in logp

    def f(logp, ent):
        return reference.policy_loss(logp, ins["old_logp"], ins["advantages"], mask, ref_logp=ins["ref_logp"],
                                     entropy=ent, rollout_logp=ins["rollout_logp"], config=cfg).loss

    logp = torch.where(mask, ins["logp"], -1.0).requires_grad_()
    ent = torch.where(mask, ins["entropy"], 1.0).requires_grad_()
    assert torch.autograd.gradcheck(f, (logp, ent), eps=1e-6, atol=1e-6)


def test_selection_is_the_standalone_helpers(monkeypatch):
    """The op's selections are exactly those of fastpo.ops.token_selection / rollout_correction."""
    with_backend(monkeypatch, "cpu")
    ins, mask = make_batch(4)
    x, old, adv = (torch.where(mask, ins[k], 0.0) for k in ("logp", "old_logp", "advantages"))
    cfg = CONFIGS["clip_cov"]
    keep = clip_cov_weights(x, old, adv, mask, clip_cov_ratio=0.1, clip_cov_lb=-2.0, clip_cov_ub=2.0,
                            generator=torch.Generator().manual_seed(3))
    got = run(fastpo.policy_loss, ins, mask, cfg)
    want = run(fastpo.policy_loss, ins, mask, dataclasses.replace(cfg, clip_cov_ratio=None), is_weights=keep)
    close(got[:2] + ({},), want[:2] + ({},))
    assert 0 < float(got[2]["clip_cov_frac"]) == pytest.approx(float(((keep == 0) & mask).sum() / mask.sum()))
    sel = kl_cov_tokens(x, adv, mask, kl_cov_ratio=0.1)
    assert float(run(fastpo.policy_loss, ins, mask, CONFIGS["kl_cov"])[2]["kl_cov_frac"]) == pytest.approx(
        float(sel.sum() / mask.sum()))
    ent_keep = high_entropy_mask(ins["entropy"], mask, 0.3)
    assert float(run(fastpo.policy_loss, ins, mask, CONFIGS["entropy"])[2]["entropy_mask_frac"]) == pytest.approx(
        float(ent_keep.sum() / mask.sum()))
    # a caller-passed entropy threshold replaces the quantile
    thr = torch.quantile(ins["entropy"][mask].float(), 0.7)
    close(run(fastpo.policy_loss, ins, mask, CONFIGS["entropy"], entropy_threshold=thr),
          run(fastpo.policy_loss, ins, mask, CONFIGS["entropy"]))
    keep_rs = rejection_mask(old, ins["rollout_logp"], mask, "token_k1,seq_max_k2", "1.8,0.3")
    w = rollout_is_weights(old, ins["rollout_logp"], mask, level="token", mode="mask", upper=2.0)
    plain = PolicyLossConfig(surrogate="sapo", kl_coef=0.0)
    close(run(fastpo.policy_loss, ins, mask, CONFIGS["rejection_chain"])[:2] + ({},),
          run(fastpo.policy_loss, ins, keep_rs, plain, is_weights=w)[:2] + ({},))


def test_generator_repeats_and_differs(monkeypatch):
    with_backend(monkeypatch, "cpu")
    ins, mask = make_batch(5)
    cfg = CONFIGS["clip_cov"]
    a, b = run(fastpo.policy_loss, ins, mask, cfg, seed=11), run(fastpo.policy_loss, ins, mask, cfg, seed=11)
    close(a, b, tol=0)
    others = [run(fastpo.policy_loss, ins, mask, cfg, seed=s)[1] for s in range(12, 16)]
    assert any(not torch.equal(a[1], g) for g in others)  # the pick really is random


def test_token_local():
    assert fastpo.GRPO.token_local and CONFIGS["seq_product_icepop"].token_local
    assert CONFIGS["rejection_chain"].token_local and CONFIGS["token_tis_floor_norm"].token_local
    for name in ("clip_cov", "kl_cov", "entropy", "opsm", "everything"):
        assert not CONFIGS[name].token_local, name
    assert not fastpo.CLIP_COV.token_local and not fastpo.KL_COV.token_local


def test_nan_rollout_logp_is_no_correction(monkeypatch):
    """TRL: a NaN sampling log-prob gives Δ = 0 (weight 1); the kernels' own modes and the pre-pass agree."""
    ins, mask = make_batch(6)
    clean = dict(ins, rollout_logp=ins["rollout_logp"].clone())
    clean["rollout_logp"][0, 2] = ins["old_logp"][0, 2]
    for mode in ("token_truncate", "sequence_mask"):
        for extra in ({}, {"rollout_is_batch_normalize": True}):
            cfg = PolicyLossConfig(kl_coef=0.0, rollout_is=mode, rollout_is_cap=5.0, **extra)
            for backend in ("reference", "cpu"):
                with_backend(monkeypatch, backend)
                got = run(fastpo.policy_loss, ins, mask, cfg)
                assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
                close(got, run(fastpo.policy_loss, clean, mask, cfg))


def test_validation(monkeypatch):
    ins, mask = make_batch(7)
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        PolicyLossConfig(top_entropy_quantile=0.0)
    with pytest.raises(ValueError, match="clip_cov_ratio"):
        PolicyLossConfig(clip_cov_ratio=1.5)
    with pytest.raises(ValueError, match="surrogate='clip'"):
        PolicyLossConfig(surrogate="sapo", clip_cov_ratio=0.1)
    with pytest.raises(ValueError, match="ratio_level='token'"):
        PolicyLossConfig(ratio_level="sequence", kl_cov_ratio=0.1)
    with pytest.raises(ValueError, match="rollout_is mode"):
        PolicyLossConfig(rollout_is_floor=0.5)
    with pytest.raises(ValueError, match="rollout_is_floor must be <="):
        PolicyLossConfig(rollout_is="token_mask", rollout_is_floor=3.0)
    with pytest.raises(ValueError, match="options must be"):
        PolicyLossConfig(rollout_rejection="token_k4", rollout_rejection_threshold=1.0)
    with pytest.raises(ValueError, match="needs rollout_rejection_threshold"):
        PolicyLossConfig(rollout_rejection="token_k2")
    with pytest.raises(ValueError, match="lower <= upper"):
        PolicyLossConfig(rollout_rejection="token_k1", rollout_rejection_threshold="2.0_1.0")
    with pytest.raises(TypeError, match="rollout_rejection_threshold"):
        PolicyLossConfig(rollout_rejection="token_k2", rollout_rejection_threshold=[1.0])
    x, old, adv = ins["logp"], ins["old_logp"], ins["advantages"]
    with pytest.raises(ValueError, match="pass entropy"):
        fastpo.policy_loss(x, old, adv, mask, config=CONFIGS["entropy"])
    with pytest.raises(ValueError, match="needs rollout_logp"):
        fastpo.policy_loss(x, old, adv, mask, config=PolicyLossConfig(
            kl_coef=0.0, rollout_rejection="token_k2", rollout_rejection_threshold=0.1))
    with pytest.raises(TypeError, match="generator"):
        fastpo.policy_loss(x, old, adv, mask, config=CONFIGS["clip_cov"], generator=3)
    with pytest.raises(ValueError, match="entropy_threshold applies"):
        fastpo.policy_loss(x, old, adv, mask, config=fastpo.DAPO, entropy_threshold=0.5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, port, cfg, queue):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ins, mask = make_batch(8)
        rows = slice(0, 3) if rank == 0 else slice(3, 6)
        part = {k: v[rows] for k, v in ins.items()}
        out = fastpo.reference.policy_loss(
            part["logp"], part["old_logp"], part["advantages"], mask[rows], ref_logp=part["ref_logp"],
            entropy=part["entropy"], rollout_logp=part["rollout_logp"], config=cfg, process_group=dist.group.WORLD,
            generator=torch.Generator().manual_seed(5))
        queue.put((rank, float(out.loss), {k: float(v) for k, v in out.metrics.items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cfg_name", ["clip_cov", "kl_cov"])
def test_global_selection_over_two_ranks(cfg_name):
    """Two gloo ranks holding half the batch each select as one process holding all of it (the same means,
    count and picks): with token_sum their losses add up to the whole's, and so do the selected tokens."""
    cfg = dataclasses.replace(CONFIGS[cfg_name], aggregation="token_sum")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, cfg, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = {r: (loss, m) for r, loss, m in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    ins, mask = make_batch(8)
    whole = fastpo.reference.policy_loss(ins["logp"], ins["old_logp"], ins["advantages"], mask,
                                         ref_logp=ins["ref_logp"], entropy=ins["entropy"],
                                         rollout_logp=ins["rollout_logp"], config=cfg,
                                         generator=torch.Generator().manual_seed(5))
    assert got[0][0] + got[1][0] == pytest.approx(float(whole.loss), rel=1e-5, abs=1e-6)
    # one rank's selection alone differs (its own means and count): the test can fail
    alone = fastpo.reference.policy_loss(ins["logp"][:3], ins["old_logp"][:3], ins["advantages"][:3], mask[:3],
                                         config=cfg, generator=torch.Generator().manual_seed(5))
    whole = whole.metrics
    key = "clip_cov_frac" if cfg_name == "clip_cov" else "kl_cov_frac"
    counts = [int(mask[:3].sum()), int(mask[3:].sum())]
    picked = sum(got[r][1][key] * counts[r] for r in range(2))
    assert picked == pytest.approx(float(whole[key]) * sum(counts)) and picked > 0
    assert float(alone.metrics[key]) * counts[0] != pytest.approx(got[0][1][key] * counts[0])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_cispo_clip_fraction_as_trl_and_verl(backend, monkeypatch):
    """cispo_upper's clip_frac_high is TRL's cispo_clip_ratio, mean((r > ε_max) & (A > 0)); verl's two-sided
    cispo keeps clip_frac = mean(r outside [lo, hi]) (its pg_clipfrac), whatever the sign of A."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    with_backend(monkeypatch, backend)
    ins, mask = make_batch(9)
    ins["logp"] = ins["old_logp"] + 0.8 * torch.randn(B, T, generator=torch.Generator().manual_seed(1))
    r = torch.exp(ins["logp"] - ins["old_logp"])
    a = ins["advantages"]
    mean = lambda v: float(v[mask].float().mean())  # noqa: E731
    upper = run(fastpo.policy_loss, ins, mask, dataclasses.replace(fastpo.CISPO_TRL, clip_high=0.5))[2]
    assert float(upper["clip_frac_high"]) == pytest.approx(mean((r > 1.5) & (a > 0)), abs=1e-6)
    assert mean((r > 1.5) & (a <= 0)) > 0  # the A > 0 condition matters on this batch
    both = run(fastpo.policy_loss, ins, mask, fastpo.CISPO)[2]
    assert float(both["clip_frac"]) == pytest.approx(mean((r > 1.2) | (r < 0.8)), abs=1e-6)
