#!/usr/bin/env bash
# Gather, into .whl/ (ignored by git), the wheels a GPU machine without network needs to run
# scripts/gpu_check.sh: its image has Python 3.12 with CUDA torch, transformers, grpcio-less
# essentials, but no Ray. Versions are this project's tested ones. Ray's wheel (79 MB) is
# repacked without what a headless run never loads (its Java jar, the dashboard's web build,
# RLlib, Tune, Train, Data), so the working tree that travels stays under 64 MiB.
#
#   bash scripts/gpu_wheels.sh          # here, with pip reaching PyPI; then run the check there
#   PYVER=3.11 DEST=/tmp/w311 bash scripts/gpu_wheels.sh   # the same set for another Python, elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf "$DEST" && mkdir -p "$DEST"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64
      --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux1_x86_64)
PKGS=(ray==2.60.0 grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 grpcio-status==1.85.3
      protobuf==7.36.2 googleapis-common-protos==1.76.0 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-exporter-prometheus==0.66b2
      opentelemetry-semantic-conventions==0.66b2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
      referencing==0.37.0 rpds-py==2026.9.1
      # Ray Serve, for bench/service.py's baseline
      fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic-core==2.50.5
      typing-inspection==0.4.5 annotated-types==0.7.0 watchfiles==1.3.0)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${PLAT[@]}" -d "$DEST" "${PKGS[@]}"
# repack Ray without the parts a headless Python run never loads (entries copied as they are: modes kept)
python3 - "$DEST"/ray-*.whl <<'PY'
import os, sys, zipfile
src = sys.argv[1]
drop = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/tune/", "ray/train/", "ray/data/", "ray/air/examples/")
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if not info.filename.startswith(drop):
            zout.writestr(info, zin.read(info), compress_type=zipfile.ZIP_DEFLATED)
os.replace(tmp, src)
PY
du -sh "$DEST" && ls -la "$DEST"
