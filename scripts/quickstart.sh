#!/usr/bin/env bash
# The main job on the tiny default, from a fresh clone: set up, generate the tiny world's 500 validation
# images with fixed seeds from the shipped base model, and score them with the oracle metrics
# (PNGs, manifest.jsonl and results.json in runs/quickstart). About 3 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/spobench generate --backbone tiny --prompt-set tiny-val --seed 0 --batch-size 25 \
  --out runs/quickstart --overwrite
.venv/bin/spobench eval --metrics toy_alignment,toy_aesthetic --images runs/quickstart
