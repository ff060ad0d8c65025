#!/usr/bin/env bash
# The test command: set up if needed, then run the test suite (fast tests and marked slow ones).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/spobench ] || bash scripts/setup.sh
exec .venv/bin/python -m pytest -q --durations=25 "$@"  # the 25 slowest: where the suite's time goes
