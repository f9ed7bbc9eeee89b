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
# Structured-B probe: cuSPARSELt's own compression of one pruned matrix as operand A and as B.
from rt_lynx_pack.kernels.reference import sparsify_nm
try:
    m = cusparselt.extension()
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(128, 256, device="cuda").to(dtype)
        p = sparsify_nm(torch.where(x == 0, torch.ones((), dtype=dtype, device="cuda"), x))
        a, b = m.compress_reference(p, False), m.compress_reference(p, True)
        diff = (a != b).nonzero().flatten()[:4].tolist() if a.numel() == b.numel() else "sizes differ"
        print("probe", dtype, "compressed bytes A", a.numel(), "B", b.numel(), "equal", torch.equal(a, b), diff)
    print("probe: operand in use", cusparselt.sparse_operand(), "sparsify split for 512x3072:",
          m.sparsify_split_for(512, 3072), "4096x3072:", m.sparsify_split_for(4096, 3072))
except Exception as exc:
    print("probe failed:", type(exc).__name__, exc)
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
