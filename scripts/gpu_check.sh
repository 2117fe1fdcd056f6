#!/usr/bin/env bash
# The checks that need a GPU (never in CI), for a lent GPU machine with no network: its image has
# Python 3.12 with CUDA torch and transformers but no Ray, so the wheels come along in .whl/
# (made here first by scripts/gpu_wheels.sh; carry `.whl` in the device call).
#
#   bash scripts/gpu_check.sh tests            # tests/gpu: one GPU shared by 3 groups, RDT over CUDA IPC,
#                                              # every transport == LocalMoE (CPU, float32), ~3-4 min
#   bash scripts/gpu_check.sh bench [--quick]  # bench/service.py --device cuda (full: writes the
#                                              # "Service benchmark (GPU)" section of bench/RESULTS.md)
#   bash scripts/gpu_check.sh all [--quick]    # both
#
# Logs, the JSON and RESULTS.md go to $OUT (the device tool returns that folder), else /tmp/gpu_out.
# WHEELS names another wheel folder (a rehearsal elsewhere: PYVER=3.11 DEST=... scripts/gpu_wheels.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
shift || true
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
wheels=${WHEELS:-.whl}
ls "$wheels"/*.whl > /dev/null 2>&1 || { echo "no wheels in $wheels/: run scripts/gpu_wheels.sh where pip works, carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl || exit 2
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, ray, grpc, google.protobuf as pb; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', '| ray', ray.__version__, '| grpc', grpc.__version__, '| protobuf', pb.__version__)" 2>&1 | tee -a "$out/gpu.txt"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" || { echo "torch sees no CUDA device: nothing to check" >&2; exit 3; }
rc=0
if [[ $what == tests || $what == all ]]; then
    timeout 420 python3 -m pytest tests/gpu -m gpu -x -q -rA -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
    rc=${PIPESTATUS[0]}
fi
if [[ $what == bench || $what == all ]]; then
    timeout 540 python3 bench/service.py --device cuda --max-foreign 1.0 --out "$out/service_gpu.json" "$@" 2>&1 | tee "$out/bench_gpu.log"
    brc=${PIPESTATUS[0]}
    [[ $rc -eq 0 ]] && rc=$brc
    cp bench/RESULTS.md "$out/RESULTS.md" 2>/dev/null || true
fi
exit "$rc"
