#!/usr/bin/env bash
# A kernel-source variant against the work tree's kernels on one GPU machine, in turns: the work tree's
# build, the variant's, the work tree's again (a second turn shows the drift between runs).
# Usage: VARIANT=path/to/lynx_kernels.cu [VARIANT_STAGES=test,passes] [BASE_STAGES=passes] bash bench/run_variant_device.sh
#   (the variant replaces kernels/csrc/lynx_kernels.cu only; its path is relative to the repository root)
#   (stages as bench/run_device.sh takes them; TEST_PATHS applies to both sides). Each turn's results go to
#   $OUT/<turn>/, packed into $OUT/variant-<time>.tgz (a call brings back at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${VARIANT:?VARIANT=path of the variant lynx_kernels.cu}"
OUT="${OUT:-$PWD/device-out}"; mkdir -p "$OUT"
SOURCE=kernels/csrc/lynx_kernels.cu
BASE_BUILD="${RT_LYNX_BUILD_DIR:-/tmp/rt_lynx_build}"
saved=$(mktemp)
cp -p "$SOURCE" "$saved"
trap 'cp -p "$saved" "$SOURCE"; rm -f "$saved"' EXIT   # the work tree's source back, however this ends
status=0
turn() {   # turn <name> <build dir> <stages>
  OUT="$OUT/$1" RT_LYNX_BUILD_DIR="$2" PACK_BUILD= bash bench/run_device.sh "$3"
  local rc=$?
  [ "$status" = 0 ] && status=$rc
}
turn base1 "$BASE_BUILD" "${BASE_STAGES:-passes}"
# The variant starts from the base build (the CUTLASS library and the unchanged objects are reused).
rm -rf /tmp/rt_lynx_variant_build && cp -a "$BASE_BUILD" /tmp/rt_lynx_variant_build
cp "$VARIANT" "$SOURCE"
turn variant /tmp/rt_lynx_variant_build "${VARIANT_STAGES:-test,passes}"
cp -p "$saved" "$SOURCE"
turn base2 "$BASE_BUILD" "${BASE_STAGES:-passes}"
(cd "$OUT" && tar czf "variant-$(date +%H%M%S).tgz" --remove-files base1 variant base2)
exit "$status"
