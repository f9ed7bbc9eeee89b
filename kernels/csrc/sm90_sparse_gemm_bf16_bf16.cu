// bf16 x bf16 -> bf16 instances of the sm90 sparse GEMM (see sm90_sparse_gemm_impl.cuh).
#include "sm90_sparse_gemm_impl.cuh"

namespace rt_lynx::sm90 {
ElementEntry entry_bf16_bf16() { return make_entry<cutlass::bfloat16_t, cutlass::bfloat16_t, false>(); }
}  // namespace rt_lynx::sm90
