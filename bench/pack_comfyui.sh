#!/usr/bin/env bash
# Copies ComfyUI's Python sources (no tests, web assets, models or files over 1 MB) into .comfyui/,
# which the device runs carry as an ignored folder: the GPU machine has no ComfyUI and no network.
# Usage: bash bench/pack_comfyui.sh [/path/to/ComfyUI]   (default /work/comfyui)
set -euo pipefail
SRC="${1:-/work/comfyui}"
cd "$(dirname "$0")/.."
DEST="$PWD/.comfyui"
[ -f "$SRC/comfy/model_patcher.py" ] || { echo "$SRC is not a ComfyUI checkout"; exit 1; }
rm -rf "$DEST"; mkdir -p "$DEST"
(cd "$SRC" && find . \( -name .git -o -name tests -o -name tests-unit -o -name web -o -path ./models -o -path ./input \
    -o -path ./output -o -path ./custom_nodes -o -name __pycache__ -o -name script_examples \) -prune -o \
    -type f \( -name '*.py' -o -name '*.yaml' -o -name '*.json' -o -name '*.txt' \) -size -1024k -print0) \
  | (cd "$SRC" && xargs -0 cp --parents -t "$DEST")
mkdir -p "$DEST/models" "$DEST/custom_nodes" "$DEST/input" "$DEST/output"  # folder_paths expects them
grep -qxF '/.comfyui/' .git/info/exclude 2>/dev/null || echo '/.comfyui/' >> .git/info/exclude
SIZE_KB=$(du -sk "$DEST" | cut -f1)
echo "packed $(find "$DEST" -type f | wc -l) files, ${SIZE_KB} KB into $DEST"
[ "$SIZE_KB" -lt 61440 ] || { echo "too large for a device run (limit 60 MB)"; exit 1; }
