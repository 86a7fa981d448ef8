#!/usr/bin/env bash
# Idempotent set-up for fastpo on a fresh machine (Python >= 3.10 with pip and a C++ compiler):
#  - torch: kept when already installed (a CUDA machine's own build); otherwise torch==2.13.0,
#    which on the CPU machines this project is developed on is a local CPU wheel;
#  - fastpo itself, editable, with the test extras; this builds the C++ extension fastpo._C.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q "torch==2.13.0"
fi
"$PYTHON" -m pip install -q -e ".[test]"
"$PYTHON" -c "import fastpo, fastpo._C, fastpo.kernels" >/dev/null
