#!/usr/bin/env bash
# The test command of README.md: the whole suite, distributed and slow tests included.
# Locally, skip the long ones with: bash scripts/test.sh -m "not slow and not distributed"
set -euo pipefail
cd "$(dirname "$0")/.."
export MKL_DEBUG_CPU_TYPE=5
python -m pytest -q "$@"
