#!/usr/bin/env bash
# What the GPU machine runs: build, GPU tests, kernel benchmarks; results to $OUT.
# Usage: bash bench/run_device.sh [all|test|bench|fp8|lora|producer|profile|ncu|passes|ncu-passes|context|rope], or stages joined by commas
#   (test,bench,fp8) to run several after one set-up   (OUT defaults to ./device-out)
#   test: tests/gpu (the sm90 tests first; TEST_PATHS=tests/gpu for plain file order); bench: bench/kernels.py $BENCH_ARGS; fp8: bench/kernels.py --fp8;
#   lora: bench/lora_branch.py; producer: bench/producer_fusion.py, bf16 (+ LoRA r32) and fp8; profile:
#   bench/profile_linear.py (kernel by kernel); ncu: Nsight Compute on the dense and sparse GEMM of one
#   shape ($NCU_SHAPES); passes: bench/passes.py (the elementwise passes against their memory floor);
#   ncu-passes: Nsight Compute on those passes; context: bench/pass_context.py (the linear2 input pass alone and
#   after its block's kernels); rope: bench/rope_table.py (ComfyUI's RoPE table against the
#   pack's op; needs .comfyui); all: test, bench, fp8, lora and producer.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device_setup.sh
STAGE="${1:-all}"
status=0
record() { [ "$status" = 0 ] && status=$1; }
runs() { [[ ",$STAGE," == *",$1,"* ]]; }   # this stage was asked for by name
if [ "$STAGE" = all ] || runs test; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest ${TEST_PATHS:-tests/gpu/test_sm90_lora_gpu.py tests/gpu/test_sm90_gpu.py tests/gpu} -q -rfE -p no:cacheprovider \
    --durations=8 --maxfail=10 2>&1 | tee "$OUT/tests.log"
  record "${PIPESTATUS[0]}"
fi
if [ "$STAGE" = all ] || runs bench; then
  timeout "${BENCH_TIMEOUT:-240}" python3 bench/kernels.py ${BENCH_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/bench.log"
  record "${PIPESTATUS[0]}"
fi
if [ "$STAGE" = all ] || runs fp8; then
  timeout "${BENCH_TIMEOUT:-240}" python3 bench/kernels.py --fp8 ${BENCH_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/bench-fp8.log"
  record "${PIPESTATUS[0]}"
fi
if [ "$STAGE" = all ] || runs lora; then
  timeout "${BENCH_TIMEOUT:-240}" python3 bench/lora_branch.py ${LORA_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/bench-lora.log"
  record "${PIPESTATUS[0]}"
fi
if [ "$STAGE" = all ] || runs producer; then
  for variant in --lora=32 --fp8; do   # bf16 with and without a rank-32 Lynx LoRA; e4m3
    timeout "${BENCH_TIMEOUT:-240}" python3 bench/producer_fusion.py $variant ${BENCH_ARGS:-} --out "$OUT" 2>&1 \
      | tee "$OUT/bench-producer-${variant//[-=]/}.log"
    record "${PIPESTATUS[0]}"
  done
fi
# Nsight Compute over one program's kernels: throughput, shared-memory and warp-stall figures, to see which
# unit bounds each (NCU_LAUNCHES kernels matching NCU_KERNELS), summarised into $OUT/<name>.csv's log.
run_ncu() {
  local name=$1 kernels=$2; shift 2
  timeout "${BENCH_TIMEOUT:-240}" ncu --clock-control none --profile-from-start off --launch-count "${NCU_LAUNCHES:-4}" \
    --kernel-name "$kernels" --section SpeedOfLight \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats --section InstructionStats \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" --csv --page details \
    "$@" > "$OUT/$name.csv" 2> "$OUT/$name.log"
  record $?
  python3 - "$OUT/$name.csv" <<'PY'
import csv, re, sys
wanted = re.compile(r"Duration|SM Frequency|Throughput|Shared|Tensor|Max Bandwidth|Mem Pipes|Issue Slots|Executed Ipc|"
                    r"Bank|Stall|stalled|Warp Cycles|Eligible|Active Warps|Occupancy|Registers|Grid Size|Block Size|Issued Warp|"
                    r"Executed Instructions|Issued Instructions")
lines = [line for line in open(sys.argv[1]) if line.startswith('"')]
for row in csv.DictReader(lines):
    if wanted.search(row.get("Metric Name", "")):
        print(row["ID"], row["Kernel Name"][:40], "|", row["Section Name"], "|", row["Metric Name"], row["Metric Unit"],
              row["Metric Value"])
PY
}
if runs ncu; then
  # GEMM and sparsify kernels of one shape. Launch order is profile_linear.py's case order (dense, full linear,
  # two ops, GEMM alone, sparsify alone, + LoRA, + LoRA with down in the sparsify pass).
  run_ncu ncu-gemm "${NCU_KERNELS:-regex:device_kernel|nvjet|xmma|gemm}" \
    python3 bench/profile_linear.py --shapes "${NCU_SHAPES:-0}" --single-calls
fi
if runs passes; then
  timeout "${BENCH_TIMEOUT:-240}" python3 bench/passes.py --out "$OUT" 2>&1 | tee "$OUT/bench-passes.log"
  record "${PIPESTATUS[0]}"
fi
if runs context; then
  timeout "${BENCH_TIMEOUT:-240}" python3 bench/pass_context.py --out "$OUT" 2>&1 | tee "$OUT/bench-context.log"
  record "${PIPESTATUS[0]}"
fi
if runs rope; then
  COMFYUI_PATH="${COMFYUI_PATH:-$PWD/.comfyui}" timeout "${BENCH_TIMEOUT:-240}" python3 bench/rope_table.py --out "$OUT" 2>&1 \
    | tee "$OUT/bench-rope.log"
  record "${PIPESTATUS[0]}"
fi
if runs ncu-passes; then
  # bench/passes.py's passes, once each (the default, fast GELU), in its table's order.
  NCU_LAUNCHES="${NCU_LAUNCHES:-4}" run_ncu ncu-passes "${NCU_KERNELS:-regex:quantize|cat_gelu|qk_norm}" \
    python3 bench/passes.py --single-calls
fi
if runs profile; then
  timeout "${BENCH_TIMEOUT:-240}" python3 bench/profile_linear.py --out "$OUT" 2>&1 | tee "$OUT/profile.log"
  record "${PIPESTATUS[0]}"
fi
bundle_logs_if_many
exit "$status"
