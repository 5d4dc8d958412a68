#!/usr/bin/env bash
# Claim 3's T = 1 replay with persistent online fits (configs/bench/qwen_t1_persist.yaml), one set per run: dev
# prompts 3-10 and TEST_PROMPTS test prompts from 113, at the machine's measured costs, GPU-like and the earlier
# model (or the MODELS named). The traces are computed by the first model's runs and read from the cache after.
#   bash scripts/qwen_t1_persist.sh DATASET [TEST_PROMPTS [MODELS [TEST_SEEDS]]]   # e.g. alpaca 100 "measured gpu"
# A finished run is extended (resume=true): more test prompts, or seeds (e.g. humaneval 51 measured "[0,1]").
set -euo pipefail
cd "$(dirname "$0")/.."
set=$1
n=${2:-15}
seeds=${4:-[0]}
declare -A costs_of=([measured]="" [gpu]="0.05 0 0"
                     [earlier]="0.4094370413635173 0.1289263596853095 1.7275170729941087")
bench() { .venv/bin/python bench.py --config configs/bench/qwen_t1_persist.yaml "datasets=[$set]" "$@"; }
for name in ${3:-measured gpu earlier}; do
  costs=()
  [ -n "${costs_of[$name]}" ] && { set -- ${costs_of[$name]}; costs=(draft_cost=$1 verify_cost=$2 round_cost=$3); }
  bench prompts_per_dataset=8 prompt_offset=3 out_dir=runs/qwen-t1-persist-$set-dev-$name "${costs[@]}"
  bench prompts_per_dataset=$n "seeds=$seeds" out_dir=runs/qwen-t1-persist-$set-$name "${costs[@]}"
done
