#!/usr/bin/env bash
# What a GPU machine with no network and no weights runs, in well under 8 minutes on one H200:
# the CUDA-marked tests, then scripts/gpu_check.py (FSDP2 + bf16-mixed head training on a random-init
# Llama-3.2-1B-shaped draft; engine vs transformers on random-init 8B / 1B shapes), ending with one table.
#   bash scripts/gpu_check.sh [OUT_DIR]              # on the GPU machine, from anywhere in the repository
#   bash scripts/gpu_check.sh --dry-run [OUT_DIR]    # anywhere: the same steps on tiny shapes on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then DRY=(--dry-run); shift; fi
OUT=${1:-runs/gpu-check}
mkdir -p "$OUT"
echo "== CUDA-marked tests"
"$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 | tail -3 | tee "$OUT/tests.txt"
echo "== training and engine checks"
"$PY" scripts/gpu_check.py "${DRY[@]}" --out "$OUT"
