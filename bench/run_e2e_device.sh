#!/usr/bin/env bash
# End-to-end benchmark on the GPU machine: builds the kernels, then runs bench/e2e.py with ComfyUI
# from .comfyui/ (made by bench/pack_comfyui.sh). Results go to bench/results/ and $OUT.
# Usage: OUT=... bash bench/run_e2e_device.sh [e2e.py options, e.g. --models flux --resolutions 1024]
set -uo pipefail
cd "$(dirname "$0")/.."
export COMFYUI_PATH="${COMFYUI_PATH:-$PWD/.comfyui}"
[ -f "$COMFYUI_PATH/comfy/model_patcher.py" ] || { echo "no ComfyUI at $COMFYUI_PATH: run bench/pack_comfyui.sh and carry .comfyui"; exit 1; }
# Build the fast kernels first so the Lynx side runs on sparse tensor cores (the summary line says which path ran).
source bench/device_setup.sh
touch "$OUT/.start"
timeout "${E2E_TIMEOUT:-540}" python3 bench/e2e.py --out bench/results "$@" 2>&1 | tee "$OUT/e2e-$(date +%H%M%S).log"  # one log per run of a call
status=${PIPESTATUS[0]}
# Only this run's results: a call brings back at most 8 files.
find bench/results -name 'e2e-*' -newer "$OUT/.start" -exec cp {} "$OUT"/ \;
rm -f "$OUT/.start"
bundle_logs_if_many
exit "$status"
