"""Ahead-of-time compile cases of the segment-reduction kernels (read by compile_kernels.py).

``cases()`` yields ``(name, kernel, signature, constexprs, arch)`` for every layout (padded /
packed), mask, average and input dtype; each must compile and show 64-bit offset arithmetic.
"""

import itertools

from fastpo.kernels import segments

_STRIDES = {"padded_len": "i32", "stride_seq": "i32", "stride_tok": "i32",
            "mask_stride_seq": "i32", "mask_stride_tok": "i32"}


def _fwd_signature(dtype):
    out = "fp64" if dtype == "fp64" else "fp32"
    return {"x_ptr": f"*{dtype}", "mask_ptr": "*u8", "cu_ptr": "*i64", "out_ptr": f"*{out}",
            "count_ptr": f"*{out}", **_STRIDES}


def _bwd_signature(dtype):
    out = "fp64" if dtype == "fp64" else "fp32"
    return {"grad_out_ptr": f"*{out}", "count_ptr": f"*{out}", "mask_ptr": "*u8", "cu_ptr": "*i64",
            "grad_ptr": f"*{dtype}", **_STRIDES}


def cases():
    flags = itertools.product((False, True), repeat=3)
    for arch, dtype, (padded, has_mask, average) in itertools.product((80, 90), ("fp32", "bf16", "fp64"), flags):
        constexprs = {"PADDED": padded, "HAS_MASK": has_mask, "AVERAGE": average, "BLOCK": 1024}
        tag = f"sm{arch}-{dtype}-padded{int(padded)}-mask{int(has_mask)}-avg{int(average)}"
        yield f"fwd-{tag}", segments._segment_fwd_kernel, _fwd_signature(dtype), constexprs, arch
        yield f"bwd-{tag}", segments._segment_bwd_kernel, _bwd_signature(dtype), constexprs, arch
