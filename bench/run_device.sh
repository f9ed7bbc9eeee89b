#!/usr/bin/env bash
# What the GPU machine runs: environment check, build, GPU tests, kernel benchmark; results to $OUT.
# Usage: bash bench/run_device.sh [all|test|bench]   (OUT defaults to ./device-out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device-out}"; mkdir -p "$OUT"
STAGE="${1:-all}"
export PYTHONUNBUFFERED=1
export RT_LYNX_BUILD_DIR="${RT_LYNX_BUILD_DIR:-/tmp/rt_lynx_build}"
# Wheels carried along (no registry on the GPU machine), if any.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -f __init__.py ] || { echo "missing top-level __init__.py"; exit 1; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -2; which ninja
  python3 - <<'PY'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "cusparselt", torch.backends.cusparselt.version(), "triton", triton.__version__)
import nvidia, glob, os
print("cusparseLt.h:", [h for p in nvidia.__path__ for h in glob.glob(os.path.join(p, "*", "include", "cusparseLt.h"))])
PY
} 2>&1 | tee "$OUT/env.log"

status=0
python3 - <<'PY' 2>&1 | tee "$OUT/build.log"
import logging, sys, time
sys.path.insert(0, "."); logging.basicConfig(level=logging.INFO, format="%(message)s")
from standalone import load_pack; load_pack()
from rt_lynx_pack.kernels import build, cusparselt
import torch
t = time.monotonic(); print("build:", build.build(verbose=False), f"{time.monotonic() - t:.0f} s")
t = time.monotonic(); print("availability:", cusparselt.availability(torch.device("cuda")), f"{time.monotonic() - t:.1f} s")
PY

if [ "$STAGE" = all ] || [ "$STAGE" = test ]; then
  timeout "${TEST_TIMEOUT:-330}" python3 -m pytest tests/gpu -q -rfE -p no:cacheprovider --durations=8 2>&1 | tee "$OUT/tests.log"
  status=${PIPESTATUS[0]}
fi
if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
  timeout "${BENCH_TIMEOUT:-240}" python3 bench/kernels.py ${BENCH_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/bench.log"
  bench_status=${PIPESTATUS[0]}
  [ "$status" = 0 ] && status=$bench_status
fi
exit "$status"
