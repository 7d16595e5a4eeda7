#!/usr/bin/env bash
# Build .devcarry/: what benchmarks/gpu_check.py needs on the lent GPU machine (Python 3.12,
# torch and transformers there; no ray, deepspeed, pydantic, and no network) in at most 64 MiB.
#   whl/     cp312 / pure-Python wheels at the versions of .venv, and deepspeed repacked as a
#            py3-none-any wheel from .venv (PyPI has only its sdist; the package is pure Python)
#   ray.tar.xz  the ray cp312 wheel unpacked, without Java jars, rllib, ray.llm and the
#            dashboard's web client (unused by the probe stage), xz-compressed (79 MB -> ~29 MB)
# Usage: scripts/build_devcarry.sh [DEST]   (default .devcarry; DEST must be git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.devcarry}
PY=${PY:-.venv/bin/python}
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p "$DEST/whl"
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
pkgs=()
for p in pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson packaging \
         jsonschema jsonschema-specifications referencing rpds-py; do pkgs+=("$p==$(ver "$p")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
  -d "$DEST/whl" "${pkgs[@]}" 2> >(grep -v "is ignored" >&2)

# deepspeed: its installed files and dist-info as a wheel (RECORD rewritten with hashes).
"$PY" - "$SITE" "$DEST/whl" "$(ver deepspeed)" <<'EOF'
import base64, hashlib, sys, zipfile
from pathlib import Path
site, dest, version = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
info = f"deepspeed-{version}.dist-info"
files = [p for p in sorted((site / "deepspeed").rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
files += [site / info / n for n in ("METADATA", "entry_points.txt", "top_level.txt", "LICENSE") if (site / info / n).exists()]
wheel_meta = "Wheel-Version: 1.0\nGenerator: simmerge build_devcarry\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
records = []
with zipfile.ZipFile(dest / f"deepspeed-{version}-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as z:
    for name, data in [(str(p.relative_to(site)), p.read_bytes()) for p in files] + [(f"{info}/WHEEL", wheel_meta.encode())]:
        z.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        records.append(f"{name},sha256={digest},{len(data)}")
    z.writestr(f"{info}/RECORD", "\n".join(records + [f"{info}/RECORD,,"]) + "\n")
EOF

# ray: the cp312 wheel, stripped and recompressed (unpacked with tar on the device).
RAY=$(ver ray)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
  -d "$TMP" "ray==$RAY" 2> >(grep -v "is ignored" >&2)
(cd "$TMP" && unzip -q ray-*.whl && rm ray-*.whl \
  && rm -rf ray/jars ray/rllib ray/llm ray/dashboard/client/build \
  && find . -name __pycache__ -prune -exec rm -rf {} + \
  && tar -cJf ray.tar.xz ray "ray-$RAY.dist-info")
mv "$TMP/ray.tar.xz" "$DEST/ray.tar.xz"
du -b "$DEST"/whl/* "$DEST/ray.tar.xz" | awk '{s += $1; print} END {printf "total %.1f MiB\n", s / 1048576}'
