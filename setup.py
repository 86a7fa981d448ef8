"""Build fastpo: the Python package, Triton kernels as ``fastpo.kernels`` and the C++ extension
``fastpo._C`` (pybind11 only; CPU tensors reach it through the buffer protocol, so neither torch
nor CUDA is needed to build it)."""

import os
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def _compiler_accepts(compiler, flag: str) -> bool:
    """True when the C++ compiler builds a trivial translation unit with ``flag``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
        except Exception:
            return False
    return True


class BuildExt(build_ext):
    """Adds optimisation and OpenMP flags that the local compiler supports."""

    def build_extensions(self):
        extra_compile, extra_link = [], []
        if self.compiler.compiler_type == "unix":
            for flag in ("-O3", "-fno-math-errno"):
                if _compiler_accepts(self.compiler, flag):
                    extra_compile.append(flag)
            # The extension is built on the machine that runs it (pip install -e .); FASTPO_NATIVE=0
            # gives a portable build (about 4x slower CPU kernels) for wheels shipped elsewhere.
            if os.environ.get("FASTPO_NATIVE", "1") == "1" and _compiler_accepts(self.compiler, "-march=native"):
                extra_compile.append("-march=native")
            if sys.platform != "darwin" and _compiler_accepts(self.compiler, "-fopenmp"):
                extra_compile.append("-fopenmp")
                extra_link.append("-fopenmp")
        elif self.compiler.compiler_type == "msvc":
            extra_compile += ["/O2", "/openmp"]
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args or []) + extra_compile
            ext.extra_link_args = list(ext.extra_link_args or []) + extra_link
        super().build_extensions()


ext_modules = [
    Pybind11Extension(
        "fastpo._C",
        sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
        include_dirs=["csrc"],
        depends=sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".h")),
        cxx_std=17,
    )
]

setup(
    packages=["fastpo", "fastpo.ops", "fastpo.reference", "fastpo.kernels", "fastpo.trainer", "fastpo.rollout",
              "fastpo.trainer.algos", "fastpo.integrations", "benchmarks"],
    package_dir={"fastpo": "fastpo", "fastpo.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
