# Sourced by bench/device_setup.sh: keeps a carried build folder whose kernel sources are byte-equal
# to the work tree's. A copy or a git checkout gives unchanged files new times, and ninja, which
# compares them with the output times it recorded in .ninja_log, would rebuild the extension (110 s);
# touching the objects does not help. The stamp holds the digest of the sources, build.py, torch and
# nvcc; matching sources are set back to a time older than any build (ninja 1.13, pip's, records a
# command's start, not its output's time, so the objects' own times are too late).
# Run from the repository root.

SOURCES_SET_BACK_TO=946684800   # 2000-01-01 UTC

kernel_sources_digest() {
  { sha256sum kernels/csrc/* kernels/build.py
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>/dev/null
    nvcc --version 2>/dev/null | tail -1; } | sha256sum | cut -d' ' -f1
}

# reuse_carried_build <build folder>: before building. The stamp goes either way; stamp_build
# writes it again once a build succeeds.
reuse_carried_build() {
  local stamp="$1/sources.stamp"
  if [ -f "$stamp" ] && [ "$(cut -d' ' -f1 "$stamp")" = "$(kernel_sources_digest)" ]; then
    # The cuSPARSELt headers staged inside the folder are inputs too: carried, they arrive with new times.
    touch -d "@$SOURCES_SET_BACK_TO" kernels/csrc/* $(find "$1/cusparselt_include" -type f 2>/dev/null)
  fi
  rm -f "$stamp"
}

# stamp_build <build folder>: after a build that succeeded (one that made objects).
stamp_build() {
  if [ -n "$(find "$1" -maxdepth 1 \( -name '*.o' -o -name '*.so' \) -print -quit)" ]; then
    kernel_sources_digest > "$1/sources.stamp"
  fi
}
