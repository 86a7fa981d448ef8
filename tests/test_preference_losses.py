"""dpo_loss, simpo_loss, orpo_loss, kto_loss against their papers' formulas, written out here in float64."""

import math

import pytest
import torch

import fastpo
from helpers import assert_raises_unmodified

LOSS_TYPES = ["sigmoid", "robust", "hinge", "ipo"]


def _pairs(n=9, seed=0, dtype=torch.float64):
    """Sequence log-probs of chosen / rejected responses under the policy and a nearby reference."""
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = -40 * torch.rand(n, generator=g) - 1, -40 * torch.rand(n, generator=g) - 1
    ref_chosen = chosen + 5 * torch.randn(n, generator=g)
    ref_rejected = rejected + 5 * torch.randn(n, generator=g)
    return [t.to(dtype) for t in (chosen, rejected, ref_chosen, ref_rejected)]


def _sigmoid(z):
    return 1 / (1 + torch.exp(-z))


# --- the papers' formulas (naive forms; fine for the moderate values used against them) ----------


def paper_dpo(c, r, rc, rr, beta, loss_type, eps):
    h = (c - rc) - (r - rr)  # log [π(y_w)/π_ref(y_w)] − log [π(y_l)/π_ref(y_l)]
    if loss_type == "sigmoid":  # DPO, with cDPO's conservative targets (1 − ε, ε)
        losses = (1 - eps) * torch.log(1 + torch.exp(-beta * h)) + eps * torch.log(1 + torch.exp(beta * h))
    elif loss_type == "robust":  # Chowdhury et al.: unbiased loss under label flips with rate ε
        losses = ((1 - eps) * torch.log(1 + torch.exp(-beta * h)) - eps * torch.log(1 + torch.exp(beta * h))) \
            / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.maximum(torch.zeros_like(h), 1 - beta * h)
    else:  # IPO: regress h to 1/(2β) (the paper's τ = β)
        losses = (h - 1 / (2 * beta)) ** 2
    return losses.mean()


def paper_simpo(c, r, beta, gamma):
    return -torch.log(_sigmoid(beta * c - beta * r - gamma)).mean()


def paper_orpo(c, r, lam):
    pc, pr = torch.exp(c), torch.exp(r)
    odds_c, odds_r = pc / (1 - pc), pr / (1 - pr)
    return (-lam * torch.log(_sigmoid(torch.log(odds_c / odds_r)))).mean()


def paper_kto(lp, ref, desirable, beta, lam_d, lam_u, z0):
    r = lp - ref
    v = torch.where(desirable, lam_d * _sigmoid(beta * (r - z0)), lam_u * _sigmoid(beta * (z0 - r)))
    lam = torch.where(desirable, torch.full_like(r, lam_d), torch.full_like(r, lam_u))
    return (lam - v).mean()


def _grads(fn, *inputs):
    """Value and gradients of ``fn`` w.r.t. every input (fresh float64 leaves)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    value = fn(*leaves)
    value.backward()
    return value.detach(), [x.grad for x in leaves]


def _assert_matches(got_fn, want_fn, inputs, n_grad):
    got, got_grads = _grads(got_fn, *inputs)
    want, want_grads = _grads(want_fn, *inputs)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    for a, b in zip(got_grads[:n_grad], want_grads[:n_grad]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_paper(loss_type, beta):
    smoothing = [0.0] if loss_type in ("hinge", "ipo") else [0.0, 0.2]
    for eps in smoothing:
        _assert_matches(
            lambda c, r, rc, rr: fastpo.dpo_loss(c, r, rc, rr, beta=beta, loss_type=loss_type,
                                                 label_smoothing=eps).loss,
            lambda c, r, rc, rr: paper_dpo(c, r, rc, rr, beta, loss_type, eps),
            _pairs(seed=int(beta * 10)), n_grad=2)


def test_dpo_metrics_and_constant_references():
    c, r, rc, rr = _pairs(seed=3)
    leaves = [t.clone().requires_grad_() for t in (c, r, rc, rr)]
    out = fastpo.dpo_loss(*leaves, beta=0.2)
    reward_c, reward_r = 0.2 * (c - rc), 0.2 * (r - rr)
    want = {"reward_chosen": reward_c.mean(), "reward_rejected": reward_r.mean(),
            "reward_accuracy": (reward_c > reward_r).double().mean(), "reward_margin": (reward_c - reward_r).mean(),
            "logps_chosen": c.mean(), "logps_rejected": r.mean()}
    assert set(out.metrics) == set(want)
    for key, value in want.items():
        assert not out.metrics[key].requires_grad
        torch.testing.assert_close(out.metrics[key], value)
    assert 0 < want["reward_accuracy"] < 1  # the case tells a wrong comparison apart
    out.loss.backward()
    assert leaves[2].grad is None and leaves[3].grad is None  # the reference is a constant
    assert leaves[0].grad is not None


def test_dpo_reference_free_is_zero_reference():
    c, r, _, _ = _pairs(seed=4)
    free = fastpo.dpo_loss(c, r, beta=0.3)
    zero = fastpo.dpo_loss(c, r, torch.zeros_like(c), torch.zeros_like(r), beta=0.3)
    torch.testing.assert_close(free.loss, zero.loss)
    torch.testing.assert_close(free.metrics["reward_chosen"], 0.3 * c.mean())
    tie = fastpo.dpo_loss(c, c.clone())
    assert tie.metrics["reward_accuracy"] == 0 and tie.metrics["reward_margin"] == 0  # a tie is not a win (TRL: >)


@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 0.3), (10.0, 0.0)])
def test_simpo_matches_paper(beta, gamma):
    """SimPO's reward is β/|y|·log π(y|x): length-average token log-probs with sequence_logprobs first."""
    g = torch.Generator().manual_seed(5)
    token_c, token_r = -2 * torch.rand(4, 9, generator=g).double(), -2 * torch.rand(4, 9, generator=g).double()
    len_c, len_r = torch.tensor([9, 3, 5, 1]), torch.tensor([2, 9, 6, 4])
    mask_c, mask_r = torch.arange(9) < len_c[:, None], torch.arange(9) < len_r[:, None]

    def ours(tc, tr):
        c = fastpo.sequence_logprobs(tc, mask_c, average=True)
        r = fastpo.sequence_logprobs(tr, mask_r, average=True)
        return fastpo.simpo_loss(c, r, beta=beta, gamma=gamma).loss

    def paper(tc, tr):
        c, r = (tc * mask_c).sum(-1) / len_c, (tr * mask_r).sum(-1) / len_r
        return paper_simpo(c, r, beta, gamma)

    _assert_matches(ours, paper, (token_c, token_r), n_grad=2)


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_matches_paper(lam):
    g = torch.Generator().manual_seed(6)
    # Average log-probs spanning both branches of the stable log(1 − e^x): around −ln 2 and far below.
    c = -torch.cat([torch.rand(5, generator=g) * 0.6 + 0.01, torch.rand(5, generator=g) * 8 + 0.7]).double()
    r = -torch.cat([torch.rand(5, generator=g) * 8 + 0.7, torch.rand(5, generator=g) * 0.6 + 0.01]).double()
    _assert_matches(lambda a, b: fastpo.orpo_loss(a, b, beta=lam).loss, lambda a, b: paper_orpo(a, b, lam),
                    (c, r), n_grad=2)
    out = fastpo.orpo_loss(c, r, beta=lam)
    log_odds = lambda x: torch.log(torch.exp(x) / (1 - torch.exp(x)))  # noqa: E731
    diff = log_odds(c) - log_odds(r)
    torch.testing.assert_close(out.metrics["log_odds_chosen"], diff.mean())
    torch.testing.assert_close(out.metrics["log_odds_ratio"], torch.log(_sigmoid(diff)).mean())
    torch.testing.assert_close(out.metrics["reward_margin"], lam * (c - r).mean())


def test_orpo_extremes():
    """Log-odds of −1e4 are −1e4; a probability of 1 (logp = 0) gives finite values and gradients."""
    c = torch.tensor([-1e4, -1.0, 0.0, -1e-12], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-1.0, -1e4, -1e4, -3.0], dtype=torch.float64)
    out = fastpo.orpo_loss(c, r, beta=0.5)
    log_odds_1 = -1 - math.log(1 - math.exp(-1))
    # −logσ(y) is ≈ −y for y = −1e4 − log_odds_1 and below 1e-13 for the other pairs (y > 30).
    torch.testing.assert_close(out.loss, torch.tensor(0.5 * (1e4 + log_odds_1) / 4, dtype=torch.float64),
                               atol=1e-8, rtol=0)
    out.loss.backward()
    assert torch.isfinite(c.grad).all()


@pytest.mark.parametrize("z0", [None, 0.0, 0.7, -2.0])
def test_kto_matches_paper(z0):
    g = torch.Generator().manual_seed(7)
    lp, _, ref, _ = _pairs(n=10, seed=7)
    desirable = torch.rand(10, generator=g) < 0.5
    desirable[:2] = torch.tensor([True, False])
    point = 0.0 if z0 is None else max(z0, 0.0)  # z0 is clamped at 0, as TRL clamps its KL estimate
    _assert_matches(
        lambda a, b: fastpo.kto_loss(a, b, desirable, beta=0.2, desirable_weight=1.3, undesirable_weight=0.6,
                                     kl_ref_point=z0).loss,
        lambda a, b: paper_kto(a, b, desirable, 0.2, 1.3, 0.6, point),
        (lp, ref), n_grad=1)


def test_kto_metrics_and_detached_reference_point():
    lp = torch.tensor([-3.0, -5.0, -2.0, -9.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-4.0, -4.0, -4.0, -4.0], dtype=torch.float64, requires_grad=True)
    desirable = torch.tensor([1, 1, 0, 0])
    z0 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    out = fastpo.kto_loss(lp, ref, desirable, beta=0.1, kl_ref_point=z0)
    ratio = torch.tensor([1.0, -1.0, 2.0, -5.0], dtype=torch.float64)  # lp − ref
    torch.testing.assert_close(out.metrics["reward_chosen"], 0.1 * ratio[:2].mean())
    torch.testing.assert_close(out.metrics["reward_rejected"], 0.1 * ratio[2:].mean())
    torch.testing.assert_close(out.metrics["reward_margin"], 0.1 * (ratio[:2].mean() - ratio[2:].mean()))
    # right sign of ratio − z0: sample 0 (desirable, 0.5 > 0) and sample 3 (undesirable, −5.5 < 0)
    torch.testing.assert_close(out.metrics["reward_accuracy"], torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(out.metrics["kl_ref_point"], torch.tensor(0.5, dtype=torch.float64))
    out.loss.backward()
    assert z0.grad is None and ref.grad is None and lp.grad is not None


def test_kto_one_sided_batches():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.5])
    for flag in (True, False):
        out = fastpo.kto_loss(lp, ref, torch.full((2,), flag), beta=0.5)
        assert all(torch.isfinite(v) for v in out.metrics.values())
        empty_side = "reward_rejected" if flag else "reward_chosen"
        assert out.metrics[empty_side] == 0


def _all_losses(c, r, rc, rr):
    """Every loss and variant on the same inputs: name -> LossOutput."""
    outs = {f"dpo-{t}": fastpo.dpo_loss(c, r, rc, rr, loss_type=t) for t in LOSS_TYPES}
    outs["dpo-cdpo"] = fastpo.dpo_loss(c, r, rc, rr, label_smoothing=0.1)
    outs["dpo-robust-eps"] = fastpo.dpo_loss(c, r, rc, rr, loss_type="robust", label_smoothing=0.3)
    outs["simpo"] = fastpo.simpo_loss(c, r)
    outs["orpo"] = fastpo.orpo_loss(c, r)
    desirable = torch.arange(c.numel(), device=c.device).reshape(c.shape) % 2 == 0
    outs["kto"] = fastpo.kto_loss(c, rc, desirable, kl_ref_point=torch.tensor(3.0))
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_log_probs_stay_finite(dtype):
    """Log-probs of −1e4 (and of 0) give finite losses, metrics and gradients for every loss."""
    values = [-1e4, 0.0, -1e4, -0.5, -1e4]
    c = torch.tensor(values, dtype=dtype, requires_grad=True)
    r = torch.tensor(values[::-1], dtype=dtype, requires_grad=True)
    rc, rr = torch.tensor([0.0, -1e4, -1e4, 0.0, -1.0], dtype=dtype), torch.zeros(5, dtype=dtype)
    for name, out in _all_losses(c, r, rc, rr).items():
        assert out.loss.dtype == torch.float32, name
        assert torch.isfinite(out.loss), name
        assert all(torch.isfinite(v) for v in out.metrics.values()), name
        c.grad = r.grad = None
        out.loss.backward()
        assert c.grad.dtype == dtype and torch.isfinite(c.grad).all(), name
        if r.grad is not None:
            assert torch.isfinite(r.grad).all(), name


def test_extreme_dpo_values():
    """βx = ∓1000: the sigmoid loss is 1000 (not inf) or 0, with gradient −β·σ(−βx) per pair."""
    c = torch.tensor([-1e4, 0.0], requires_grad=True)
    r = torch.tensor([0.0, -1e4])
    out = fastpo.dpo_loss(c, r, beta=0.1)
    torch.testing.assert_close(out.loss, torch.tensor(500.0))
    out.loss.backward()
    torch.testing.assert_close(c.grad, torch.tensor([-0.05, 0.0]))


def test_empty_batch_gives_zero():
    e = torch.zeros(0)
    for name, out in _all_losses(e, e, e, e).items():
        assert out.loss == 0, name
        assert all(torch.isfinite(v) for v in out.metrics.values()), name


def test_any_shape_is_averaged_over_all_pairs():
    c, r, rc, rr = _pairs(n=6, seed=8)
    flat = _all_losses(c, r, rc, rr)
    grid = _all_losses(*(t.reshape(2, 3) for t in (c, r, rc, rr)))
    for name in flat:
        torch.testing.assert_close(grid[name].loss, flat[name].loss)


def test_low_precision_inputs_compute_in_float32():
    c, r, rc, rr = _pairs(seed=9, dtype=torch.bfloat16)
    for loss_type in LOSS_TYPES:
        got = fastpo.dpo_loss(c, r, rc, rr, loss_type=loss_type).loss
        want = paper_dpo(c.double(), r.double(), rc.double(), rr.double(), 0.1, loss_type, 0.0)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_compiled_dpo_pipeline_matches_eager(cpu_backend):
    """torch.compile(fullgraph=True): token log-probs → sequence_logprobs (padded and packed) → losses."""
    g = torch.Generator().manual_seed(10)
    token_logp = -3 * torch.rand(4, 7, generator=g)
    mask = torch.rand(4, 7, generator=g) < 0.8
    ref_seq = -10 * torch.rand(4, generator=g)
    cu = torch.tensor([0, 5, 5, 12, 20])
    desirable = torch.tensor([True, False, True, False])

    def pipeline(x, flat):
        seq = fastpo.sequence_logprobs(x, mask)
        packed = fastpo.sequence_logprobs(flat, cu_seqlens=cu, average=True)
        dpo = fastpo.dpo_loss(seq[:2], seq[2:], ref_seq[:2], ref_seq[2:], loss_type="robust", label_smoothing=0.1)
        simpo = fastpo.simpo_loss(packed[:2], packed[2:])
        orpo = fastpo.orpo_loss(packed[:2], packed[2:])
        kto = fastpo.kto_loss(seq, ref_seq, desirable, kl_ref_point=ref_seq.mean().abs())
        return dpo.loss + simpo.loss + orpo.loss + kto.loss, dpo.metrics["reward_margin"]

    def run(fn):
        x = token_logp.clone().requires_grad_()
        flat = token_logp.reshape(-1)[:20].clone().requires_grad_()
        loss, margin = fn(x, flat)
        loss.backward()
        return loss.detach(), margin, x.grad, flat.grad

    torch._dynamo.reset()
    compiled = torch.compile(pipeline, fullgraph=True)
    for got, want in zip(run(compiled), run(pipeline)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _error_inputs():
    c, r, rc, rr = _pairs(n=3, seed=11, dtype=torch.float32)
    return dict(c=c, r=r, rc=rc, rr=rr, desirable=torch.tensor([True, False, True]))


ERROR_CASES = [
    # (description, call, exception, message fragment)
    ("dpo shape mismatch", lambda t: fastpo.dpo_loss(t["c"], t["r"][:2]), ValueError, "(2,)"),
    ("dpo ref shape", lambda t: fastpo.dpo_loss(t["c"], t["r"], t["rc"][:1], t["rr"]), ValueError,
     "ref_chosen_logp (1,)"),
    ("dpo integer", lambda t: fastpo.dpo_loss(t["c"].long(), t["r"]), TypeError, "chosen_logp"),
    ("dpo not a tensor", lambda t: fastpo.dpo_loss([0.0], t["r"]), TypeError, "chosen_logp"),
    ("dpo one reference", lambda t: fastpo.dpo_loss(t["c"], t["r"], t["rc"]), ValueError, "ref_rejected_logp"),
    ("dpo beta 0", lambda t: fastpo.dpo_loss(t["c"], t["r"], beta=0.0), ValueError, "beta"),
    ("dpo beta negative", lambda t: fastpo.dpo_loss(t["c"], t["r"], beta=-0.1), ValueError, "beta"),
    ("dpo beta nan", lambda t: fastpo.dpo_loss(t["c"], t["r"], beta=float("nan")), ValueError, "beta"),
    ("dpo beta str", lambda t: fastpo.dpo_loss(t["c"], t["r"], beta="0.1"), TypeError, "beta"),
    ("dpo unknown loss_type", lambda t: fastpo.dpo_loss(t["c"], t["r"], loss_type="kto"), ValueError, "loss_type"),
    ("dpo loss_type not str", lambda t: fastpo.dpo_loss(t["c"], t["r"], loss_type=1), TypeError, "loss_type"),
    ("sigmoid smoothing 0.5", lambda t: fastpo.dpo_loss(t["c"], t["r"], label_smoothing=0.5), ValueError,
     "label_smoothing"),
    ("robust smoothing 0.5", lambda t: fastpo.dpo_loss(t["c"], t["r"], loss_type="robust", label_smoothing=0.5),
     ValueError, "[0, 0.5)"),
    ("negative smoothing", lambda t: fastpo.dpo_loss(t["c"], t["r"], label_smoothing=-0.1), ValueError,
     "label_smoothing"),
    ("ipo smoothing", lambda t: fastpo.dpo_loss(t["c"], t["r"], loss_type="ipo", label_smoothing=0.1), ValueError,
     "label_smoothing"),
    ("hinge smoothing", lambda t: fastpo.dpo_loss(t["c"], t["r"], loss_type="hinge", label_smoothing=0.1),
     ValueError, "hinge"),
    ("simpo shape", lambda t: fastpo.simpo_loss(t["c"], t["r"].reshape(3, 1)), ValueError, "(3, 1)"),
    ("simpo gamma inf", lambda t: fastpo.simpo_loss(t["c"], t["r"], gamma=float("inf")), ValueError, "gamma"),
    ("simpo beta 0", lambda t: fastpo.simpo_loss(t["c"], t["r"], beta=0), ValueError, "beta"),
    ("orpo integer", lambda t: fastpo.orpo_loss(t["c"], t["r"].int()), TypeError, "rejected_avg_logp"),
    ("orpo beta bool", lambda t: fastpo.orpo_loss(t["c"], t["r"], beta=True), TypeError, "beta"),
    ("kto ref shape", lambda t: fastpo.kto_loss(t["c"], t["rc"][:2], t["desirable"]), ValueError, "ref_logp (2,)"),
    ("kto desirable shape", lambda t: fastpo.kto_loss(t["c"], t["rc"], t["desirable"][:2]), ValueError,
     "desirable (2,)"),
    ("kto desirable float", lambda t: fastpo.kto_loss(t["c"], t["rc"], t["desirable"].float()), TypeError,
     "desirable"),
    ("kto desirable list", lambda t: fastpo.kto_loss(t["c"], t["rc"], [True, False, True]), TypeError,
     "desirable"),
    ("kto negative weight", lambda t: fastpo.kto_loss(t["c"], t["rc"], t["desirable"], undesirable_weight=-1.0),
     ValueError, "undesirable_weight"),
    ("kto kl two values", lambda t: fastpo.kto_loss(t["c"], t["rc"], t["desirable"], kl_ref_point=torch.ones(2)),
     ValueError, "kl_ref_point"),
    ("kto kl integer tensor",
     lambda t: fastpo.kto_loss(t["c"], t["rc"], t["desirable"], kl_ref_point=torch.tensor(1)), TypeError,
     "kl_ref_point"),
    ("kto kl str", lambda t: fastpo.kto_loss(t["c"], t["rc"], t["desirable"], kl_ref_point="0"), TypeError,
     "kl_ref_point"),
    ("kto beta inf", lambda t: fastpo.kto_loss(t["c"], t["rc"], t["desirable"], beta=math.inf), ValueError, "beta"),
]


@pytest.mark.parametrize("name,call,exc,fragment", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors(name, call, exc, fragment):
    assert_raises_unmodified(lambda **tensors: call(tensors), _error_inputs(), exc, fragment=fragment)
