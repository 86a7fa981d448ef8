#!/usr/bin/env bash
# One command for the first machine with a GPU: builds fastpo there and runs, each under its own
# time limit so that the whole check ends inside 8 minutes,
#   1. the test suite with the Triton kernels compiled for the GPU (TRITON_INTERPRET unset);
#   2. `fastpo bench --quick --device cuda`;
#   3. a 20-step `fastpo train --device cuda` with the vLLM rollout (the HF rollout where vLLM is
#      not installed, said so in the results).
# It writes one markdown results file (device, versions, commit, each phase's status, time and
# output tail) that BENCHMARKS.md can quote, plus each phase's full log beside it.
# Nothing is fetched: the machine may have no network, so fastpo is built with what is installed.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<'EOF'
usage: bash scripts/gpu_check.sh [--out DIR] [--only PHASES] [--dry-run] [--help]

  --out DIR      where the results file (gpu_check.md) and the phase logs go (default: gpu_check/)
  --only PHASES  comma-separated subset of: tests,bench,train (default: all three)
  --dry-run      print the commands and time limits, run nothing (needs no GPU)

Time limits in seconds, from the environment: GPU_CHECK_SETUP_S (60), GPU_CHECK_TESTS_S (210),
GPU_CHECK_BENCH_S (150), GPU_CHECK_TRAIN_S (60); PYTHON picks the interpreter (default: python3).
Exit status: 0 when every phase passed, 1 when one failed or ran out of time, 2 for bad
arguments, 3 when no CUDA device is visible.
EOF
}

OUT=gpu_check
PHASES=tests,bench,train
DRY_RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || { echo "gpu_check: --out needs a directory" >&2; exit 2; }; OUT=$2; shift 2 ;;
        --only) [ $# -ge 2 ] || { echo "gpu_check: --only needs a list of phases" >&2; exit 2; }; PHASES=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
IFS=, read -r -a PHASE_LIST <<<"$PHASES"
[ ${#PHASE_LIST[@]} -gt 0 ] || { echo "gpu_check: --only needs at least one phase" >&2; exit 2; }
for p in "${PHASE_LIST[@]}"; do
    case "$p" in
        tests|bench|train) ;;
        *) echo "gpu_check: unknown phase '$p' in --only (expected tests, bench or train)" >&2; exit 2 ;;
    esac
done
for var in GPU_CHECK_SETUP_S GPU_CHECK_TESTS_S GPU_CHECK_BENCH_S GPU_CHECK_TRAIN_S; do
    val=${!var:-}
    if [ -n "$val" ] && ! [[ "$val" =~ ^[1-9][0-9]*$ ]]; then
        echo "gpu_check: $var must be a positive whole number of seconds, got '$val'" >&2
        exit 2
    fi
done
PYTHON=${PYTHON:-python3}
SETUP_S=${GPU_CHECK_SETUP_S:-60}
TESTS_S=${GPU_CHECK_TESTS_S:-210}
BENCH_S=${GPU_CHECK_BENCH_S:-150}
TRAIN_S=${GPU_CHECK_TRAIN_S:-60}

# The test files that exercise the kernels (the trainer, vLLM and benchmark end-to-end tests are
# left to phases 2 and 3, which run them on the GPU at the size that fits the time limit).
TEST_IGNORES=(--ignore-glob='tests/test_trainer*' --ignore-glob='tests/test_cli*'
              --ignore-glob='tests/test_*e2e*' --ignore=tests/test_vllm_rollout.py
              --ignore=tests/test_bench_suite.py --ignore=tests/test_tiny_model.py)
TESTS_CMD=("$PYTHON" -m pytest -q -p no:cacheprovider tests "${TEST_IGNORES[@]}")
BENCH_CMD=("$PYTHON" -m fastpo bench --quick --device cuda --no-progress --json "$OUT/bench-cuda-quick.json"
           --plots "$OUT/plots")
TRAIN_ARGS=(--device cuda --max-steps 20 --output-dir "$OUT/train-run" --overwrite)

wanted() { [[ ",$PHASES," == *",$1,"* ]]; }

if [ "$DRY_RUN" = 1 ]; then
    echo "setup (${SETUP_S}s): $PYTHON -m pip install --no-deps --no-build-isolation -e ."
    wanted tests && echo "tests (${TESTS_S}s, TRITON_INTERPRET unset): ${TESTS_CMD[*]}"
    wanted bench && echo "bench (${BENCH_S}s): ${BENCH_CMD[*]}"
    wanted train && echo "train (${TRAIN_S}s): $PYTHON -m fastpo train --rollout vllm|hf ${TRAIN_ARGS[*]}"
    echo "results: $OUT/gpu_check.md"
    exit 0
fi

unset TRITON_INTERPRET FASTPO_BACKEND
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device is visible to $PYTHON (torch.cuda.is_available() is False);" \
         "this check is for a machine with a GPU. On a CPU machine run the README's test command instead." >&2
    exit 3
fi

mkdir -p "$OUT" || { echo "gpu_check: cannot create --out directory '$OUT'" >&2; exit 2; }
RESULTS="$OUT/gpu_check.md"
STATUS=0

# run_phase NAME LIMIT CMD...: runs CMD under `timeout`, logs to $OUT/NAME.log, appends a section.
run_phase() {
    local name=$1 limit=$2; shift 2
    local log="$OUT/$name.log" start end rc verdict
    start=$(date +%s)
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$log" 2>&1
    rc=$?
    end=$(date +%s)
    case $rc in
        0) verdict=passed ;;
        124|137) verdict="ran out of its ${limit}s"; STATUS=1 ;;
        *) verdict="failed (exit $rc)"; STATUS=1 ;;
    esac
    {
        echo "## $name: $verdict in $((end - start)) s"
        echo
        echo "\`$*\`"
        echo
        echo '```'
        tail -n 40 "$log"
        echo '```'
        echo
    } >>"$RESULTS"
    echo "gpu_check: $name $verdict in $((end - start)) s (log: $log)"
}

{
    echo "# fastpo GPU check"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    if commit=$(git rev-parse --short HEAD 2>/dev/null); then
        git diff --quiet HEAD 2>/dev/null || commit="$commit (with uncommitted changes)"
    else
        commit="unknown (no git checkout here; set GPU_CHECK_COMMIT)"
    fi
    echo "- commit: ${GPU_CHECK_COMMIT:-$commit}"
    "$PYTHON" - <<'EOF'
import platform, torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
try:
    import vllm
    vllm_version = vllm.__version__
except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
    vllm_version = f"not usable ({type(exc).__name__})"
props = torch.cuda.get_device_properties(0)
print(f"- device: {props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, "
      f"{props.multi_processor_count} SMs")
print(f"- python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton_version}, vllm {vllm_version}")
EOF
    echo
} >"$RESULTS"

run_phase setup "$SETUP_S" "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .
wanted tests && run_phase tests "$TESTS_S" "${TESTS_CMD[@]}"
wanted bench && run_phase bench "$BENCH_S" "${BENCH_CMD[@]}"
if wanted train; then
    rollout=hf
    "$PYTHON" -c "import vllm" >/dev/null 2>&1 && rollout=vllm
    [ "$rollout" = hf ] && echo "vLLM is not importable here: phase train uses --rollout hf." >>"$RESULTS"
    rm -rf "$OUT/train-run"
    run_phase train "$TRAIN_S" "$PYTHON" -m fastpo train --rollout "$rollout" "${TRAIN_ARGS[@]}"
fi
echo "gpu_check: results in $RESULTS"
exit $STATUS
