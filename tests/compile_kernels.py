"""Compile every fastpo Triton kernel ahead of time for sm_80 and sm_90 (no GPU needed).

Run as a script, in a process without TRITON_INTERPRET (the interpreter replaces the compiler);
prints one JSON object: case name -> {"module", "ok", "error", "int64_offsets"} (a 64-bit multiply
in the TTIR, e.g. the row offset row·stride). Used by test_kernels_compile.py.

The cases come from the ``aot_*.py`` modules beside this file, one per kernel module: each defines
``cases()`` yielding ``(name, kernel, signature, constexprs, arch)``. Integer arguments are typed as
triton types them at launch: values below 2^31 arrive as i32, so an offset computed in i32 would
overflow once it passes 2^31.
"""

import importlib
import json
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def case_modules():
    """The ``aot_*`` modules beside this file, by name."""
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    return {p.stem: importlib.import_module(p.stem) for p in sorted(here.glob("aot_*.py"))}


def compile_case(fn, signature, constexprs, arch):
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})


def main():
    results = {}
    for module_name, module in case_modules().items():
        for name, fn, signature, constexprs, arch in module.cases():
            entry = {"module": module_name, "ok": False, "error": "", "int64_offsets": False}
            try:
                ttir = compile_case(fn, signature, constexprs, arch).asm["ttir"]
                entry["ok"] = True
                entry["int64_offsets"] = any("arith.muli" in ln and ": i64" in ln for ln in ttir.splitlines())
            except Exception as exc:  # reported per case by the test
                entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            results[f"{module_name}:{name}"] = entry
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
