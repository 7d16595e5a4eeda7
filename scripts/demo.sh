#!/usr/bin/env bash
# The main job: sets up .venv, then runs the end-to-end demo (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/mkl_env.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec .venv/bin/simmerge demo --out "${1:-runs/demo}" "${@:2}"
