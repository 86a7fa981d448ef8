"""fastpo's DPO, CPO and KTO losses against TRL 1.16's own code, called with the same tensors.

TRL's loss code lives inside trainer methods. We call the unbound methods with a minimal stand-in
``self`` that carries only the fields those methods read (``beta``, ``loss_types``, an identity
``accelerator``, a ``_metrics`` dict, ...) and a stub model whose forward returns the per-token
log-probs (DPO, KTO: what TRL's fused LM head returns, 0 at ignored labels) or the logits (CPO) of a
case. No trainer, model, tokenizer or dataset is built:

- DPO: ``DPOTrainer._compute_loss`` (loss types, weights, f-divergences, WPO, LD-DPO, metrics);
- CPO: ``CPOTrainer.get_batch_loss_metrics`` → ``concatenated_forward`` → ``cpo_loss`` on logits;
- KTO: ``KTOTrainer._compute_loss`` with its mismatched-pair KL estimate.

Each comparison checks the loss, the gradient w.r.t. the log-probs (or logits) and TRL's logged
metrics. fastpo runs while TRL's methods are patched to raise, so a fastpo that quietly called
TRL fails here. Cases: random, ties (chosen = rejected), log-probs down to −1e4, all-equal inputs.
"""

import contextlib
import math
import types
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import fastpo

pytest.importorskip("trl", reason="the parity tests compare against TRL 1.16 (pip install trl==1.16.0)")
import os  # noqa: E402

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
try:
    from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
    from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
    from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402
except Exception as exc:  # pragma: no cover - an incompatible TRL
    pytest.skip(f"TRL's trainers do not import here ({type(exc).__name__}: {exc})", allow_module_level=True)

B, T = 5, 7  # pairs, tokens per sequence (position 0 is always a prompt token)
CASES = ["random", "ties", "extreme", "equal"]


@contextlib.contextmanager
def trl_blocked():
    """TRL's loss methods raise while fastpo runs: parity must not come from delegation."""
    def refuse(*args, **kwargs):
        raise AssertionError("fastpo called into TRL")

    saved = [(cls, name, cls.__dict__[name]) for cls, name in
             ((DPOTrainer, "_compute_loss"), (CPOTrainer, "cpo_loss"), (CPOTrainer, "concatenated_forward"),
              (CPOTrainer, "get_batch_loss_metrics"), (KTOTrainer, "_compute_loss"),
              (KTOTrainer, "_compute_kl_logps"))]
    for cls, name, _ in saved:
        setattr(cls, name, refuse)
    try:
        yield
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def _accelerator():
    same = lambda x: x  # noqa: E731
    return SimpleNamespace(device=torch.device("cpu"), gather=same, gather_for_metrics=same,
                           autocast=contextlib.nullcontext)


class StubModel(torch.nn.Module):
    """Returns fixed outputs (TRL's fused-LM-head fields, or logits) whatever the input ids; no weights."""

    def __init__(self, outputs_for):
        super().__init__()
        self.outputs_for = outputs_for
        self.is_gradient_checkpointing = False

    def forward(self, input_ids=None, **kwargs):
        return self.outputs_for(input_ids)


def _case(kind: str, rows: int, seed: int):
    """(policy, reference) per-token log-probs [rows, T−1], completion_mask [rows, T] (0 at position 0)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T, (rows,), generator=g)
    start = T - lens - torch.randint(0, 2, (rows,), generator=g).clamp(max=T - 1 - lens)
    pos = torch.arange(T)
    completion = ((pos >= start[:, None]) & (pos < (start + lens)[:, None])).long()
    completion[:, 0] = 0
    policy = -3 * torch.rand(rows, T - 1, generator=g)
    ref = policy + 0.7 * torch.randn(rows, T - 1, generator=g)
    if kind == "ties":  # the second half of the rows repeats the first (chosen = rejected per pair)
        half = rows // 2
        completion[half:2 * half], policy[half:2 * half], ref[half:2 * half] = \
            completion[:half], policy[:half], ref[:half]
    elif kind == "extreme":
        policy[::2, ::3] = -1e4
        ref[1::2, 1::2] = -1e4
    elif kind == "equal":
        completion[:] = 0
        completion[:, 2:] = 1
        policy[:] = -1.5
        ref[:] = -1.5
    shifted = completion[:, 1:].bool()
    policy, ref = policy.masked_fill(~shifted, 0.0), ref.masked_fill(~shifted, 0.0)
    return policy, ref, completion


def _close(got, want, name, *, rtol=2e-5, atol=2e-5):
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    scale = max(1.0, float(want.abs().max()) if want.numel() else 1.0)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------

ALL_DPO = list(fastpo.dpo.DPO_LOSS_TYPES)
F_OK = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
SMOOTHED = ["robust", "exo_pair", "aot", "aot_unpaired"]  # TRL's sigmoid ignores ε (fastpo's is cDPO)


def _dpo_configs():
    out = []
    for t in ALL_DPO:
        eps = 1e-3 if t == "exo_pair" else 0.0
        out.append(dict(loss_type=[t], label_smoothing=eps))
    for t in F_OK:
        for f in ("forward_kl", "js_divergence", "alpha_divergence"):
            out.append(dict(loss_type=[t], f_divergence=f, label_smoothing=1e-3 if t == "exo_pair" else 0.0))
    out.append(dict(loss_type=["sigmoid"], f_divergence="alpha_divergence", f_alpha=1.0))
    out.append(dict(loss_type=["sigmoid"], f_divergence="alpha_divergence", f_alpha=-0.5))
    for t in SMOOTHED:
        out.append(dict(loss_type=[t], label_smoothing=0.2))
    out.append(dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]))  # MPO
    out.append(dict(loss_type=["ipo", "apo_down", "nca_pair"], loss_weights=[1.0, -0.5, 2.0]))
    for t in ("sigmoid", "ipo", "sppo_hard", "sft"):
        out.append(dict(loss_type=[t], use_weighting=True))
    for t in ("sigmoid", "aot", "sigmoid_norm"):
        out.append(dict(loss_type=[t], ld_alpha=0.3))
    out.append(dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7], use_weighting=True, ld_alpha=0.0))
    out.append(dict(loss_type=["sigmoid"], rpo_alpha=0.7))  # RPO: TRL 1.16 spells it ["sigmoid", "sft"], [1, α]
    out.append(dict(loss_type=["discopop"], discopop_tau=0.3))
    return out


def _cfg_id(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items()).replace(" ", "")


def _trl_dpo(cfg, policy, ref, completion, lssp, beta):
    types_, weights = list(cfg["loss_type"]), cfg.get("loss_weights")
    if cfg.get("rpo_alpha") is not None:
        types_, weights = types_ + ["sft"], (weights or [1.0] * len(cfg["loss_type"])) + [cfg["rpo_alpha"]]
    leaf = policy.clone().requires_grad_()
    extra = leaf.sum() * 0
    if cfg.get("use_weighting") and "sft" in types_:
        # TRL 1.16 bug: `per_sequence_loss *= weights` writes into sft's expanded scalar (RuntimeError). Run
        # TRL without the sft terms and add TRL's sft term, mean over pairs of nll·w, written out here.
        mask = completion[:, 1:].bool()
        n = policy.shape[0] // 2
        nll = -leaf[:n][mask[:n]].mean()
        w = torch.exp(((policy - lssp) * mask).sum(1) / mask.sum(1).clamp_min(1))
        pair_w = w[:n] * w[n:]
        extra = extra + sum(wt for t, wt in zip(types_, weights or [1.0] * len(types_)) if t == "sft") * \
            (nll * pair_w).mean()
        kept = [(t, wt) for t, wt in zip(types_, weights or [1.0] * len(types_)) if t != "sft"]
        types_, weights = [t for t, _ in kept], [wt for _, wt in kept]
    zeros = torch.zeros_like(policy)
    outputs = SimpleNamespace(log_probs=leaf, log_sum_sq_probs=lssp, entropy=zeros, mean_logits=zeros,
                              is_top1=torch.zeros_like(policy, dtype=torch.bool))
    model = StubModel(lambda ids: outputs)
    ref_model = StubModel(lambda ids: SimpleNamespace(log_probs=ref))
    me = SimpleNamespace(
        model=model, ref_model=ref_model, accelerator=_accelerator(), aux_loss_enabled=False,
        ld_alpha=cfg.get("ld_alpha"), precompute_ref_logps=False, beta=beta,
        f_divergence_type=cfg.get("f_divergence", "reverse_kl"), f_alpha_divergence_coef=cfg.get("f_alpha", 0.5),
        loss_types=types_, loss_weights=weights or [1.0] * len(types_),
        label_smoothing=cfg.get("label_smoothing", 0.0), use_weighting=cfg.get("use_weighting", False),
        args=SimpleNamespace(discopop_tau=cfg.get("discopop_tau", 0.05), gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    ids = torch.ones_like(completion)
    loss = DPOTrainer._compute_loss(me, model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                "completion_mask": completion}, return_outputs=False)
    loss = loss + extra
    loss.backward()
    return loss.detach(), leaf.grad, {k: v[-1] for k, v in me._metrics["train"].items()}


def _fastpo_dpo(cfg, policy, ref, completion, lssp, beta):
    leaf = policy.clone().requires_grad_()
    mask = completion[:, 1:].bool()
    n = policy.shape[0] // 2
    if cfg.get("ld_alpha") is not None:
        a = cfg["ld_alpha"]
        c, r = fastpo.ld_sequence_logprobs(leaf[:n], leaf[n:], mask[:n], mask[n:], ld_alpha=a)
        rc, rr = fastpo.ld_sequence_logprobs(ref[:n], ref[n:], mask[:n], mask[n:], ld_alpha=a)
    else:
        seq, ref_seq = fastpo.sequence_logprobs(leaf, mask), fastpo.sequence_logprobs(ref, mask)
        c, r, rc, rr = seq[:n], seq[n:], ref_seq[:n], ref_seq[n:]
    lengths = mask.sum(-1)
    kwargs = dict(beta=beta, loss_type=cfg["loss_type"], label_smoothing=cfg.get("label_smoothing", 0.0),
                  loss_weights=cfg.get("loss_weights"), f_divergence=cfg.get("f_divergence", "reverse_kl"),
                  f_alpha=cfg.get("f_alpha", 0.5), discopop_tau=cfg.get("discopop_tau", 0.05),
                  chosen_lengths=lengths[:n], rejected_lengths=lengths[n:], rpo_alpha=cfg.get("rpo_alpha"))
    if "sft" in cfg["loss_type"] or cfg.get("rpo_alpha") is not None:
        kwargs["nll"] = fastpo.nll_loss(leaf[:n], mask[:n])
    if cfg.get("use_weighting"):
        w = fastpo.wpo_weights(leaf, lssp, mask)
        kwargs["weights"] = w[:n] * w[n:]
    out = fastpo.dpo_loss(c, r, rc, rr, **kwargs)
    out.loss.backward()
    return out.loss.detach(), leaf.grad, out.metrics


DPO_METRICS = {"rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
               "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
               "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected"}


def _finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("cfg", _dpo_configs(), ids=_cfg_id)
def test_dpo_matches_trl(cfg, kind, cpu_backend):
    policy, ref, completion = _case(kind, 2 * B, seed=zlib.crc32(f"{kind}{_cfg_id(cfg)}".encode()) % 1000)
    lssp = 2 * policy - 0.3 * torch.rand(policy.shape, generator=torch.Generator().manual_seed(1))
    beta = 0.1 if kind != "equal" else 0.5
    with trl_blocked():
        loss, grad, metrics = _fastpo_dpo(cfg, policy, ref, completion, lssp, beta)
    assert _finite(loss, grad, *metrics.values()), "fastpo must stay finite on every case"
    want_loss, want_grad, want_metrics = _trl_dpo(cfg, policy, ref, completion, lssp, beta)
    if not _finite(want_loss, want_grad):  # TRL overflows (e^1000, inf − inf) where fastpo clamps
        assert kind == "extreme", f"TRL non-finite on a {kind} case"
        return
    if kind == "extreme" and cfg.get("f_divergence") == "alpha_divergence":
        return  # TRL clamps this exponent at 80, fastpo at 20: both finite, deliberately different here
    _close(loss, want_loss, "loss")
    # TRL sums unmasked per-token log-probs (0 at ignored labels, whose logits get no gradient from
    # the fused head): compare the gradients at counted tokens
    _close(grad, want_grad * completion[:, 1:], "grad")
    for trl_name, ours in DPO_METRICS.items():
        _close(metrics[ours], want_metrics[trl_name], trl_name)


# --------------------------------------------------------------------------------------------
# CPO / SimPO / AlphaPO: TRL computes log-probs and the NLL from logits, fastpo with its ops
# --------------------------------------------------------------------------------------------

V = 11
CPO_CONFIGS = [dict(loss_type=t) for t in ("sigmoid", "hinge", "ipo", "simpo")] + [
    dict(loss_type="sigmoid", label_smoothing=0.2), dict(loss_type="simpo", label_smoothing=0.1, simpo_gamma=1.3),
    dict(loss_type="sigmoid", cpo_alpha=0.0), dict(loss_type="ipo", cpo_alpha=2.0),
    dict(loss_type="alphapo", alpha=0.25), dict(loss_type="alphapo"), dict(loss_type="simpo", alpha=-0.5),
    dict(loss_type="hinge", alpha=0.1, cpo_alpha=0.5),
]


def _cpo_batch(kind, seed):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(2 * B, T, V, generator=g)
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    _, _, completion = _case("random" if kind == "extreme" else kind, 2 * B, seed)
    if kind == "ties":
        logits[B:], ids[B:] = logits[:B], ids[:B]
    elif kind == "extreme":  # token log-probs near −1e4 (a logit 1e4 below the row's maximum)
        logits[::2, :, 0] = 1e4
        ids[::2] = 1 + ids[::2] % (V - 1)
    elif kind == "equal":
        logits[:] = 0.5
    labels = ids.masked_fill(completion == 0, -100)
    return logits, ids, labels


def _trl_cpo(cfg, logits, ids, labels):
    loss_type = cfg["loss_type"]
    cpo_alpha = cfg.get("cpo_alpha", 1.0)
    if loss_type == "alphapo":  # CPOConfig.__post_init__'s sugar
        loss_type, cpo_alpha = "simpo", 0.0
    leaf = logits.clone().requires_grad_()
    model = StubModel(lambda _: SimpleNamespace(logits=leaf))
    me = SimpleNamespace(beta=0.1, label_smoothing=cfg.get("label_smoothing", 0.0), loss_type=loss_type,
                         cpo_alpha=cpo_alpha, simpo_gamma=cfg.get("simpo_gamma", 0.5), alpha=cfg.get("alpha", 0.0),
                         accelerator=_accelerator(), aux_loss_enabled=False, is_encoder_decoder=False,
                         pad_token_id=0, concatenated_inputs=CPOTrainer.concatenated_inputs,
                         get_batch_logps=CPOTrainer.get_batch_logps)
    me.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, me)
    me.concatenated_forward = types.MethodType(CPOTrainer.concatenated_forward, me)
    batch = {"chosen_input_ids": ids[:B], "chosen_attention_mask": torch.ones_like(ids[:B]),
             "chosen_labels": labels[:B], "rejected_input_ids": ids[B:],
             "rejected_attention_mask": torch.ones_like(ids[B:]), "rejected_labels": labels[B:]}
    loss, metrics = CPOTrainer.get_batch_loss_metrics(me, model, batch)
    loss.backward()
    return loss.detach(), leaf.grad, metrics


def _fastpo_cpo(cfg, logits, labels):
    leaf = logits.clone().requires_grad_()
    tok = fastpo.token_logprobs(leaf[:, :-1], labels[:, 1:])
    mask = labels[:, 1:] != -100
    average = cfg["loss_type"] in ("ipo", "simpo", "alphapo")
    seq = fastpo.sequence_logprobs(tok, mask, average=average)
    kwargs = {k: v for k, v in cfg.items() if k != "loss_type"}
    if cfg["loss_type"] != "alphapo" and cfg.get("cpo_alpha", 1.0) != 0:
        kwargs["nll"] = fastpo.nll_loss(tok[:B], mask[:B])
    out = fastpo.cpo_loss(seq[:B], seq[B:], beta=0.1, loss_type=cfg["loss_type"], **kwargs)
    out.loss.backward()
    return out.loss.detach(), leaf.grad, out.metrics


CPO_METRICS = dict(DPO_METRICS, nll_loss="nll_loss")


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("cfg", CPO_CONFIGS, ids=_cfg_id)
def test_cpo_matches_trl(cfg, kind, cpu_backend):
    logits, ids, labels = _cpo_batch(kind, seed=len(_cfg_id(cfg)))
    with trl_blocked():
        loss, grad, metrics = _fastpo_cpo(cfg, logits, labels)
    assert _finite(loss, grad, *metrics.values())
    want_loss, want_grad, want_metrics = _trl_cpo(cfg, logits, ids, labels)
    if not _finite(want_loss, want_grad):
        assert kind == "extreme" and cfg.get("alpha"), "TRL non-finite outside AlphaPO's e^(α·1e4)"
        return
    _close(loss, want_loss, "loss", rtol=1e-4)
    _close(grad, want_grad, "grad", rtol=1e-4)
    for trl_name, ours in CPO_METRICS.items():
        if ours in metrics:
            _close(metrics[ours], want_metrics[trl_name], trl_name, rtol=1e-4)
    assert ("nll_loss" in metrics) == (want_metrics["nll_loss"] != 0)


# --------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------

KTO_CONFIGS = [dict(loss_type="kto"), dict(loss_type="kto", desirable_weight=1.3, undesirable_weight=0.6),
               dict(loss_type="apo_zero_unpaired"),
               dict(loss_type="apo_zero_unpaired", desirable_weight=0.5, undesirable_weight=2.0)]
LABELS = {"mixed": [1, 0, 1, 1, 0, 0], "all_desirable": [1] * 6, "all_undesirable": [0] * 6}


def _trl_kto(cfg, labels, policy, ref, completion, kl_policy, kl_ref, kl_completion):
    leaf = policy.clone().requires_grad_()
    ids, kl_ids = torch.ones_like(completion), torch.full_like(kl_completion, 2)
    model = StubModel(lambda x: SimpleNamespace(log_probs=kl_policy if x is kl_ids else leaf,
                                                entropy=torch.zeros_like(policy),
                                                mean_logits=torch.zeros_like(policy)))
    ref_model = StubModel(lambda x: SimpleNamespace(log_probs=kl_ref if x is kl_ids else ref))
    me = SimpleNamespace(model=model, ref_model=ref_model, accelerator=_accelerator(), aux_loss_enabled=False,
                         calculate_KL=cfg["loss_type"] != "apo_zero_unpaired", precompute_ref_logps=False,
                         loss_type=cfg["loss_type"], beta=0.1, desirable_weight=cfg.get("desirable_weight", 1.0),
                         undesirable_weight=cfg.get("undesirable_weight", 1.0),
                         args=SimpleNamespace(gradient_checkpointing_kwargs=None),
                         _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    me._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, me)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
              "KL_completion_mask": kl_completion, "label": torch.tensor(labels, dtype=torch.bool)}
    loss = KTOTrainer._compute_loss(me, model, inputs, return_outputs=False)
    loss.backward()
    return loss.detach(), leaf.grad, {k: v[-1] for k, v in me._metrics["train"].items()}


def _fastpo_kto(cfg, labels, policy, ref, completion, kl_policy, kl_ref, kl_completion):
    leaf = policy.clone().requires_grad_()
    mask, kl_mask = completion[:, 1:].bool(), kl_completion[:, 1:].bool()
    kwargs = {k: v for k, v in cfg.items()}
    if cfg["loss_type"] == "kto":
        kwargs["kl_ref_point"] = fastpo.kto_kl_ref_point(fastpo.sequence_logprobs(kl_policy, kl_mask),
                                                         fastpo.sequence_logprobs(kl_ref, kl_mask))
    out = fastpo.kto_loss(fastpo.sequence_logprobs(leaf, mask), fastpo.sequence_logprobs(ref, mask),
                          torch.tensor(labels, dtype=torch.bool), beta=0.1, **kwargs)
    out.loss.backward()
    return out.loss.detach(), leaf.grad, out.metrics


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("label_set", list(LABELS))
@pytest.mark.parametrize("cfg", KTO_CONFIGS, ids=_cfg_id)
def test_kto_matches_trl(cfg, label_set, kind, cpu_backend):
    labels = LABELS[label_set]
    n = len(labels)
    policy, ref, completion = _case(kind, n, seed=3)
    # TRL's mismatched pairs: completion i − 1 after prompt i (here: the rows rolled by one)
    kl_policy, kl_ref, kl_completion = (torch.roll(x, 1, 0) + (0.1 if x.is_floating_point() else 0)
                                        for x in (policy, ref, completion))
    kl_policy = kl_policy.masked_fill(~kl_completion[:, 1:].bool(), 0.0)
    kl_ref = kl_ref.masked_fill(~kl_completion[:, 1:].bool(), 0.0)
    args = (cfg, labels, policy, ref, completion, kl_policy, kl_ref, kl_completion)
    with trl_blocked():
        loss, grad, metrics = _fastpo_kto(*args)
    assert _finite(loss, grad, *metrics.values())
    want_loss, want_grad, want_metrics = _trl_kto(*args)
    _close(loss, want_loss, "loss")
    _close(grad, want_grad * completion[:, 1:], "grad")
    names = {"kl": "kl_ref_point", "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
             "rewards/margins": "reward_margin", "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected"}
    for trl_name, ours in names.items():
        if trl_name in want_metrics:  # TRL logs a side's metrics only when the batch has that side
            _close(metrics[ours], want_metrics[trl_name], trl_name)
    if label_set == "mixed":
        assert set(names) <= set(want_metrics)


def test_delegation_is_detected():
    """The guard works: TRL's code called under trl_blocked() fails."""
    policy, ref, completion = _case("random", 2 * B, seed=0)
    with trl_blocked(), pytest.raises(AssertionError, match="fastpo called into TRL"):
        _trl_dpo(dict(loss_type=["sigmoid"]), policy, ref, completion, policy, 0.1)
    assert math.isfinite(float(_trl_dpo(dict(loss_type=["sigmoid"]), policy, ref, completion, policy, 0.1)[0]))
