// e4m3 x e4m3 -> fp16 residual instances of the sm90 sparse GEMM (see sm90_sparse_gemm_impl.cuh).
#include "sm90_sparse_gemm_impl.cuh"

namespace rt_lynx::sm90 {
ElementEntry entry_e4m3_fp16_residual() { return make_entry<cutlass::float_e4m3_t, cutlass::half_t, true>(); }
}  // namespace rt_lynx::sm90
