#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# Torch is installed first, pinned, so the project's install does not pull another build. From
# plain PyPI a Linux torch wheel is the multi-GB CUDA build: TORCH_INDEX_URL (e.g.
# https://download.pytorch.org/whl/cpu) names the index to take torch from instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
stamp=.venv/.simmerge-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION:-2.13.0}"
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
