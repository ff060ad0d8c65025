#!/usr/bin/env bash
# The main job on the tiny default, from a fresh clone: set up, then the tiny world's headline comparison
# (spobench/recipes/headline.toml): base vs SPO vs Diffusion-DPO from the shipped tiny base model, trained,
# generated with fixed seeds and scored with four metric columns; the report (report.md, report.html,
# grid.png, plots) lands in runs/headline. Rerunning reuses finished cells (--resume).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
.venv/bin/spobench reproduce headline --backbone tiny --out runs/headline --resume
