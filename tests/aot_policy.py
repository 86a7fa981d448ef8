"""Ahead-of-time compile cases of the per-token loss kernels (read by compile_kernels.py).

The forward kernel's constexpr flags are covered so that every flag takes each of its values at least
once (all policy variants, the value loss, masks of bool/float dtype); the epilogue once per
aggregation and num_tokens form; the backward with and without the entropy gradient.
"""

import itertools

from fastpo.kernels import policy_loss as k

_SCALARS = ("clip_low", "clip_high", "dual_clip", "kl_coef", "kl_clamp", "ent_coef", "is_cap", "value_clip",
            "delta_cap", "tau_pos", "tau_neg", "ratio_cap", "dro_beta", "vk_pos", "vl_pos", "vk_neg", "vl_neg")


def _fwd_signature(dtype, mask_dtype):
    sig = {name: f"*{dtype}" for name in ("x_ptr", "old_ptr", "a_ptr", "ref_ptr", "ent_ptr", "roll_ptr")}
    sig.update({"mask_ptr": f"*{mask_dtype}", "cu_ptr": "*i64", "unit_ptr": "*fp32", "unit_ent_ptr": "*fp32",
                "part_ptr": "*fp32"})
    sig.update({name: "fp32" for name in _SCALARS})
    return sig


def _fwd_flags(**over):
    flags = dict(VALUE=False, SEQ_RATIO=False, KL=0, DUAL=False, HAS_ENTROPY=False, ROLLOUT=False,
                 ROLLOUT_SEQ=False, ROLLOUT_MASK=False, ROLLOUT_GIVEN=False, SURR=0, KL_ST=False, KL_BIAS=False,
                 HAS_MASK=True, PER_SEQ_MEAN=False, BLOCK=1024, NUM_PART=k.K)
    flags.update(over)
    return flags


FWD_VARIANTS = {
    "ppo-dual": (_fwd_flags(DUAL=True), "fp32", "u8"),
    "grpo-k3": (_fwd_flags(KL=3, PER_SEQ_MEAN=True), "bf16", "u8"),
    "k1-entropy-nomask": (_fwd_flags(KL=1, HAS_ENTROPY=True, HAS_MASK=False), "fp32", "u8"),
    "k2-token-trunc": (_fwd_flags(KL=2, ROLLOUT=True), "fp16", "fp32"),
    "gspo-seq-mask": (_fwd_flags(SEQ_RATIO=True, ROLLOUT=True, ROLLOUT_SEQ=True, ROLLOUT_MASK=True,
                                 PER_SEQ_MEAN=True, HAS_ENTROPY=True), "bf16", "i64"),
    "token-mask": (_fwd_flags(ROLLOUT=True, ROLLOUT_MASK=True), "fp32", "u8"),
    "value": (_fwd_flags(VALUE=True, PER_SEQ_MEAN=True), "fp32", "u8"),
    # the surrogates (fastpo.ops.loss_spec.SURROGATE_CODES), the new KL forms and the given weights
    "cispo-seq-given": (_fwd_flags(SURR=1, SEQ_RATIO=True, ROLLOUT=True, ROLLOUT_GIVEN=True), "bf16", "u8"),
    "sapo-abs-st": (_fwd_flags(SURR=2, KL=4, KL_ST=True, PER_SEQ_MEAN=True), "fp32", "u8"),
    "reinforce-k3-bias": (_fwd_flags(SURR=3, KL=3, KL_BIAS=True, HAS_ENTROPY=True), "fp16", "u8"),
    "dppo-tv": (_fwd_flags(SURR=4, ROLLOUT=True), "fp32", "u8"),
    "dppo-kl": (_fwd_flags(SURR=5), "bf16", "fp32"),
    "dro-k2-bias-seq": (_fwd_flags(SURR=6, KL=2, KL_BIAS=True), "fp32", "u8"),
    "geo-given": (_fwd_flags(SURR=7, ROLLOUT=True, ROLLOUT_GIVEN=True, PER_SEQ_MEAN=True), "fp32", "u8"),
    "geo-seq-mask": (_fwd_flags(SURR=7, ROLLOUT=True, ROLLOUT_SEQ=True, ROLLOUT_MASK=True), "bf16", "u8"),
    "vespo": (_fwd_flags(SURR=8, HAS_MASK=False), "fp32", "u8"),
    "ratio-abs-seq": (_fwd_flags(SURR=9, KL=4, SEQ_RATIO=True, KL_BIAS=True), "fp32", "u8"),
}


def cases():
    fin_sig = {"part_ptr": "*fp32", "stats_ptr": "*fp32", "loss_ptr": "*fp32", "num_tokens_ptr": "*i64",
               "num_seqs": "i32", "num_tokens": "fp32", "norm_length": "i32"}
    bwd_sig = {"grad_loss_ptr": "*fp32", "stats_ptr": "*fp32", "unit_ptr": "*fp32", "grad_ptr": "*bf16",
               "unit_ent_ptr": "*fp32", "grad_ent_ptr": "*fp32", "n_tokens": "i32"}
    for arch in (80, 90):
        for name, (flags, dtype, mask_dtype) in FWD_VARIANTS.items():
            yield (f"fwd-sm{arch}-{name}", k._token_loss_fwd_kernel, _fwd_signature(dtype, mask_dtype), flags, arch)
        for agg, nt_tensor, empty in itertools.product(range(5), (False, True), (False, True)):
            if nt_tensor and agg != 0 or empty and agg not in (1, 2):
                continue
            yield (f"finalize-sm{arch}-agg{agg}-nt{int(nt_tensor)}-empty{int(empty)}", k._token_loss_finalize_kernel,
                   fin_sig, {"AGG": agg, "NUM_TOKENS_TENSOR": nt_tensor, "COUNT_EMPTY": empty, "BLOCK_SEQS": 256,
                             "NUM_PART": k.K}, arch)
        for ent in (False, True):
            yield (f"bwd-sm{arch}-entropy{int(ent)}", k._token_loss_bwd_kernel, bwd_sig,
                   {"HAS_ENTROPY": ent, "BLOCK": 1024}, arch)
