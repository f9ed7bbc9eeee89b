// RT-Lynx memory-bound kernels: fused 2:4 sparsify + cuSPARSELt compression + norm scale, and
// the per-token-scale / per-feature-bias epilogue that follows the sparse GEMM.
//
// Compressed layout (cuSPARSELt 0.8, 16-bit types, rows padded to 64, checked at start-up
// against torch._cslt_compress): values = rows * cols/2 elements, row-major, the two kept
// entries of each group of 4 in column order; then rows*cols/8 metadata bytes. The 4-bit code of
// (row r, group g) is i0 | i1 << 2 (kept positions, i0 < i1); it sits in byte
//   (r/64)*8*cols + (g/8)*256 + ((r%64)/16)*64 + (r%8)*8 + 2*(g%4) + (g%8)/4,
// low nibble for r%16 < 8, high nibble for row r+8.
#include "lynx_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rt_lynx {
namespace {

template <bool kBf16>
__device__ __forceinline__ float bits_to_float(uint32_t bits16) {
  if constexpr (kBf16) {
    return __uint_as_float(bits16 << 16);
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits16)));
  }
}

template <bool kBf16>
__device__ __forceinline__ uint32_t float_to_bits(float v) {
  if constexpr (kBf16) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(v)));
  } else {
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(v)));
  }
}

// One group of 4 (two 32-bit words, two values each). Keeps the 2 largest |x|, ties to the lower
// index: key = |x| bits << 2 | (3 - position) makes every key distinct and orders exactly as the
// reference rule (j beats i if |x_j| > |x_i|, or equal and j < i). |x| bits compare like |x|
// for non-NaN 16-bit floats.
template <bool kBf16>
__device__ __forceinline__ void select_group(uint32_t lo, uint32_t hi, uint32_t& kept_pair,
                                             uint32_t& code, float& dense_sq, float& kept_sq) {
  const uint32_t a0 = lo & 0xffffu, a1 = lo >> 16, a2 = hi & 0xffffu, a3 = hi >> 16;
  const uint32_t k0 = ((a0 & 0x7fffu) << 2) | 3u;
  const uint32_t k1 = ((a1 & 0x7fffu) << 2) | 2u;
  const uint32_t k2 = ((a2 & 0x7fffu) << 2) | 1u;
  const uint32_t k3 = ((a3 & 0x7fffu) << 2);
  const bool keep0 = (int(k1 > k0) + int(k2 > k0) + int(k3 > k0)) < 2;
  const bool keep1 = (int(k0 > k1) + int(k2 > k1) + int(k3 > k1)) < 2;
  const bool keep2 = (int(k0 > k2) + int(k1 > k2) + int(k3 > k2)) < 2;
  const bool keep3 = (int(k0 > k3) + int(k1 > k3) + int(k2 > k3)) < 2;
  // Exactly two are kept, so the lower kept one is 0, 1 or 2 and the upper one 1, 2 or 3.
  const uint32_t v_low = keep0 ? a0 : (keep1 ? a1 : a2);
  const uint32_t v_high = keep3 ? a3 : (keep2 ? a2 : a1);
  const uint32_t i_low = keep0 ? 0u : (keep1 ? 1u : 2u);
  const uint32_t i_high = keep3 ? 3u : (keep2 ? 2u : 1u);
  kept_pair = v_low | (v_high << 16);
  code = i_low | (i_high << 2);
  const float f0 = bits_to_float<kBf16>(a0), f1 = bits_to_float<kBf16>(a1);
  const float f2 = bits_to_float<kBf16>(a2), f3 = bits_to_float<kBf16>(a3);
  dense_sq += f0 * f0 + f1 * f1 + f2 * f2 + f3 * f3;
  const float g0 = bits_to_float<kBf16>(v_low), g1 = bits_to_float<kBf16>(v_high);
  kept_sq += g0 * g0 + g1 * g1;
}

// A 32-column chunk of one row: 4 x 16-byte loads in, 8 groups -> 2 x 16-byte value stores and
// 8 metadata codes.
template <bool kBf16>
__device__ __forceinline__ void select_chunk(const uint4 (&in)[4], uint4 (&out)[2],
                                             uint32_t (&codes)[8], float& dense_sq,
                                             float& kept_sq) {
  uint32_t pairs[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    select_group<kBf16>(in[i].x, in[i].y, pairs[2 * i], codes[2 * i], dense_sq, kept_sq);
    select_group<kBf16>(in[i].z, in[i].w, pairs[2 * i + 1], codes[2 * i + 1], dense_sq, kept_sq);
  }
  out[0] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
  out[1] = make_uint4(pairs[4], pairs[5], pairs[6], pairs[7]);
}

// Block = 16 rows (8 row pairs r, r+8 that share metadata bytes) x 32 lanes over column chunks.
// A warp is one row pair, so the row norms reduce with shuffles only.
template <bool kBf16>
__global__ void __launch_bounds__(256) sparsify_compress_kernel(
    const uint16_t* __restrict__ x, int64_t rows, int64_t cols, int64_t ld_x,
    uint16_t* __restrict__ values, uint8_t* __restrict__ meta, float* __restrict__ scale) {
  const int lane = threadIdx.x;
  const int row_in_8 = threadIdx.y;
  const int64_t block_row = int64_t(blockIdx.x) * 16;
  const int64_t r0 = block_row + row_in_8;
  const int64_t r1 = r0 + 8;
  const bool has_r0 = r0 < rows;
  const bool has_r1 = r1 < rows;
  const int64_t chunks = cols / 32;
  const uint4* x0 = reinterpret_cast<const uint4*>(x + (has_r0 ? r0 : 0) * ld_x);
  const uint4* x1 = reinterpret_cast<const uint4*>(x + (has_r1 ? r1 : 0) * ld_x);
  uint4* v0 = reinterpret_cast<uint4*>(values + r0 * (cols / 2));
  uint4* v1 = reinterpret_cast<uint4*>(values + r1 * (cols / 2));
  uint8_t* meta_row = meta + (block_row / 64) * 8 * cols + ((block_row % 64) / 16) * 64 + row_in_8 * 8;
  float dense0 = 0.f, kept0 = 0.f, dense1 = 0.f, kept1 = 0.f;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

  for (int64_t c = lane; c < chunks; c += 32) {
    uint4 in0[4], in1[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      in0[i] = has_r0 ? __ldg(x0 + c * 4 + i) : zero;
      in1[i] = has_r1 ? __ldg(x1 + c * 4 + i) : zero;
    }
    uint4 out0[2], out1[2];
    uint32_t codes0[8], codes1[8];
    select_chunk<kBf16>(in0, out0, codes0, dense0, kept0);
    select_chunk<kBf16>(in1, out1, codes1, dense1, kept1);
    v0[c * 2] = out0[0];
    v0[c * 2 + 1] = out0[1];
    v1[c * 2] = out1[0];
    v1[c * 2 + 1] = out1[1];
    uint64_t word = 0;
#pragma unroll
    for (int g = 0; g < 8; ++g) {
      const int byte_pos = 2 * (g % 4) + g / 4;
      word |= uint64_t(codes0[g] | (codes1[g] << 4)) << (8 * byte_pos);
    }
    *reinterpret_cast<uint64_t*>(meta_row + c * 256) = word;
  }

  if (scale != nullptr) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      dense0 += __shfl_xor_sync(0xffffffffu, dense0, offset);
      kept0 += __shfl_xor_sync(0xffffffffu, kept0, offset);
      dense1 += __shfl_xor_sync(0xffffffffu, dense1, offset);
      kept1 += __shfl_xor_sync(0xffffffffu, kept1, offset);
    }
    if (lane == 0) {
      // An all-zero token keeps nothing of weight: scale 1, as in the reference.
      scale[r0] = kept0 > 0.f ? sqrtf(dense0 / kept0) : 1.f;
      scale[r1] = kept1 > 0.f ? sqrtf(dense1 / kept1) : 1.f;
    }
  }
}

constexpr int kEpilogueThreads = 256;
constexpr int kEpilogueItems = 4;  // independent 16-byte loads in flight per thread

template <bool kBf16, bool kScale, bool kBias, bool kBiasFloat>
__global__ void __launch_bounds__(kEpilogueThreads) scale_bias_epilogue_kernel(
    const uint4* gemm, uint4* y, int64_t total_vecs, int64_t vecs_per_row,
    const float* __restrict__ scale, const void* __restrict__ bias) {
  const int64_t base = int64_t(blockIdx.x) * kEpilogueThreads * kEpilogueItems + threadIdx.x;
  uint4 in[kEpilogueItems];
#pragma unroll
  for (int k = 0; k < kEpilogueItems; ++k) {
    const int64_t i = base + k * kEpilogueThreads;
    if (i < total_vecs) in[k] = gemm[i];
  }
#pragma unroll
  for (int k = 0; k < kEpilogueItems; ++k) {
    const int64_t i = base + k * kEpilogueThreads;
    if (i >= total_vecs) break;
    const int64_t row = i / vecs_per_row;
    const int64_t col0 = (i - row * vecs_per_row) * 8;
    const float s = kScale ? scale[row] : 1.f;
    uint32_t words[4] = {in[k].x, in[k].y, in[k].z, in[k].w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      uint32_t packed = 0;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // Same fp32 rounding steps as the reference: (y * s) + b, then one cast.
        float v = bits_to_float<kBf16>((words[w] >> (16 * h)) & 0xffffu);
        if (kScale) v = __fmul_rn(v, s);
        if (kBias) {
          const int64_t col = col0 + 2 * w + h;
          const float b = kBiasFloat
              ? static_cast<const float*>(bias)[col]
              : bits_to_float<kBf16>(static_cast<const uint16_t*>(bias)[col]);
          v = __fadd_rn(v, b);
        }
        packed |= float_to_bits<kBf16>(v) << (16 * h);
      }
      words[w] = packed;
    }
    y[i] = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

template <bool kBf16, bool kScale, bool kBias, bool kBiasFloat>
void launch_epilogue_variant(const void* gemm, void* y, int64_t rows, int64_t cols,
                             const float* scale, const void* bias, cudaStream_t stream) {
  const int64_t vecs_per_row = cols / 8;
  const int64_t total = rows * vecs_per_row;
  const int64_t per_block = int64_t(kEpilogueThreads) * kEpilogueItems;
  const int64_t blocks = (total + per_block - 1) / per_block;
  require(blocks <= 0x7fffffff, "epilogue: output too large for one launch");
  scale_bias_epilogue_kernel<kBf16, kScale, kBias, kBiasFloat>
      <<<static_cast<unsigned>(blocks), kEpilogueThreads, 0, stream>>>(
          static_cast<const uint4*>(gemm), static_cast<uint4*>(y), total, vecs_per_row, scale,
          bias);
}

template <bool kBf16>
void launch_epilogue_dtype(const void* gemm, void* y, int64_t rows, int64_t cols,
                           const float* scale, const void* bias, bool bias_is_float,
                           cudaStream_t stream) {
  const bool has_scale = scale != nullptr;
  const bool has_bias = bias != nullptr;
  if (has_scale) {
    if (!has_bias) return launch_epilogue_variant<kBf16, true, false, false>(gemm, y, rows, cols, scale, bias, stream);
    if (bias_is_float) return launch_epilogue_variant<kBf16, true, true, true>(gemm, y, rows, cols, scale, bias, stream);
    return launch_epilogue_variant<kBf16, true, true, false>(gemm, y, rows, cols, scale, bias, stream);
  }
  if (!has_bias) return launch_epilogue_variant<kBf16, false, false, false>(gemm, y, rows, cols, scale, bias, stream);
  if (bias_is_float) return launch_epilogue_variant<kBf16, false, true, true>(gemm, y, rows, cols, scale, bias, stream);
  return launch_epilogue_variant<kBf16, false, true, false>(gemm, y, rows, cols, scale, bias, stream);
}

}  // namespace

void launch_sparsify_compress(const void* x, int64_t rows, int64_t padded_rows, int64_t cols,
                              int64_t ld_x, bool is_bf16, void* compressed, float* scale,
                              cudaStream_t stream) {
  require(padded_rows % 64 == 0 && padded_rows >= rows, "sparsify: bad padded row count");
  require(cols % 32 == 0, "sparsify: columns must be a multiple of 32");
  auto* values = static_cast<uint16_t*>(compressed);
  auto* meta = static_cast<uint8_t*>(compressed) + padded_rows * cols;  // after rows*cols/2 values
  const dim3 block(32, 8);
  const int64_t blocks = padded_rows / 16;
  require(blocks <= 0x7fffffff, "sparsify: too many rows for one launch");
  if (is_bf16) {
    sparsify_compress_kernel<true><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
        static_cast<const uint16_t*>(x), rows, cols, ld_x, values, meta, scale);
  } else {
    sparsify_compress_kernel<false><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
        static_cast<const uint16_t*>(x), rows, cols, ld_x, values, meta, scale);
  }
}

void launch_scale_bias_epilogue(const void* gemm, void* y, int64_t rows, int64_t cols,
                                const float* scale, const void* bias, bool bias_is_float,
                                bool is_bf16, cudaStream_t stream) {
  require(cols % 8 == 0, "epilogue: columns must be a multiple of 8");
  if (rows == 0) return;
  if (is_bf16) {
    launch_epilogue_dtype<true>(gemm, y, rows, cols, scale, bias, bias_is_float, stream);
  } else {
    launch_epilogue_dtype<false>(gemm, y, rows, cols, scale, bias, bias_is_float, stream);
  }
}

}  // namespace rt_lynx
