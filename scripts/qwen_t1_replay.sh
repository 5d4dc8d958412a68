#!/usr/bin/env bash
# The T = 1 replay verdict on the Qwen2.5-Coder pair at three cost models (docs/results.md): dev and test prompts,
# priced by this machine's costs measured in the run, by the cost model of the earlier results, and GPU-like.
# The traces are computed once (the first two runs) and read from the cache by the others: the rules with
# threshold "auto" decide by the pricing model, so each cost model is its own replay, not a repricing.
#   python -m specdecpp.fetch qwen2.5-coder && python train.py fit --config configs/train/qwen_t1.yaml
#   bash scripts/qwen_t1_replay.sh [TEST_PROMPTS [TEST_SEEDS]]   # then experiments/dev_test_table.py per cost model
# A finished run is extended (resume=true): raising TEST_PROMPTS or adding seeds (e.g. 40 "[0,1]") computes only
# the new traces (about 40 s each on a 2-core AVX2 CPU; replaying them at every setting takes minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-15}
seeds=${2:-[0]}
bench() { .venv/bin/python bench.py --config configs/bench/qwen_t1_replay.yaml "$@"; }
for model in "measured" "gpu 0.05 0 0" "earlier 0.4094370413635173 0.1289263596853095 1.7275170729941087"; do
  set -- $model
  name=$1; shift
  costs=()
  [ $# -eq 3 ] && costs=(draft_cost=$1 verify_cost=$2 round_cost=$3)
  bench prompts_per_dataset=8 prompt_offset=3 out_dir=runs/qwen-t1-replay-dev-$name "${costs[@]}"
  bench prompts_per_dataset=$n "seeds=$seeds" out_dir=runs/qwen-t1-replay-$name "${costs[@]}"
done
