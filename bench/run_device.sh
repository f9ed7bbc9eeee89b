#!/usr/bin/env bash
# What the GPU machine runs: build, GPU tests, kernel benchmarks; results to $OUT.
# Usage: bash bench/run_device.sh [all|test|bench|fp8|lora|profile]   (OUT defaults to ./device-out)
#   test: tests/gpu (the sm90 tests first); bench: bench/kernels.py $BENCH_ARGS; fp8: bench/kernels.py --fp8;
#   lora: bench/lora_branch.py; profile: bench/profile_linear.py (kernel by kernel); all: test, bench, fp8 and lora.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device_setup.sh
STAGE="${1:-all}"
status=0
record() { [ "$status" = 0 ] && status=$1; }
if [ "$STAGE" = all ] || [ "$STAGE" = test ]; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest tests/gpu/test_sm90_lora_gpu.py tests/gpu/test_sm90_gpu.py tests/gpu -q -rfE -p no:cacheprovider \
    --durations=8 --maxfail=10 2>&1 | tee "$OUT/tests.log"
  record "${PIPESTATUS[0]}"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
  timeout "${BENCH_TIMEOUT:-240}" python3 bench/kernels.py ${BENCH_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/bench.log"
  record "${PIPESTATUS[0]}"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = fp8 ]; then
  timeout "${BENCH_TIMEOUT:-240}" python3 bench/kernels.py --fp8 ${BENCH_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/bench-fp8.log"
  record "${PIPESTATUS[0]}"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = lora ]; then
  timeout "${BENCH_TIMEOUT:-240}" python3 bench/lora_branch.py ${LORA_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/bench-lora.log"
  record "${PIPESTATUS[0]}"
fi
if [ "$STAGE" = profile ]; then
  timeout "${BENCH_TIMEOUT:-240}" python3 bench/profile_linear.py --out "$OUT" 2>&1 | tee "$OUT/profile.log"
  record "${PIPESTATUS[0]}"
fi
exit "$status"
