"""Ahead-of-time compile cases of the log-prob kernels (read by compile_kernels.py).

``cases()`` yields ``(name, kernel, signature, constexprs, arch)``; every case must compile and
show 64-bit offset arithmetic in its TTIR.
"""

import itertools

from fastpo.kernels import logprobs

# Integer arguments are typed as triton types them at launch: values below 2^31 arrive as i32, so a
# row offset computed as row * stride in i32 would overflow once N·V passes 2^31.
def _fwd_signature(dtype):
    return {"logits_ptr": f"*{dtype}", "labels_ptr": "*i64", "logp_ptr": "*fp32", "entropy_ptr": "*fp32",
            "row_max_ptr": "*fp32", "log_norm_ptr": "*fp32", "sum_sq_ptr": "*fp32", "top1_ptr": "*fp32",
            "mean_ptr": "*fp32", "n_cols": "i32", "rows_per_block": "i32",
            "stride_block": "i32", "stride_row": "i32", "inv_temperature": "fp32", "ignore_index": "i32",
            "logit_scale": "fp32", "softcap": "fp32", "inv_t_rows_ptr": "*fp32", "thr_ptr": "*fp32"}


def _bwd_signature(dtype):
    return {"logits_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "labels_ptr": "*i64", "row_max_ptr": "*fp32",
            "log_norm_ptr": "*fp32", "entropy_ptr": "*fp32", "grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32",
            "n_cols": "i32", "rows_per_block": "i32", "stride_block": "i32", "stride_row": "i32",
            "stride_grad_block": "i32", "stride_grad_row": "i32", "inv_temperature": "fp32", "ignore_index": "i32",
            "logit_scale": "fp32", "softcap": "fp32", "inv_t_rows_ptr": "*fp32", "thr_ptr": "*fp32"}


def cases():
    for arch, dtype in itertools.product((80, 90), ("fp32", "bf16", "fp16")):
        for entropy, stats in ((False, False), (True, False), (True, True)):
            # the stats variant also takes per-row temperatures and top-k / top-p thresholds
            flags = {"WITH_SUM_SQ": stats, "WITH_TOP1": stats, "WITH_MEAN": stats, "PER_ROW_TEMP": stats,
                     "HAS_THRESHOLD": stats}
            yield (f"fwd-sm{arch}-{dtype}-entropy{int(entropy)}-stats{int(stats)}", logprobs._logprobs_fwd_kernel,
                   _fwd_signature(dtype), {"WITH_ENTROPY": entropy, **flags, "SOFTCAP": stats, "BLOCK_V": 4096}, arch)
        for g_logp, g_ent in ((True, False), (True, True), (False, True)):
            yield (f"bwd-sm{arch}-{dtype}-glogp{int(g_logp)}-gent{int(g_ent)}", logprobs._logprobs_bwd_kernel,
                   _bwd_signature(dtype), {"HAS_GRAD_LOGP": g_logp, "HAS_GRAD_ENTROPY": g_ent, "SOFTCAP": g_ent,
                                           "PER_ROW_TEMP": g_ent, "HAS_THRESHOLD": g_ent, "BLOCK_V": 4096}, arch)
