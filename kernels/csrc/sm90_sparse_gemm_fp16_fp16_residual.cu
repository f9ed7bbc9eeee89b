// fp16 x fp16 -> fp16 residual instances of the sm90 sparse GEMM (see sm90_sparse_gemm_impl.cuh).
#include "sm90_sparse_gemm_impl.cuh"

namespace rt_lynx::sm90 {
ElementEntry entry_fp16_fp16_residual() { return make_entry<cutlass::half_t, cutlass::half_t, true>(); }
}  // namespace rt_lynx::sm90
