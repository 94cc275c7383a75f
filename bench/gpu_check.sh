#!/usr/bin/env bash
# The GPU check: slicegpt's CUDA paths in one run (bench/gpu_check.py says what each step does).
#
#   bash bench/gpu_check.sh                       # the last stdout line is one JSON summary
#   GPU_CHECK_SAVE=$OUT bash bench/gpu_check.sh   # also gpu_check.json and gpu_check.log in $OUT
#
# For a machine with one NVIDIA GPU, PyTorch and transformers installed and no network; without a
# GPU the GPU steps are skipped. PYTHON picks the interpreter (default python3); GPU_CHECK_*
# variables set the sizes and timeouts. Exit status 0 when no step failed.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET:-420}
# A backstop only: the helper enforces its budget and a timeout per step, and prints the summary.
timeout -k 10 $((budget + 120)) "$PYTHON" bench/gpu_check.py
status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "{\"gpu_check\": \"failed\", \"error\": \"bench/gpu_check.py itself ran past $((budget + 120)) s\"}"
fi
exit "$status"
