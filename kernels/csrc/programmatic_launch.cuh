// Programmatic dependent launch (sm90; see set_programmatic_launch in lynx_kernels.h), shared by
// every kernel of ours that runs inside a Lynx model's step. A kernel lets the next launch begin at
// its own start (allow_next_grid_launch), so the next kernel's blocks take each SM as this one's
// blocks leave it and set up there; a kernel launched with launch_after_previous may run before the
// previous kernel in the stream has finished, so it waits (wait_for_previous_grid) before it
// touches global memory. Both are no-ops without the launch attribute.
#pragma once
#include <cuda_runtime.h>

#include "lynx_kernels.h"

namespace rt_lynx {
namespace {

__device__ __forceinline__ void allow_next_grid_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
#endif
}
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Launches kernel behind the previous work in the stream, programmatically when switched on: it may
// then start while that work ends, so it must wait_for_previous_grid() before touching memory.
template <typename... Params, typename... Args>
void launch_after_previous(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                           Args... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = programmatic_launch() ? 1 : 0;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  const cudaError_t launched = cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
  if (launched != cudaSuccess) (void)cudaGetLastError();  // not left for the next op's check to report
  require(launched == cudaSuccess, "kernel launch failed: ", cudaGetErrorString(launched));
}

}  // namespace
}  // namespace rt_lynx
