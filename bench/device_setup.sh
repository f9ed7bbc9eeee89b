#!/usr/bin/env bash
# Sourced by the device scripts: environment, carried wheels, build, availability of each path.
# The GPU machine has no registry: wheels travel in .whl/ (nvidia-cutlass for the sm90 GEMM).
# RT_LYNX_BUILD_DIR may point at a carried build folder, so a prebuilt sm90 library is reused.
export PYTHONUNBUFFERED=1
export RT_LYNX_BUILD_DIR="${RT_LYNX_BUILD_DIR:-/tmp/rt_lynx_build}"
OUT="${OUT:-$PWD/device-out}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -f __init__.py ] || { echo "missing top-level __init__.py"; exit 1; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
  nvcc --version | tail -2; which ninja; nproc
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cusparselt', torch.backends.cusparselt.version())"
} 2>&1 | tee "$OUT/env.log"
source bench/build_stamp.sh
reuse_carried_build "$RT_LYNX_BUILD_DIR"
# Why ninja would rebuild the carried extension (a dry run): what it names dirty, and the first reason.
if [ -f "$RT_LYNX_BUILD_DIR/build.ninja" ]; then
  ninja -C "$RT_LYNX_BUILD_DIR" -n -d explain 2>&1 | head -12 > "$OUT/ninja-explain.log"
fi
python3 - <<'PY' 2>&1 | tee "$OUT/build.log"
import logging, sys, time
sys.path.insert(0, "."); logging.basicConfig(level=logging.INFO, format="%(message)s")
from standalone import load_pack; load_pack()
from rt_lynx_pack.kernels import block_ops, build, cusparselt, fp8, sm90
import torch
t = time.monotonic(); print("build:", build.build(verbose=True), f"{time.monotonic() - t:.0f} s")
for name, check in (("cuSPARSELt", cusparselt.availability), ("cuSPARSELt fp8", fp8.availability_fp8),
                    ("sm90", sm90.availability_sm90), ("fused block ops", block_ops.availability_block_ops)):
    t = time.monotonic(); print(f"{name}:", check(torch.device("cuda")), f"{time.monotonic() - t:.1f} s")
PY
grep -q "^build: (True" "$OUT/build.log" && stamp_build "$RT_LYNX_BUILD_DIR"
# PACK_BUILD=1: the build folder comes back as $OUT/device_build.tgz, objects included (without them
# ninja rebuilds the extension, ~110 s); unpack it in the checkout and carry it on later calls.
if [ -n "${PACK_BUILD:-}" ]; then
  tar czf "$OUT/device_build.tgz" -C "$(dirname "$RT_LYNX_BUILD_DIR")" "$(basename "$RT_LYNX_BUILD_DIR")"
  ls -l "$OUT/device_build.tgz"
fi

# A device call brings back at most 8 files: past that, the logs travel as one archive (called at
# the end of each device script; several scripts may run in one call).
bundle_logs_if_many() {
  if [ "$(find "$OUT" -maxdepth 1 -type f | wc -l)" -gt 8 ] && ls "$OUT"/*.log >/dev/null 2>&1; then
    (cd "$OUT" && tar czf "logs-$(date +%H%M%S).tgz" --remove-files ./*.log)
  fi
}
