// Elementwise work of a DiT block around its linears, fused (block_elementwise.h).
#include "block_elementwise.h"
#include "half_words.cuh"
#include "programmatic_launch.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rt_lynx {
namespace {

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

template <bool kBf16>
__device__ __forceinline__ float round_to_half(float v) {
  return bits_to_float<kBf16>(float_to_bits<kBf16>(v));
}

// One head of q or k: x * rsqrt(mean(x^2) + eps) * weight rounded to the 16-bit dtype (as
// F.rms_norm), then RoPE, out[2i + j] = pe[i][j][0] * x[2i] + pe[i][j][1] * x[2i + 1], with each
// product and the sum rounded as the eager elementwise ops round them: to fp32 for an fp32 table
// (FLUX), to the 16-bit dtype for a 16-bit one (Qwen-Image); then to the 16-bit dtype.
template <bool kBf16, int kPerLane, bool kRope16>
__device__ __forceinline__ LaneValues<kPerLane> norm_rope(const LaneValues<kPerLane>& in, const uint16_t* weight,
                                                          const void* pe, float eps) {
  float x[kPerLane];
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    x[i] = bits_to_float<kBf16>(in.get(i));
    sum_sq += x[i] * x[i];
  }
  const float rstd = rsqrtf(warp_sum(sum_sq) / (32 * kPerLane) + eps);
  const LaneValues<kPerLane> w = load_lane<kPerLane>(weight);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    x[i] = round_to_half<kBf16>(x[i] * rstd * bits_to_float<kBf16>(w.get(i)));
  }
  LaneValues<kPerLane> out;
#pragma unroll
  for (int pair = 0; pair < kPerLane / 2; ++pair) {
    const float x0 = x[2 * pair], x1 = x[2 * pair + 1];
    if constexpr (kRope16) {
      const LaneValues<4> r = load_lane<4>(static_cast<const uint16_t*>(pe) + 4 * pair);
      const float r00 = bits_to_float<kBf16>(r.get(0)), r01 = bits_to_float<kBf16>(r.get(1));
      const float r10 = bits_to_float<kBf16>(r.get(2)), r11 = bits_to_float<kBf16>(r.get(3));
      out.set_pair(pair, float_to_bits<kBf16>(round_to_half<kBf16>(r00 * x0) + round_to_half<kBf16>(r01 * x1)),
                   float_to_bits<kBf16>(round_to_half<kBf16>(r10 * x0) + round_to_half<kBf16>(r11 * x1)));
    } else {
      const float4 r = static_cast<const float4*>(pe)[pair];  // {pe[i][0][0], pe[i][0][1], pe[i][1][0], pe[i][1][1]}
      out.set_pair(pair, float_to_bits<kBf16>(__fadd_rn(__fmul_rn(r.x, x0), __fmul_rn(r.y, x1))),
                   float_to_bits<kBf16>(__fadd_rn(__fmul_rn(r.z, x0), __fmul_rn(r.w, x1))));
    }
  }
  return out;
}

// One warp per (batch, token, head); consecutive warps take consecutive heads of one token, so a
// block reads contiguous stretches of the projections' rows.
template <bool kBf16, int kPerLane, bool kRope16>
__global__ void __launch_bounds__(256) qk_norm_rope_kernel(QkNormRopeParams p) {
  constexpr int kHeadDim = 32 * kPerLane;
  const int lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  allow_next_grid_launch();
  wait_for_previous_grid();
  if (item >= p.batch * p.tokens * p.heads) return;
  const int64_t head = item % p.heads;
  const int64_t token = (item / p.heads) % p.tokens;
  const int64_t batch = item / (p.heads * p.tokens);
  // Selects, not p.q_src[part]: indexing the parameter arrays would copy them to local memory.
  const int part = token < p.part_tokens[0] ? 0 : 1;
  const int64_t row = part ? token - p.part_tokens[0] : token;
  const int64_t offset = batch * (part ? p.batch_stride[1] : p.batch_stride[0]) +
                         row * (part ? p.row_stride[1] : p.row_stride[0]) + head * kHeadDim + lane * kPerLane;
  const auto* q_src = static_cast<const uint16_t*>(part ? p.q_src[1] : p.q_src[0]) + offset;
  const auto* k_src = static_cast<const uint16_t*>(part ? p.k_src[1] : p.k_src[0]) + offset;
  const auto* v_src = static_cast<const uint16_t*>(part ? p.v_src[1] : p.v_src[0]) + offset;
  const auto* weights_q = static_cast<const uint16_t*>(part ? p.q_weight[1] : p.q_weight[0]) + lane * kPerLane;
  const auto* weights_k = static_cast<const uint16_t*>(part ? p.k_weight[1] : p.k_weight[0]) + lane * kPerLane;
  // Four table entries per pair, kPerLane / 2 pairs per lane.
  const int64_t pe_offset = batch * p.pe_batch_stride + (token * (kHeadDim / 2) + lane * (kPerLane / 2)) * 4;
  const void* pe = kRope16 ? static_cast<const void*>(static_cast<const uint16_t*>(p.pe) + pe_offset)
                           : static_cast<const void*>(static_cast<const float*>(p.pe) + pe_offset);

  const LaneValues<kPerLane> q = load_lane<kPerLane>(q_src);
  const LaneValues<kPerLane> k = load_lane<kPerLane>(k_src);
  const int64_t out = (p.heads_major_out ? (batch * p.heads + head) * p.tokens + token
                                         : (batch * p.tokens + token) * p.heads + head) * kHeadDim + lane * kPerLane;
  if (p.v_out != nullptr) {   // else attention reads v where the projection wrote it
    store_lane<kPerLane>(static_cast<uint16_t*>(p.v_out) + out, load_lane<kPerLane>(v_src));
  }
  store_lane<kPerLane>(static_cast<uint16_t*>(p.q_out) + out,
                       norm_rope<kBf16, kPerLane, kRope16>(q, weights_q, pe, p.eps));
  store_lane<kPerLane>(static_cast<uint16_t*>(p.k_out) + out,
                       norm_rope<kBf16, kPerLane, kRope16>(k, weights_k, pe, p.eps));
}

template <bool kBf16, bool kRope16>
void launch_variant(const QkNormRopeParams& p, int head_dim, unsigned blocks, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return launch_after_previous(qk_norm_rope_kernel<kBf16, 2, kRope16>, dim3(blocks), dim3(256), 0, stream, p);
    case 128: return launch_after_previous(qk_norm_rope_kernel<kBf16, 4, kRope16>, dim3(blocks), dim3(256), 0, stream, p);
    default: return launch_after_previous(qk_norm_rope_kernel<kBf16, 8, kRope16>, dim3(blocks), dim3(256), 0, stream, p);
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
  const auto grid = static_cast<unsigned>(blocks);
  if (is_bf16) {
    p.pe_16bit ? launch_variant<true, true>(p, head_dim, grid, stream) : launch_variant<true, false>(p, head_dim, grid, stream);
  } else {
    p.pe_16bit ? launch_variant<false, true>(p, head_dim, grid, stream)
               : launch_variant<false, false>(p, head_dim, grid, stream);
  }
}

}  // namespace rt_lynx
