"""The DPO variants, CPO/AlphaPO, KTO's apo_zero_unpaired and the token helpers (issue 15).

Float64 gradcheck of every new loss, finiteness at log-probs of −1e4 and on all-equal inputs, the
helpers (``ld_sequence_logprobs``, ``wpo_weights``, ``nll_loss``, through the fused
``sequence_logprobs``) on every backend against TRL's formulas written out here, and the errors.
TRL parity itself is in test_parity_trl_preference.py.
"""

import pytest
import torch

import fastpo
from helpers import assert_raises_unmodified

DPO_TYPES = list(fastpo.dpo.DPO_LOSS_TYPES)
F_OK = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
F_DIVS = ["forward_kl", "js_divergence", "alpha_divergence"]


def _pairs(n=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    c, r = -10 * torch.rand(n, generator=g) - 1, -10 * torch.rand(n, generator=g) - 1
    rc, rr = c + 2 * torch.randn(n, generator=g), r + 2 * torch.randn(n, generator=g)
    lengths = torch.randint(1, 12, (2, n), generator=g)
    return [t.to(dtype) for t in (c, r, rc, rr)] + [lengths[0], lengths[1]]


def _kwargs(loss_type, f_divergence="reverse_kl", nll=None, **extra):
    kw = dict(loss_type=loss_type, f_divergence=f_divergence, **extra)
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    if "exo_pair" in types and "label_smoothing" not in kw:
        kw["label_smoothing"] = 1e-3
    if "sft" in types:
        kw["nll"] = nll
    return kw


@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_gradcheck(loss_type):
    c, r, rc, rr, lc, lr = _pairs(seed=1)
    nll = torch.tensor(1.7, dtype=torch.float64)
    divs = ["reverse_kl"] + (F_DIVS if loss_type in F_OK else [])
    for f in divs:
        def fn(c_, r_, nll_):
            kw = _kwargs(loss_type, f, nll_, f_alpha=0.3, beta=0.3, chosen_lengths=lc, rejected_lengths=lr)
            return fastpo.dpo_loss(c_ / 4, r_ / 4, rc / 4, rr / 4, **kw).loss
        inputs = [x.clone().requires_grad_() for x in (c, r, nll)]
        assert torch.autograd.gradcheck(fn, inputs), (loss_type, f)


def test_dpo_combinations_gradcheck_and_sum():
    """MPO: Σ w_k·loss_k, with WPO weights multiplying every per-pair term; rpo_alpha = ("sft", α)."""
    c, r, rc, rr, lc, lr = _pairs(seed=2)
    w = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.2
    nll = torch.tensor(0.9, dtype=torch.float64)
    types, weights = ["sigmoid", "bco_pair", "sft", "ipo"], [0.8, 0.2, 1.0, -0.3]
    common = dict(beta=0.2, chosen_lengths=lc, rejected_lengths=lr, weights=w)
    total = fastpo.dpo_loss(c, r, rc, rr, loss_type=types, loss_weights=weights, nll=nll, **common).loss
    parts = [fastpo.dpo_loss(c, r, rc, rr, **_kwargs(t, nll=nll), **common).loss for t in types]
    torch.testing.assert_close(total, sum(k * p for k, p in zip(weights, parts)))
    # the WPO weight multiplies each pair's loss before the mean (sft: nll · mean(w))
    torch.testing.assert_close(parts[2], nll * w.mean())
    rpo = fastpo.dpo_loss(c, r, rc, rr, beta=0.2, rpo_alpha=0.7, nll=nll)
    spelled = fastpo.dpo_loss(c, r, rc, rr, beta=0.2, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7], nll=nll)
    torch.testing.assert_close(rpo.loss, spelled.loss)
    torch.testing.assert_close(rpo.metrics["nll_loss"], nll)
    fn = lambda c_, r_, n_: fastpo.dpo_loss(c_, r_, rc, rr, loss_type=types, loss_weights=weights, nll=n_,  # noqa
                                           beta=0.2, chosen_lengths=lc, rejected_lengths=lr, weights=w).loss
    assert torch.autograd.gradcheck(fn, [x.clone().requires_grad_() for x in (c, r, nll)])
    wl = w.clone().requires_grad_()
    fastpo.dpo_loss(c.clone().requires_grad_(), r, rc, rr, weights=wl).loss.backward()
    assert wl.grad is None  # the pair weights are constants, as TRL computes them under no_grad


def test_dpo_formulas_spot_check():
    """A few loss types against their papers' formulas, written naively here."""
    c, r, rc, rr, lc, lr = _pairs(seed=4)
    beta = 0.4
    rho_c, rho_r = c - rc, r - rr
    sig = torch.sigmoid
    want = {
        "nca_pair": -torch.log(sig(beta * rho_c)) - 0.5 * torch.log(sig(-beta * rho_c))
        - 0.5 * torch.log(sig(-beta * rho_r)),
        "sppo_hard": (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2,
        "apo_zero": 1 - sig(beta * rho_c) + sig(beta * rho_r),
        "apo_down": sig(beta * rho_c) + 1 - sig(beta * (rho_c - rho_r)),
        "sigmoid_norm": -torch.log(sig(beta * (rho_c / lc - rho_r / lr))),
        "discopop": (1 - sig(beta * (rho_c - rho_r) / 0.05)) * -torch.log(sig(beta * (rho_c - rho_r)))
        + sig(beta * (rho_c - rho_r) / 0.05) * torch.exp(-beta * (rho_c - rho_r)),
    }
    for name, per_pair in want.items():
        got = fastpo.dpo_loss(c, r, rc, rr, beta=beta, loss_type=name, chosen_lengths=lc, rejected_lengths=lr).loss
        torch.testing.assert_close(got, per_pair.mean(), msg=name)
    js = fastpo.dpo_loss(c, r, rc, rr, beta=beta, f_divergence="js_divergence").loss
    score = lambda x: torch.log(2 * torch.exp(x) / (torch.exp(x) + 1))  # noqa: E731  f'(t) = log(2t/(t+1))
    torch.testing.assert_close(js, -torch.log(sig(beta * (score(rho_c) - score(rho_r)))).mean())


def _all_variants(c, r, rc, rr, lc, lr, nll, w, desirable):
    outs = {}
    for t in DPO_TYPES:
        for f in ["reverse_kl"] + (F_DIVS if t in F_OK else []):
            kw = _kwargs(t, f, nll, chosen_lengths=lc, rejected_lengths=lr)
            if t not in ("aot", "aot_unpaired"):
                kw["weights"] = w
            outs[f"dpo-{t}-{f}"] = fastpo.dpo_loss(c, r, rc, rr, **kw)
    for t in ("sigmoid", "hinge", "ipo", "simpo"):
        for alpha in (0.0, 0.25, -0.5):
            outs[f"cpo-{t}-{alpha}"] = fastpo.cpo_loss(c, r, loss_type=t, alpha=alpha, nll=nll)
    outs["alphapo"] = fastpo.cpo_loss(c, r, loss_type="alphapo", alpha=0.25)
    outs["apo_zero_unpaired"] = fastpo.kto_loss(c, rc, desirable, loss_type="apo_zero_unpaired")
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_and_equal_inputs_stay_finite(dtype):
    """Log-probs and log-ratios of ±1e4, and all-equal inputs: finite loss, metrics and gradients."""
    cases = {
        "extreme": ([-1e4, 0.0, -1e4, -0.5, -1e4], [-1e4, -3.0, 0.0, -1e4, -1e4],
                    [0.0, -1e4, -1e4, 0.0, -1.0], [0.0, 0.0, -1e4, -1e4, 0.0]),
        "equal": ([-2.0] * 5,) * 4,
    }
    lengths = torch.tensor([1, 3, 100, 7, 2])
    for name, values in cases.items():
        c, r = (torch.tensor(v, dtype=dtype, requires_grad=True) for v in values[:2])
        rc, rr = (torch.tensor(v, dtype=dtype) for v in values[2:])
        nll = torch.tensor(1e4, dtype=dtype, requires_grad=True)
        w = fastpo.wpo_weights(torch.tensor([[-1e4, 0.0]] * 5), torch.tensor([[-2e4, 0.0]] * 5))
        assert torch.isfinite(w).all()
        outs = _all_variants(c, r, rc, rr, lengths, lengths.flip(0), nll, w, torch.tensor([1, 0, 1, 0, 1]) > 0)
        for key, out in outs.items():
            assert torch.isfinite(out.loss), (name, key, out.loss)
            assert all(torch.isfinite(v) for v in out.metrics.values()), (name, key)
            c.grad = r.grad = None
            out.loss.backward()
            for x in (c, r):
                assert x.grad is None or torch.isfinite(x.grad).all(), (name, key)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo", "alphapo"])
def test_cpo_gradcheck_and_formula(loss_type):
    c, r, _, _, _, _ = _pairs(seed=5)
    c, r = c / 10, r / 10
    nll = torch.tensor(2.3, dtype=torch.float64)
    for alpha in (0.0, 0.3):
        kw = dict(beta=0.5, loss_type=loss_type, alpha=alpha, simpo_gamma=0.4)
        if loss_type != "alphapo":
            kw.update(nll=nll, cpo_alpha=0.6)
        fn = lambda c_, r_: fastpo.cpo_loss(c_, r_, **kw).loss  # noqa: E731
        assert torch.autograd.gradcheck(fn, [c.clone().requires_grad_(), r.clone().requires_grad_()])
        rew = (lambda x: (1 - torch.exp(x) ** -alpha) / alpha) if alpha else (lambda x: x)  # AlphaPO's r(p)
        u = rew(c) - rew(r)
        per = {"sigmoid": -torch.log(torch.sigmoid(0.5 * u)), "hinge": torch.relu(1 - 0.5 * u),
               "ipo": (u - 1.0) ** 2}.get(loss_type, -torch.log(torch.sigmoid(0.5 * (u - 0.4 / 0.5))))
        want = per.mean() + (0.6 * nll if loss_type != "alphapo" else 0)
        torch.testing.assert_close(fn(c, r), want)


def test_kto_apo_zero_unpaired_and_reference_point():
    lp = torch.tensor([-3.0, -5.0, -2.0, -9.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-4.0, -4.0, -4.0, -4.0], dtype=torch.float64)
    good = torch.tensor([True, False, True, False])
    out = fastpo.kto_loss(lp, ref, good, beta=0.5, desirable_weight=2.0, loss_type="apo_zero_unpaired")
    rho = lp.detach() - ref
    want = torch.where(good, 2.0 * (1 - torch.sigmoid(0.5 * rho)), torch.sigmoid(0.5 * rho)).mean()
    torch.testing.assert_close(out.loss, want)
    assert torch.autograd.gradcheck(lambda x: fastpo.kto_loss(x, ref, good, loss_type="apo_zero_unpaired").loss,
                                    [lp.detach().clone().requires_grad_()])
    kl_lp, kl_ref = torch.tensor([-3.0, -1.0, -6.0]), torch.tensor([-2.0, -2.0, -2.0])
    torch.testing.assert_close(fastpo.kto_kl_ref_point(kl_lp, kl_ref), torch.tensor(0.0))  # mean −1/3 → 0
    torch.testing.assert_close(fastpo.kto_kl_ref_point(kl_lp + 2, kl_ref), torch.tensor(2 / 3))
    assert fastpo.kto_kl_ref_point(torch.zeros(0), torch.zeros(0)) == 0
    z = fastpo.kto_kl_ref_point(kl_lp.requires_grad_(), kl_ref)
    assert not z.requires_grad


def _token_case(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    tc, tr = -3 * torch.rand(4, 6, generator=g), -3 * torch.rand(4, 5, generator=g)
    mc = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    mr = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    tc = tc.masked_fill(mc == 0, float("nan"))  # masked tokens are ignored whatever they hold
    return [x.to(device) for x in (tc, tr, mc, mr)]


def test_ld_sequence_logprobs_matches_trl_formula(backend):
    """TRL: shared = min(len_c, len_r); sum over counted positions ≤ shared + α·sum over the rest."""
    tc, tr, mc, mr = _token_case(backend)
    for alpha in (0.0, 0.3, 1.0):
        c, r = fastpo.ld_sequence_logprobs(tc, tr, mc, mr, ld_alpha=alpha)
        shared = torch.minimum(mc.sum(1), mr.sum(1))[:, None]
        for got, x, m in ((c, tc, mc), (r, tr, mr)):
            pos = m.cumsum(1)
            x0 = torch.nan_to_num(x) * m
            want = (x0 * (pos <= shared)).sum(1) + alpha * (x0 * (pos > shared)).sum(1)
            torch.testing.assert_close(got, want)
    x = tc.detach().clone().requires_grad_()
    c, _ = fastpo.ld_sequence_logprobs(x, tr, mc, mr, ld_alpha=0.3)
    c.sum().backward()
    pos, shared = mc.cumsum(1), torch.minimum(mc.sum(1), mr.sum(1))[:, None]
    want = torch.where(pos <= shared, 1.0, 0.3) * mc
    torch.testing.assert_close(x.grad, want)


def test_nll_and_wpo_weights(backend):
    tc, tr, mc, mr = _token_case(backend, seed=1)
    x = tc.detach().clone().requires_grad_()
    nll = fastpo.nll_loss(x, mc)
    counted = torch.nan_to_num(tc)[mc.bool()]
    torch.testing.assert_close(nll, -counted.mean())  # one mean over every counted token (TRL's sft / CPO)
    nll.backward()
    torch.testing.assert_close(x.grad, -mc.float() / mc.sum())
    packed = fastpo.nll_loss(tr.reshape(-1), cu_seqlens=torch.tensor([0, 5, 12, 20], device=backend))
    torch.testing.assert_close(packed, -tr.reshape(-1)[:20].mean())
    assert fastpo.nll_loss(tc, torch.zeros_like(mc)) == 0  # nothing counted: 0, not NaN
    torch.testing.assert_close(fastpo.nll_loss(tr.reshape(-1)), -tr.mean())  # a flat run of tokens
    torch.testing.assert_close(fastpo.reference.nll_loss(tc, mc), nll.detach())
    lssp = 2 * torch.nan_to_num(tc) - 0.5
    w = fastpo.wpo_weights(tc, lssp, mc)
    aligned = (torch.nan_to_num(tc) - lssp) * mc
    torch.testing.assert_close(w, torch.exp(aligned.sum(1) / mc.sum(1).clamp(min=1)))
    assert not w.requires_grad and w[2] == 1  # an empty response: mean 0, weight 1


def _e():
    c, r, rc, rr, lc, lr = _pairs(n=3, seed=9, dtype=torch.float32)
    return dict(c=c, r=r, rc=rc, rr=rr, lc=lc, lr=lr, nll=torch.tensor(1.0), tok=-torch.rand(3, 4),
                mask=torch.ones(3, 4, dtype=torch.bool), good=torch.tensor([True, False, True]))


ERRORS = [
    ("unknown type in list", lambda t: fastpo.dpo_loss(t["c"], t["r"], loss_type=["sigmoid", "kto"]), ValueError,
     "'kto'"),
    ("empty list", lambda t: fastpo.dpo_loss(t["c"], t["r"], loss_type=[]), TypeError, "loss_type"),
    ("weights length", lambda t: fastpo.dpo_loss(t["c"], t["r"], loss_type=["sigmoid", "ipo"], loss_weights=[1.0]),
     ValueError, "loss_weights"),
    ("exo without eps", lambda t: fastpo.dpo_loss(t["c"], t["r"], loss_type="exo_pair"), ValueError, "exo_pair"),
    ("f-div with bco", lambda t: fastpo.dpo_loss(t["c"], t["r"], loss_type="bco_pair", f_divergence="forward_kl"),
     ValueError, "bco_pair"),
    ("unknown f-div", lambda t: fastpo.dpo_loss(t["c"], t["r"], f_divergence="kl"), ValueError, "f_divergence"),
    ("sigmoid_norm no lengths", lambda t: fastpo.dpo_loss(t["c"], t["r"], loss_type="sigmoid_norm"), ValueError,
     "chosen_lengths"),
    ("one length", lambda t: fastpo.dpo_loss(t["c"], t["r"], chosen_lengths=t["lc"]), ValueError,
     "rejected_lengths"),
    ("lengths shape", lambda t: fastpo.dpo_loss(t["c"], t["r"], chosen_lengths=t["lc"][:2], rejected_lengths=t["lr"]),
     ValueError, "chosen_lengths (2,)"),
    ("wpo with aot", lambda t: fastpo.dpo_loss(t["c"], t["r"], loss_type="aot", weights=t["c"].exp()), ValueError,
     "aot"),
    ("sft without nll", lambda t: fastpo.dpo_loss(t["c"], t["r"], loss_type="sft"), ValueError, "nll"),
    ("rpo without nll", lambda t: fastpo.dpo_loss(t["c"], t["r"], rpo_alpha=1.0), ValueError, "nll"),
    ("nll unused", lambda t: fastpo.dpo_loss(t["c"], t["r"], nll=t["nll"]), ValueError, "nll"),
    ("nll two values", lambda t: fastpo.dpo_loss(t["c"], t["r"], rpo_alpha=1.0, nll=t["c"][:2]), ValueError, "nll"),
    ("tau 0", lambda t: fastpo.dpo_loss(t["c"], t["r"], loss_type="discopop", discopop_tau=0.0), ValueError,
     "discopop_tau"),
    ("ld alpha 2", lambda t: fastpo.ld_sequence_logprobs(t["tok"], t["tok"], t["mask"], t["mask"], ld_alpha=2.0),
     ValueError, "ld_alpha"),
    ("ld 1-D", lambda t: fastpo.ld_sequence_logprobs(t["c"], t["r"], t["c"] > 0, t["r"] > 0, ld_alpha=0.5),
     ValueError, "[B, T]"),
    ("ld rows", lambda t: fastpo.ld_sequence_logprobs(t["tok"], t["tok"][:2], t["mask"], t["mask"][:2],
                                                      ld_alpha=0.5), ValueError, "one row per pair"),
    ("wpo shape", lambda t: fastpo.wpo_weights(t["tok"], t["tok"][:, :2], t["mask"]), ValueError,
     "log_sum_sq_probs"),
    ("cpo unknown", lambda t: fastpo.cpo_loss(t["c"], t["r"], loss_type="kto", cpo_alpha=0), ValueError,
     "loss_type"),
    ("cpo default needs nll", lambda t: fastpo.cpo_loss(t["c"], t["r"]), ValueError, "cpo_alpha"),
    ("alphapo with nll weight", lambda t: fastpo.cpo_loss(t["c"], t["r"], loss_type="alphapo", cpo_alpha=1.0,
                                                          nll=t["nll"]), ValueError, "alphapo"),
    ("cpo hinge smoothing", lambda t: fastpo.cpo_loss(t["c"], t["r"], loss_type="hinge", label_smoothing=0.1,
                                                      cpo_alpha=0), ValueError, "label_smoothing"),
    ("kto unknown", lambda t: fastpo.kto_loss(t["c"], t["rc"], t["good"], loss_type="bco"), ValueError, "loss_type"),
    ("apo_zero_unpaired z0", lambda t: fastpo.kto_loss(t["c"], t["rc"], t["good"], loss_type="apo_zero_unpaired",
                                                       kl_ref_point=0.5), ValueError, "kl_ref_point"),
    ("kl shapes", lambda t: fastpo.kto_kl_ref_point(t["c"], t["rc"][:2]), ValueError, "(2,)"),
]


@pytest.mark.parametrize("name,call,exc,fragment", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(name, call, exc, fragment):
    assert_raises_unmodified(lambda **tensors: call(tensors), _e(), exc, fragment=fragment)
