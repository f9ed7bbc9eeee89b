#!/usr/bin/env bash
# End-to-end benchmark on the GPU machine: builds the kernels, then runs bench/e2e.py with ComfyUI
# from .comfyui/ (made by bench/pack_comfyui.sh). Results go to bench/results/ and $OUT.
# Usage: OUT=... bash bench/run_e2e_device.sh [e2e.py options, e.g. --models flux --resolutions 1024]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export COMFYUI_PATH="${COMFYUI_PATH:-$PWD/.comfyui}"
export RT_LYNX_BUILD_DIR="${RT_LYNX_BUILD_DIR:-/tmp/rt_lynx_build}"
[ -f "$COMFYUI_PATH/comfy/model_patcher.py" ] || { echo "no ComfyUI at $COMFYUI_PATH: run bench/pack_comfyui.sh and carry .comfyui"; exit 1; }
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried along (no registry on the GPU machine)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/e2e-env.log"
# Build the fast kernels first so the Lynx side runs on sparse tensor cores (the summary line says which path ran).
python3 - <<'PY' 2>&1 | tee -a "$OUT/e2e-env.log"
import logging, sys, time
sys.path.insert(0, "."); logging.basicConfig(level=logging.INFO, format="%(message)s")
from standalone import load_pack; load_pack()
from rt_lynx_pack.kernels import build, cusparselt
import torch
t = time.monotonic(); print("build:", build.build(verbose=False), f"{time.monotonic() - t:.0f} s")
print("availability:", cusparselt.availability(torch.device("cuda")))
PY
timeout "${E2E_TIMEOUT:-540}" python3 bench/e2e.py --out bench/results "$@" 2>&1 | tee "$OUT/e2e.log"
status=${PIPESTATUS[0]}
cp bench/results/e2e-* "$OUT"/ 2>/dev/null
exit "$status"
