// Launchers for the fused elementwise kernels of DiT blocks (block_elementwise.cu), called from
// block_ops.cpp.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "lynx_kernels.h"

namespace rt_lynx {

// Attention inputs from one or two qkv projections (FLUX: text then image tokens, or one stream):
// per (batch, token, head) RMSNorm of q and k with their part's weight, RoPE with pe, and q, k, v
// written as (batch, heads, tokens, head_dim) in the 16-bit dtype of the inputs.
struct QkNormRopeParams {
  const void* part[2];          // (batch, part_tokens, 3 * heads * head_dim) rows; part[1] unused if 0 tokens
  int64_t batch_stride[2];      // elements
  int64_t row_stride[2];        // elements
  int64_t part_tokens[2];
  const void* q_weight[2];      // per part: (head_dim,) contiguous, the 16-bit dtype
  const void* k_weight[2];
  const float* pe;              // (pe batch, 1, tokens, head_dim / 2, 2, 2) fp32, contiguous
  int64_t pe_batch_stride;      // floats; 0 when one pe serves every batch entry
  void* q_out;
  void* k_out;
  void* v_out;
  int64_t batch, tokens, heads;
  float eps;
};

void launch_qk_norm_rope(const QkNormRopeParams& params, int head_dim, bool is_bf16, cudaStream_t stream);

}  // namespace rt_lynx
