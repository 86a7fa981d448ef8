"""Issue 20 §2 for the sequence ops: NaN and ±inf at masked positions of any input never reach a
counted output, a metric or a gradient, in every backend (the README promises that masked tokens are
ignored "whatever they hold"; vLLM writes NaN where it could not score a token).

Each case is run twice in the same backend: with the masked positions holding zeros and holding a
non-finite value in *every* per-token input; the outputs and gradients must agree and be finite.
"""

import dataclasses

import pytest
import torch

import fastpo
from rl_cases import ALL_CASES, BACKENDS, FULL, assert_all_close, policy_fn, run, with_grad

POLICY_CONFIGS = {
    "grpo": fastpo.GRPO, "gspo": fastpo.GSPO, "ppo_dual_clip": fastpo.PPO, "dr_grpo": fastpo.DR_GRPO,
    "full_seq_mean": FULL,
    "token_mask_is": dataclasses.replace(FULL, rollout_is="token_mask", aggregation="seq_mean_token_sum"),
    # every other preset: each surrogate of fastpo.policy_config.SURROGATES
    **{name.lower(): getattr(fastpo, name) for name in ("BNPO", "LUSPO", "CISPO", "CISPO_TRL", "SAPO", "GMPO", "GPG",
                                                        "DPPO_TV", "DPPO_KL", "DRO", "VESPO")},
}


def _cases():
    for case in ALL_CASES:
        if case.name.startswith("policy_loss"):
            for name, cfg in POLICY_CONFIGS.items():
                yield dataclasses.replace(case, name=f"{case.name}-{name}", fn=policy_fn(cfg))
        else:
            yield case


def _fill_masked(case, value):
    keep = case.mask
    return {k: (torch.where(keep, t, torch.full_like(t, value)) if t.is_floating_point() else t)
            for k, t in case.tensors.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c.name)
def test_nonfinite_padding_is_ignored(case, backend):
    want = run(case, with_grad(case, _fill_masked(case, 0.0)), backend)
    for value in (float("nan"), float("inf"), float("-inf")):
        got = run(case, with_grad(case, _fill_masked(case, value)), backend)
        for t in (*got[0], *got[1]):
            assert torch.isfinite(t).all(), f"{case.name} {backend}: non-finite output with {value} padding"
        assert_all_close(got[0], want[0], what=f"{case.name} {backend} {value}: outputs")
        assert_all_close(got[1], want[1], what=f"{case.name} {backend} {value}: gradients")
        for grad in got[1]:  # masked positions get no gradient
            assert torch.count_nonzero(grad[~case.mask]) == 0
