// Launchers for the fused elementwise kernels of DiT blocks (block_elementwise.cu), called from
// block_ops.cpp.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "lynx_kernels.h"

namespace rt_lynx {

// Attention inputs from the projections of one or two token streams (FLUX: text then image, or
// one stream): per (batch, token, head) RMSNorm of q and k with their stream's weight, RoPE with
// the table pe, and q, k, v written in the 16-bit dtype of the inputs, as (batch, heads, tokens,
// head_dim) or (batch, tokens, heads * head_dim).
struct QkNormRopeParams {
  // Per stream: q, k and v at (batch 0, token 0, head 0), all three with the same strides (elements).
  const void* q_src[2];
  const void* k_src[2];
  const void* v_src[2];
  int64_t batch_stride[2];
  int64_t row_stride[2];
  int64_t part_tokens[2];       // 0 for an absent second stream
  const void* q_weight[2];      // per stream: (head_dim,) contiguous, the 16-bit dtype
  const void* k_weight[2];
  const void* pe;               // (pe batch, tokens, head_dim / 2, 2, 2) contiguous from the tokens on
  bool pe_16bit;                // the table in the inputs' 16-bit dtype (RoPE rounded as in it), else fp32
  int64_t pe_batch_stride;      // elements; 0 when one table serves every batch entry
  void* q_out;
  void* k_out;
  void* v_out;                  // null: v is not written (one stream, read by attention in place)
  bool heads_major_out;         // (batch, heads, tokens, head_dim), else (batch, tokens, heads * head_dim)
  int64_t batch, tokens, heads;
  float eps;
};

void launch_qk_norm_rope(const QkNormRopeParams& params, int head_dim, bool is_bf16, cudaStream_t stream);

}  // namespace rt_lynx
