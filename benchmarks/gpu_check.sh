#!/usr/bin/env bash
# Issue 13 part 5: ONE prepared command for a lent H100/H200, at most 8 minutes (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh              # (a) real-size SPO (SD-1.5) / MSPO (SDXL) rounds, bf16; (b) tiny headline
#   bash benchmarks/gpu_check.sh --dry-run    # the same code at test sizes on the CPU, seconds (tests/benchmarks/test_gpu_check.py)
#
# Writes benchmarks/results/gpu_check.json (dry run: gpu_check-dry-run.json) and, on the device machine, a copy
# in $OUT. Python: $PYTHON, else .venv/bin/python when it sees CUDA (or for --dry-run), else python3. The H200
# image has torch, transformers, peft and accelerate but no diffusers: carry a wheel folder .whl/ (diffusers and
# what it needs that the image lacks) and this script installs it into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]] && { [[ " $* " == *" --dry-run "* ]] || .venv/bin/python -c 'import torch,sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; }; then
    PYTHON=.venv/bin/python
  else
    PYTHON=python3
  fi
fi
if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@" || status=$?
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
  cp benchmarks/results/gpu_check*.json "$OUT"/ 2>/dev/null || true
fi
exit $status
