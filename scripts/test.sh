#!/usr/bin/env bash
# The test command of README.md: the whole suite, distributed and slow tests included, one pytest
# worker per core (pytest-xdist; each test file stays on one worker, so its module fixtures are
# built once).  Locally, skip the long ones with: bash scripts/test.sh -m "not slow and not distributed"
# One worker, as before: bash scripts/test.sh -n 0
set -euo pipefail
cd "$(dirname "$0")/.."
export MKL_DEBUG_CPU_TYPE=5
workers=$(python -c "import os; print(len(os.sched_getaffinity(0)))")
python -m pytest -q -n "$workers" --dist loadfile "$@"
