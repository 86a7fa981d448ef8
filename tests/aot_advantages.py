"""Ahead-of-time compile cases of the GAE kernel (read by compile_kernels.py).

``cases()`` yields ``(name, kernel, signature, constexprs, arch)``; every case must compile and show
64-bit offset arithmetic in its TTIR (the block start, block index × BLOCK_T, is an int64 product).
"""

import itertools

from fastpo.kernels import gae


def _signature(dtype):
    return {"rewards_ptr": f"*{dtype}", "values_ptr": f"*{dtype}", "mask_ptr": "*u8", "cu_ptr": "*i64",
            "adv_ptr": f"*{dtype}", "ret_ptr": f"*{dtype}", "gamma": "fp32", "gamma_lam": "fp32"}


def cases():
    for arch, dtype, has_mask in itertools.product((80, 90), ("fp32", "fp64"), (False, True)):
        for block in (64, 1024):
            yield (f"gae-sm{arch}-{dtype}-mask{int(has_mask)}-block{block}", gae._gae_kernel, _signature(dtype),
                   {"HAS_MASK": has_mask, "BLOCK_T": block}, arch)
