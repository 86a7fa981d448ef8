"""Compile every fastpo Triton kernel ahead of time for sm_80 and sm_90 (no GPU needed).

Run as a script, in a process without TRITON_INTERPRET (the interpreter replaces the compiler);
prints one JSON object: case name -> {"ok", "error", "int64_offsets"} (a 64-bit multiply in the
TTIR: the row offset row·stride). Used by
test_kernels_compile.py.
"""

import itertools
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastpo.kernels import logprobs


# Integer arguments are typed as triton types them at launch: values below 2^31 arrive as i32, so a
# row offset computed as row * stride in i32 would overflow once N·V passes 2^31.
def _fwd_signature(dtype):
    return {"logits_ptr": f"*{dtype}", "labels_ptr": "*i64", "logp_ptr": "*fp32", "entropy_ptr": "*fp32",
            "lse_ptr": "*fp32", "n_cols": "i32", "stride_row": "i32", "inv_temperature": "fp32",
            "ignore_index": "i32"}


def _bwd_signature(dtype):
    return {"logits_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "labels_ptr": "*i64", "lse_ptr": "*fp32",
            "entropy_ptr": "*fp32", "grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "n_cols": "i32",
            "stride_row": "i32", "stride_grad_row": "i32", "inv_temperature": "fp32", "ignore_index": "i32"}


def cases():
    for arch, dtype in itertools.product((80, 90), ("fp32", "bf16", "fp16")):
        for entropy in (False, True):
            yield (f"fwd-sm{arch}-{dtype}-entropy{int(entropy)}", logprobs._logprobs_fwd_kernel,
                   _fwd_signature(dtype), {"WITH_ENTROPY": entropy, "BLOCK_V": 4096}, arch)
        for g_logp, g_ent in ((True, False), (True, True), (False, True)):
            yield (f"bwd-sm{arch}-{dtype}-glogp{int(g_logp)}-gent{int(g_ent)}", logprobs._logprobs_bwd_kernel,
                   _bwd_signature(dtype), {"HAS_GRAD_LOGP": g_logp, "HAS_GRAD_ENTROPY": g_ent, "BLOCK_V": 4096}, arch)


def compile_case(fn, signature, constexprs, arch):
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})


def main():
    results = {}
    for name, fn, signature, constexprs, arch in cases():
        try:
            ttir = compile_case(fn, signature, constexprs, arch).asm["ttir"]
            wide = any("arith.muli" in line and ": i64" in line for line in ttir.splitlines())
            results[name] = {"ok": True, "error": "", "int64_offsets": wide}
        except Exception as exc:  # reported per case by the test
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000], "int64_offsets": False}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
