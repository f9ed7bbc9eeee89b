#!/usr/bin/env bash
# Makes, on a machine with network access, the ignored folders the GPU machine's runs carry
# (it has no package registry and no ComfyUI):
#   .whl/      wheels pip cannot fetch there: nvidia-cutlass (the sm90 GEMM's headers), torchsde
#              and trampoline (ComfyUI's samplers); EXTRA_WHEELS=av adds ComfyUI's video import
#              (35 MB: with a carried build folder a call would pass the 64 MiB it may carry)
#   .comfyui/  ComfyUI's Python sources (bench/pack_comfyui.sh), when a checkout is given
# Usage: bash bench/prepare_device.sh [/path/to/ComfyUI]
# Then carry [".whl", ".comfyui"] (and a prebuilt RT_LYNX_BUILD_DIR, e.g. ".device_build").
set -euo pipefail
cd "$(dirname "$0")/.."
for folder in /.whl/ /.comfyui/ /.device_build/ /device-out/; do
  grep -qxF "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >> .git/info/exclude
done
CUTLASS=$(grep -E '^nvidia-cutlass' requirements.txt)   # the range the pack asks for
rm -rf .whl && mkdir -p .whl
# The GPU machine's Python is 3.12 on x86-64 (KINDS.md); --no-deps: only what it lacks.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "$CUTLASS" torchsde trampoline ${EXTRA_WHEELS:-}
ls .whl
if [ $# -ge 1 ]; then
  bash bench/pack_comfyui.sh "$1"
fi
du -sh .whl ${1:+.comfyui}
