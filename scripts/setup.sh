#!/usr/bin/env bash
# Create .venv and install spobench with its test extras. torch is installed first and pinned:
# torch==2.13.0 (CPU) comes from local disk here; an unpinned torch would pull a multi-GB CUDA build.
# Quiet: pip's output goes to .venv/setup.log and is shown only when a step fails (PIP_VERBOSE=1: live);
# on success the script prints one line.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
start=$SECONDS
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
log=.venv/setup.log
: > "$log"
pip() {
  if [ -n "${PIP_VERBOSE:-}" ]; then
    .venv/bin/python -m pip --disable-pip-version-check "$@"
    return
  fi
  # a machine's pip config may name index folders that are absent (a warning on every install), and
  # setuptools says "Editable installation" on every editable install: kept in the log, not printed
  echo "+ pip $*" >> "$log"
  if ! .venv/bin/python -m pip -q --disable-pip-version-check "$@" >> "$log" 2>&1; then
    grep -v "^WARNING: Location .* is ignored" "$log" | tail -n 40 >&2
    echo "setup: 'pip $*' failed (full output: $log)" >&2
    exit 1
  fi
}
pip install --upgrade pip
pip install "torch==2.13.0"
pip install -e ".[test]"
versions=$(.venv/bin/python -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("spobench", "torch", "diffusers", "transformers")))')
echo "setup: .venv ready ($versions) in $((SECONDS - start)) s; pip's output: $log"
