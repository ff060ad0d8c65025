#!/usr/bin/env bash
# The tiny world's headline experiment, end to end on a CPU (what the README reports):
#   generic preference pairs -> step-aware preference model (and its no-step ablation)
#   -> SPO from the tiny base model -> 500 validation images base vs SPO -> oracle metrics + comparison.
# Usage: bash scripts/tiny_experiment.sh [RUN_DIR] ; knobs below via environment variables.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/tiny-experiment}
MODEL=${MODEL:-}                   # tiny base model folder (default: the shipped one)
PAIRS=${PAIRS:-5000}
SPM_STEPS=${SPM_STEPS:-600}
SPO_ROUNDS=${SPO_ROUNDS:-40}
SPO_SETTINGS=${SPO_SETTINGS:-}     # extra --set k=v for SPO, e.g. "reduction=sum clamp_eps=none" (tiny default threshold: 0.1)
GEN_LIMIT=${GEN_LIMIT:-500}        # validation prompts to generate and score
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
S=.venv/bin/spobench
model_args=(); [ -n "$MODEL" ] && model_args=(--model "$MODEL")
mkdir -p "$RUN"

[ -f "$RUN/data/pairs.parquet" ] || $S toy data --out "$RUN/data" --pairs "$PAIRS" --base-samples 0 --overwrite
[ -d "$RUN/clip" ] || $S toy clip --out "$RUN/clip"
[ -f "$RUN/spm/metrics.json" ] || $S train-spm --backbone tiny "${model_args[@]}" --pairs "$RUN/data/pairs.parquet" \
  --init "$RUN/clip" --out "$RUN/spm" --steps "$SPM_STEPS" --batch-size 16 --lr 3e-4 --overwrite &
[ -f "$RUN/spm-nostep/metrics.json" ] || $S train-spm --backbone tiny "${model_args[@]}" --pairs "$RUN/data/pairs.parquet" \
  --init "$RUN/clip" --out "$RUN/spm-nostep" --steps "$SPM_STEPS" --batch-size 16 --lr 3e-4 --no-step --overwrite &
wait

sets=(--set scorer="$RUN/spm/spm" --set max_rounds="$SPO_ROUNDS" --set prompts=tiny-train)
for kv in $SPO_SETTINGS; do sets+=(--set "$kv"); done
[ -f "$RUN/spo/lora/pytorch_lora_weights.safetensors" ] || \
  $S train spo --backbone tiny "${model_args[@]}" --out "$RUN/spo" "${sets[@]}" --overwrite

[ -f "$RUN/gen-base/manifest.jsonl" ] || $S generate --backbone tiny "${model_args[@]}" --prompt-set tiny-val \
  --limit "$GEN_LIMIT" --seed 0 --out "$RUN/gen-base" --batch-size 25 --overwrite &
[ -f "$RUN/gen-spo/manifest.jsonl" ] || $S generate --backbone tiny "${model_args[@]}" --prompt-set tiny-val \
  --limit "$GEN_LIMIT" --lora "$RUN/spo/lora" --seed 0 --out "$RUN/gen-spo" --batch-size 25 --overwrite &
wait
for g in gen-base gen-spo; do
  $S eval --metrics toy_alignment,toy_aesthetic --images "$RUN/$g"
done
$S eval --compare "$RUN/gen-spo" "$RUN/gen-base" --out "$RUN/compare.json"
