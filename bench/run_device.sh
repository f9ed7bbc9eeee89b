#!/usr/bin/env bash
# What the GPU machine runs: environment check, build, GPU tests, kernel benchmark; results to $OUT.
# Usage: bash bench/run_device.sh [all|test|bench|fp8]   (OUT defaults to ./device-out)
# fp8: fp8 GPU tests, fp8 benchmark (bench/kernels.py --fp8 $BENCH_ARGS), then the other GPU tests.
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
# fp8 probe: both orientations of the e4m3 GEMM, sizes of cuSPARSELt's e4m3 compression.
try:
    from rt_lynx_pack.kernels import fp8
    from rt_lynx_pack.kernels.reference import sparsify_quantize_fp8
    m = cusparselt.extension()
    x = torch.randn(128, 256, device="cuda").to(torch.bfloat16)
    q, _ = sparsify_quantize_fp8(x, True)
    print("fp8 probe: ours", fp8.fp8_compressed_bytes(128, 256), "bytes, torch._cslt_compress",
          torch._cslt_compress(q).numel(), "own A", m.compress_reference(q, False).numel(),
          "own B", m.compress_reference(q, True).numel())
    for operand in ("A", "B"):
        m.set_fp8_sparse_b(operand == "B")
        try:
            print("fp8 probe: operand", operand, "self-test:", repr(fp8.self_test_fp8(torch.device("cuda"))))
        except Exception as exc:
            print("fp8 probe: operand", operand, "error:", type(exc).__name__, str(exc)[:300])
    m.set_fp8_sparse_b(False)
    # Where our buffer and cuSPARSELt's differ, and whether the product is right regardless.
    ours, _ = torch.ops.rt_lynx.sparsify_fp8(x, 128, True, 0)
    want = torch._cslt_compress(q).reshape(-1).view(torch.uint8)[: ours.numel()]
    bad = (ours != want).nonzero().flatten()
    print("fp8 probe: differing bytes", bad.numel(), "in values", int((bad < 128 * 128).sum()),
          "first", bad[:6].tolist(), "ours", ours[bad[:6]].tolist(), "cslt", want[bad[:6]].tolist())
    from rt_lynx_pack.kernels.reference import quantize_weight_fp8, sparse_linear_fp8_reference
    wq, ws = quantize_weight_fp8(torch.randn(64, 256, device="cuda"))
    y = torch.ops.rt_lynx.sparse_linear_fp8(x, wq, ws, None, True)
    ref = sparse_linear_fp8_reference(x.float(), wq, ws, None, True)
    print("fp8 probe: linear rel err vs fp8 reference", ((y.float() - ref).norm() / ref.norm()).item())
    print("fp8 availability:", fp8.availability_fp8(torch.device("cuda")))
    print("fp8 split for 512x3072:", m.sparsify_fp8_split_for(512, 3072), "4096x3072:",
          m.sparsify_fp8_split_for(4096, 3072), "4608x15360:", m.sparsify_fp8_split_for(4608, 15360))
except Exception as exc:
    print("fp8 probe failed:", type(exc).__name__, exc)
PY

if [ "$STAGE" = fp8 ]; then
  timeout "${TEST_TIMEOUT:-330}" python3 -m pytest tests/gpu/test_fp8_gpu.py -q -rfE -p no:cacheprovider --durations=5 2>&1 | tee "$OUT/tests-fp8.log"
  status=${PIPESTATUS[0]}
  timeout "${BENCH_TIMEOUT:-240}" python3 bench/kernels.py --fp8 ${BENCH_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/bench-fp8.log"
  bench_status=${PIPESTATUS[0]}
  [ "$status" = 0 ] && status=$bench_status
  timeout "${OTHER_TEST_TIMEOUT:-330}" python3 -m pytest tests/gpu -q -rfE -p no:cacheprovider --durations=5 --ignore=tests/gpu/test_fp8_gpu.py 2>&1 | tee "$OUT/tests.log"
  other_status=${PIPESTATUS[0]}
  [ "$status" = 0 ] && status=$other_status
fi
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
