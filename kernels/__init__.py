"""Triton device code for fastpo (installed as ``fastpo.kernels``): @triton.jit kernels and their
launchers, no autograd. Launchers take and return plain tensors; the autograd boundary lives in
``fastpo.ops``."""
