#!/usr/bin/env bash
# Sourced by the device scripts: environment, carried wheels, build, availability of each path.
# The GPU machine has no registry: wheels travel in .whl/ (nvidia-cutlass for the sm90 GEMM).
# RT_LYNX_BUILD_DIR (default .device_build) may hold carried libraries: kernels/build.py reuses the
# sm90 library under its sources' digest and the extension whose digest file matches its inputs.
export PYTHONUNBUFFERED=1
export RT_LYNX_BUILD_DIR="${RT_LYNX_BUILD_DIR:-$PWD/.device_build}"
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
# PACK_BUILD=1: the built libraries come back as $OUT/device_build.tgz (the extension with its digest,
# the sm90 library in its digest folder; the objects would be over a returned file's size limit). Unpack
# it into the checkout's .device_build and carry that: a fresh machine then builds nothing (77 + 172 s).
if [ -n "${PACK_BUILD:-}" ] && grep -q "^build: (True" "$OUT/build.log"; then
  (cd "$RT_LYNX_BUILD_DIR" && tar czf "$OUT/device_build.tgz" rt_lynx_ext.so rt_lynx_ext.digest sm90-*/librt_lynx_sm90.so)
  ls -l "$OUT/device_build.tgz"
fi

# A device call brings back at most 8 files: past that, the logs travel as one archive (called at
# the end of each device script; several scripts may run in one call).
bundle_logs_if_many() {
  if [ "$(find "$OUT" -maxdepth 1 -type f | wc -l)" -gt 8 ] && ls "$OUT"/*.log >/dev/null 2>&1; then
    (cd "$OUT" && tar czf "logs-$(date +%H%M%S).tgz" --remove-files ./*.log)
  fi
}
