#!/usr/bin/env bash
# The test command: sets up .venv, then runs the whole suite on a local Ray started by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/mkl_env.sh
export RAY_AUTH_MODE=disabled
# Two workers, a file each at a time: most of the long tests wait on processes of their own, so
# the 2 cores are shared with the short files meanwhile. Files are handed out in collection order
# (--no-loadscope-reorder; xdist would otherwise start with the files of most tests), which
# tests/conftest.py makes the long ones first, so the two longest start on different workers.
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 "$@"
