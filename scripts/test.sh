#!/usr/bin/env bash
# The test command: sets up .venv, then runs the whole suite on a local Ray started by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest -q --durations=15 "$@"
