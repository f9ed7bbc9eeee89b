// Elementwise work of a DiT block around its linears, fused (block_elementwise.h).
#include "block_elementwise.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rt_lynx {
namespace {

template <bool kBf16>
__device__ __forceinline__ float half_to_float(uint16_t bits) {
  if constexpr (kBf16) {
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  } else {
    return __half2float(__ushort_as_half(bits));
  }
}

template <bool kBf16>
__device__ __forceinline__ uint16_t float_to_half(float v) {
  if constexpr (kBf16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    return __half_as_ushort(__float2half_rn(v));
  }
}

// kPerLane 16-bit values of one lane, as 32-bit words (one vector load/store; no byte-addressed
// union, which the compiler would put in local memory).
template <int kPerLane>
struct LaneValues {
  uint32_t words[kPerLane / 2];
  __device__ __forceinline__ uint16_t get(int i) const { return static_cast<uint16_t>(words[i / 2] >> (16 * (i % 2))); }
  __device__ __forceinline__ void set_pair(int pair, uint16_t low, uint16_t high) {
    words[pair] = static_cast<uint32_t>(low) | (static_cast<uint32_t>(high) << 16);
  }
};

template <int kPerLane>
__device__ __forceinline__ LaneValues<kPerLane> load_lane(const uint16_t* p) {
  LaneValues<kPerLane> values;
  if constexpr (kPerLane == 2) {
    values.words[0] = *reinterpret_cast<const uint32_t*>(p);
  } else if constexpr (kPerLane == 4) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    values.words[0] = v.x, values.words[1] = v.y;
  } else {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    values.words[0] = v.x, values.words[1] = v.y, values.words[2] = v.z, values.words[3] = v.w;
  }
  return values;
}

template <int kPerLane>
__device__ __forceinline__ void store_lane(uint16_t* p, const LaneValues<kPerLane>& values) {
  if constexpr (kPerLane == 2) {
    *reinterpret_cast<uint32_t*>(p) = values.words[0];
  } else if constexpr (kPerLane == 4) {
    *reinterpret_cast<uint2*>(p) = make_uint2(values.words[0], values.words[1]);
  } else {
    *reinterpret_cast<uint4*>(p) = make_uint4(values.words[0], values.words[1], values.words[2], values.words[3]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One head of q or k: x * rsqrt(mean(x^2) + eps) * weight rounded to the 16-bit dtype (as
// F.rms_norm), then RoPE in fp32 with separately rounded products and sum (as the eager
// pe[..., 0] * x[..., 0] + pe[..., 1] * x[..., 1]), rounded again.
template <bool kBf16, int kPerLane>
__device__ __forceinline__ LaneValues<kPerLane> norm_rope(const LaneValues<kPerLane>& in, const uint16_t* weight,
                                                          const float4* pe, float eps) {
  float x[kPerLane];
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    x[i] = half_to_float<kBf16>(in.get(i));
    sum_sq += x[i] * x[i];
  }
  const float rstd = rsqrtf(warp_sum(sum_sq) / (32 * kPerLane) + eps);
  const LaneValues<kPerLane> w = load_lane<kPerLane>(weight);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    x[i] = half_to_float<kBf16>(float_to_half<kBf16>(x[i] * rstd * half_to_float<kBf16>(w.get(i))));
  }
  LaneValues<kPerLane> out;
#pragma unroll
  for (int pair = 0; pair < kPerLane / 2; ++pair) {
    const float4 r = pe[pair];  // {pe[i][0][0], pe[i][0][1], pe[i][1][0], pe[i][1][1]}
    const float x0 = x[2 * pair], x1 = x[2 * pair + 1];
    out.set_pair(pair, float_to_half<kBf16>(__fadd_rn(__fmul_rn(r.x, x0), __fmul_rn(r.y, x1))),
                 float_to_half<kBf16>(__fadd_rn(__fmul_rn(r.z, x0), __fmul_rn(r.w, x1))));
  }
  return out;
}

// One warp per (batch, token, head); consecutive warps take consecutive heads of one token, so a
// block reads contiguous stretches of the qkv row.
template <bool kBf16, int kPerLane>
__global__ void __launch_bounds__(256) qk_norm_rope_kernel(QkNormRopeParams p) {
  constexpr int kHeadDim = 32 * kPerLane;
  const int lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (item >= p.batch * p.tokens * p.heads) return;
  const int64_t head = item % p.heads;
  const int64_t token = (item / p.heads) % p.tokens;
  const int64_t batch = item / (p.heads * p.tokens);
  // Selects, not p.part[part]: indexing the parameter arrays would copy them to local memory.
  const int part = token < p.part_tokens[0] ? 0 : 1;
  const int64_t row = part ? token - p.part_tokens[0] : token;
  const auto* src = static_cast<const uint16_t*>(part ? p.part[1] : p.part[0]) +
                    batch * (part ? p.batch_stride[1] : p.batch_stride[0]) +
                    row * (part ? p.row_stride[1] : p.row_stride[0]);
  const int64_t width = p.heads * kHeadDim;
  const int64_t column = head * kHeadDim + lane * kPerLane;
  const auto* weights_q = static_cast<const uint16_t*>(part ? p.q_weight[1] : p.q_weight[0]) + lane * kPerLane;
  const auto* weights_k = static_cast<const uint16_t*>(part ? p.k_weight[1] : p.k_weight[0]) + lane * kPerLane;
  const auto* pe = reinterpret_cast<const float4*>(p.pe + batch * p.pe_batch_stride) +
                   token * (kHeadDim / 2) + lane * (kPerLane / 2);

  const LaneValues<kPerLane> q = load_lane<kPerLane>(src + column);
  const LaneValues<kPerLane> k = load_lane<kPerLane>(src + width + column);
  const LaneValues<kPerLane> v = load_lane<kPerLane>(src + 2 * width + column);
  const int64_t out = ((batch * p.heads + head) * p.tokens + token) * kHeadDim + lane * kPerLane;
  store_lane<kPerLane>(static_cast<uint16_t*>(p.q_out) + out, norm_rope<kBf16, kPerLane>(q, weights_q, pe, p.eps));
  store_lane<kPerLane>(static_cast<uint16_t*>(p.k_out) + out, norm_rope<kBf16, kPerLane>(k, weights_k, pe, p.eps));
  store_lane<kPerLane>(static_cast<uint16_t*>(p.v_out) + out, v);
}

template <bool kBf16>
void launch_for_dtype(const QkNormRopeParams& p, int head_dim, unsigned blocks, cudaStream_t stream) {
  switch (head_dim) {
    case 64: qk_norm_rope_kernel<kBf16, 2><<<blocks, 256, 0, stream>>>(p); break;
    case 128: qk_norm_rope_kernel<kBf16, 4><<<blocks, 256, 0, stream>>>(p); break;
    default: qk_norm_rope_kernel<kBf16, 8><<<blocks, 256, 0, stream>>>(p); break;
  }
}

}  // namespace

void launch_qk_norm_rope(const QkNormRopeParams& p, int head_dim, bool is_bf16, cudaStream_t stream) {
  require(head_dim == 64 || head_dim == 128 || head_dim == 256, "qk_norm_rope: head_dim must be 64, 128 or 256, got ",
          head_dim);
  const int64_t warps = p.batch * p.tokens * p.heads;
  if (warps == 0) return;
  const int64_t blocks = (warps + 7) / 8;
  require(blocks <= 0x7fffffff, "qk_norm_rope: too many tokens for one launch");
  if (is_bf16) {
    launch_for_dtype<true>(p, head_dim, static_cast<unsigned>(blocks), stream);
  } else {
    launch_for_dtype<false>(p, head_dim, static_cast<unsigned>(blocks), stream);
  }
}

}  // namespace rt_lynx
