#!/usr/bin/env bash
# The test command: sets up .venv, then runs the whole suite on a local Ray started by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled
# The autoscaling test is opt-in (`bash scripts/test.sh -m autoscaling tests/test_autoscaling.py`):
# see docs/cluster.md for why it is not yet reliable enough for CI.
exec .venv/bin/python -m pytest -q -m "not autoscaling" --durations=15 "$@"
