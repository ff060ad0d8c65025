#!/usr/bin/env bash
# The main job on the tiny default, from a fresh clone: set up, then generate the tiny world's
# validation images with fixed seeds (PNGs + manifest.jsonl in runs/quickstart).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/spobench generate --backbone tiny --prompt-set tiny-val --limit 64 --seed 0 \
  --out runs/quickstart --overwrite
