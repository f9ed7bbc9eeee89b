// RT-Lynx memory-bound kernels: fused 2:4 sparsify + cuSPARSELt compression + norm scale (folded
// into the values, or returned), and the scale/bias epilogue kept for the structured-A fallback.
//
// Compressed layout (cuSPARSELt 0.8, 16-bit types, rows padded to 64, checked at start-up
// against torch._cslt_compress): values = rows * cols/2 elements, row-major, the two kept
// entries of each group of 4 in column order; then rows*cols/8 metadata bytes. The 4-bit code of
// (row r, group g) is i0 | i1 << 2 (kept positions, i0 < i1); it sits in byte
//   (r/64)*8*cols + (g/8)*256 + ((r%64)/16)*64 + (r%8)*8 + 2*(g%4) + (g%8)/4,
// low nibble for r%16 < 8, high nibble for row r+8.
#include "lynx_kernels.h"
#include "sm90_metadata_layout.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

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

// Block = 8 warps over one 16-row group (rows r and r+8 share metadata bytes, so a warp always
// owns a row pair). kSplit warps share a row pair and split its 32-column chunks, so small M
// still fills the chip (8 / kSplit row pairs per block). Row norms reduce with shuffles, then
// across the kSplit warps through shared memory.
// kFold: the scale s = ||x|| / ||x_kept|| is needed before any value is written, so a first
// pass only reads (norms), and a second pass re-reads the row pair (mostly from L2) and writes
// round(s * x_kept). Without kFold one pass writes the unscaled values (and the scale, if asked).
template <bool kBf16>
__device__ __forceinline__ uint32_t scale_pair(uint32_t pair, float s) {
  // One fp32 multiply and one rounding per value: the same as (x.float() * s).to(dtype).
  const float lo = __fmul_rn(bits_to_float<kBf16>(pair & 0xffffu), s);
  const float hi = __fmul_rn(bits_to_float<kBf16>(pair >> 16), s);
  return float_to_bits<kBf16>(lo) | (float_to_bits<kBf16>(hi) << 16);
}

template <bool kBf16>
__device__ __forceinline__ void load_chunk(const uint4* row, bool valid, int64_t c, uint4 (&in)[4]) {
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int i = 0; i < 4; ++i) in[i] = valid ? __ldg(row + c * 4 + i) : zero;
}

// kCutlassBlockK: 0 writes cuSPARSELt's metadata layout, 64 or 128 CUTLASS's sm90 layout with
// that metadata atom (sm90_metadata_layout.h).
template <bool kBf16, bool kFold, int kSplit, int kCutlassBlockK>
__global__ void __launch_bounds__(256) sparsify_compress_kernel(
    const uint16_t* __restrict__ x, int64_t rows, int64_t padded_rows, int64_t cols, int64_t ld_x,
    uint16_t* __restrict__ values, uint8_t* __restrict__ meta, float* __restrict__ scale) {
  constexpr int kPairsPerBlock = 8 / kSplit;
  const int lane = threadIdx.x;
  const int warp = threadIdx.y;                 // 0..7
  const int pair_in_block = warp / kSplit;
  const int split = warp % kSplit;
  const int64_t group = int64_t(blockIdx.x) / kSplit;          // 16-row group
  const int row_in_8 = int(blockIdx.x % kSplit) * kPairsPerBlock + pair_in_block;
  const int64_t block_row = group * 16;
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
  const int64_t first = int64_t(split) * 32 + lane;
  constexpr int64_t kStride = 32 * kSplit;

  float dense0 = 0.f, kept0 = 0.f, dense1 = 0.f, kept1 = 0.f;
  if constexpr (kFold) {
    for (int64_t c = first; c < chunks; c += kStride) {
      uint4 in0[4], in1[4], out[2];
      uint32_t codes[8];
      load_chunk<kBf16>(x0, has_r0, c, in0);
      load_chunk<kBf16>(x1, has_r1, c, in1);
      select_chunk<kBf16>(in0, out, codes, dense0, kept0);
      select_chunk<kBf16>(in1, out, codes, dense1, kept1);
    }
  }
  const bool need_norms = kFold || scale != nullptr;
  float s0 = 1.f, s1 = 1.f;
  if (need_norms && kFold) {
    // Reduce before the writing pass.
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      dense0 += __shfl_xor_sync(0xffffffffu, dense0, offset);
      kept0 += __shfl_xor_sync(0xffffffffu, kept0, offset);
      dense1 += __shfl_xor_sync(0xffffffffu, dense1, offset);
      kept1 += __shfl_xor_sync(0xffffffffu, kept1, offset);
    }
    if constexpr (kSplit > 1) {
      __shared__ float partial[8][4];
      if (lane == 0) {
        partial[warp][0] = dense0; partial[warp][1] = kept0;
        partial[warp][2] = dense1; partial[warp][3] = kept1;
      }
      __syncthreads();
      dense0 = kept0 = dense1 = kept1 = 0.f;
#pragma unroll
      for (int w = 0; w < kSplit; ++w) {  // same order in every warp: identical sums
        const int src = pair_in_block * kSplit + w;
        dense0 += partial[src][0]; kept0 += partial[src][1];
        dense1 += partial[src][2]; kept1 += partial[src][3];
      }
    }
    // An all-zero token keeps nothing of weight: scale 1, as in the reference.
    s0 = kept0 > 0.f ? sqrtf(dense0 / kept0) : 1.f;
    s1 = kept1 > 0.f ? sqrtf(dense1 / kept1) : 1.f;
    if (scale != nullptr && split == 0 && lane == 0) {
      scale[r0] = s0;
      scale[r1] = s1;
    }
  }

  float d0 = 0.f, k0 = 0.f, d1 = 0.f, k1 = 0.f;
  for (int64_t c = first; c < chunks; c += kStride) {
    uint4 in0[4], in1[4];
    load_chunk<kBf16>(x0, has_r0, c, in0);
    load_chunk<kBf16>(x1, has_r1, c, in1);
    uint4 out0[2], out1[2];
    uint32_t codes0[8], codes1[8];
    select_chunk<kBf16>(in0, out0, codes0, d0, k0);
    select_chunk<kBf16>(in1, out1, codes1, d1, k1);
    if constexpr (kFold) {
      out0[0] = make_uint4(scale_pair<kBf16>(out0[0].x, s0), scale_pair<kBf16>(out0[0].y, s0),
                           scale_pair<kBf16>(out0[0].z, s0), scale_pair<kBf16>(out0[0].w, s0));
      out0[1] = make_uint4(scale_pair<kBf16>(out0[1].x, s0), scale_pair<kBf16>(out0[1].y, s0),
                           scale_pair<kBf16>(out0[1].z, s0), scale_pair<kBf16>(out0[1].w, s0));
      out1[0] = make_uint4(scale_pair<kBf16>(out1[0].x, s1), scale_pair<kBf16>(out1[0].y, s1),
                           scale_pair<kBf16>(out1[0].z, s1), scale_pair<kBf16>(out1[0].w, s1));
      out1[1] = make_uint4(scale_pair<kBf16>(out1[1].x, s1), scale_pair<kBf16>(out1[1].y, s1),
                           scale_pair<kBf16>(out1[1].z, s1), scale_pair<kBf16>(out1[1].w, s1));
    }
    v0[c * 2] = out0[0];
    v0[c * 2 + 1] = out0[1];
    v1[c * 2] = out1[0];
    v1[c * 2 + 1] = out1[1];
    if constexpr (kCutlassBlockK == 0) {
      uint64_t word = 0;
#pragma unroll
      for (int g = 0; g < 8; ++g) {
        const int byte_pos = 2 * (g % 4) + g / 4;
        word |= uint64_t(codes0[g] | (codes1[g] << 4)) << (8 * byte_pos);
      }
      *reinterpret_cast<uint64_t*>(meta_row + c * 256) = word;
    } else {
      // Columns 0-15 of rows r0 and r0 + 8 are four neighbouring bytes; columns 16-31 the same,
      // kCutlassBlockK bytes further on.
      const int64_t base = sm90_metadata_byte_16bit(r0, c * 32, padded_rows, kCutlassBlockK);
      uint32_t half_words[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int g = 4 * h;
        half_words[h] = (codes0[g] | (codes0[g + 1] << 4)) | ((codes0[g + 2] | (codes0[g + 3] << 4)) << 8) |
                        ((codes1[g] | (codes1[g + 1] << 4)) << 16) | ((codes1[g + 2] | (codes1[g + 3] << 4)) << 24);
      }
      *reinterpret_cast<uint32_t*>(meta + base) = half_words[0];
      *reinterpret_cast<uint32_t*>(meta + base + kCutlassBlockK) = half_words[1];
    }
  }

  if (!kFold && scale != nullptr) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      d0 += __shfl_xor_sync(0xffffffffu, d0, offset);
      k0 += __shfl_xor_sync(0xffffffffu, k0, offset);
      d1 += __shfl_xor_sync(0xffffffffu, d1, offset);
      k1 += __shfl_xor_sync(0xffffffffu, k1, offset);
    }
    if constexpr (kSplit > 1) {
      __shared__ float partial_u[8][4];
      if (lane == 0) {
        partial_u[warp][0] = d0; partial_u[warp][1] = k0;
        partial_u[warp][2] = d1; partial_u[warp][3] = k1;
      }
      __syncthreads();
      d0 = k0 = d1 = k1 = 0.f;
#pragma unroll
      for (int w = 0; w < kSplit; ++w) {
        const int src = pair_in_block * kSplit + w;
        d0 += partial_u[src][0]; k0 += partial_u[src][1];
        d1 += partial_u[src][2]; k1 += partial_u[src][3];
      }
    }
    if (split == 0 && lane == 0) {
      scale[r0] = k0 > 0.f ? sqrtf(d0 / k0) : 1.f;
      scale[r1] = k1 > 0.f ? sqrtf(d1 / k1) : 1.f;
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

namespace {

template <bool kBf16, bool kFold, int kSplit, int kCutlassBlockK>
void launch_sparsify_variant(const void* x, int64_t rows, int64_t padded_rows, int64_t cols,
                             int64_t ld_x, uint16_t* values, uint8_t* meta, float* scale,
                             cudaStream_t stream) {
  const int64_t blocks = padded_rows / 16 * kSplit;
  require(blocks <= 0x7fffffff, "sparsify: too many rows for one launch");
  sparsify_compress_kernel<kBf16, kFold, kSplit, kCutlassBlockK>
      <<<static_cast<unsigned>(blocks), dim3(32, 8), 0, stream>>>(
          static_cast<const uint16_t*>(x), rows, padded_rows, cols, ld_x, values, meta, scale);
}

template <bool kBf16, bool kFold, int kCutlassBlockK>
void launch_sparsify_split(int split, const void* x, int64_t rows, int64_t padded_rows,
                           int64_t cols, int64_t ld_x, uint16_t* values, uint8_t* meta,
                           float* scale, cudaStream_t stream) {
  switch (split) {
    case 1: return launch_sparsify_variant<kBf16, kFold, 1, kCutlassBlockK>(x, rows, padded_rows, cols, ld_x, values, meta, scale, stream);
    case 2: return launch_sparsify_variant<kBf16, kFold, 2, kCutlassBlockK>(x, rows, padded_rows, cols, ld_x, values, meta, scale, stream);
    case 4: return launch_sparsify_variant<kBf16, kFold, 4, kCutlassBlockK>(x, rows, padded_rows, cols, ld_x, values, meta, scale, stream);
    default: return launch_sparsify_variant<kBf16, kFold, 8, kCutlassBlockK>(x, rows, padded_rows, cols, ld_x, values, meta, scale, stream);
  }
}

template <bool kBf16>
void launch_sparsify_layout(int layout, bool fold_scale, int split, const void* x, int64_t rows,
                            int64_t padded_rows, int64_t cols, int64_t ld_x, uint16_t* values,
                            uint8_t* meta, float* scale, cudaStream_t stream) {
  switch (layout) {
    case kMetadataCusparselt:
      if (fold_scale) return launch_sparsify_split<kBf16, true, 0>(split, x, rows, padded_rows, cols, ld_x, values, meta, scale, stream);
      return launch_sparsify_split<kBf16, false, 0>(split, x, rows, padded_rows, cols, ld_x, values, meta, scale, stream);
    case kMetadataSm90Block64:
      return launch_sparsify_split<kBf16, false, 64>(split, x, rows, padded_rows, cols, ld_x, values, meta, scale, stream);
    default:
      return launch_sparsify_split<kBf16, false, 128>(split, x, rows, padded_rows, cols, ld_x, values, meta, scale, stream);
  }
}

struct DeviceShape {
  int64_t sms = 132, l2_bytes = 50 << 20;
};

DeviceShape device_shape() {
  DeviceShape shape;
  int device = 0, sms = 0, l2 = 0;
  if (cudaGetDevice(&device) == cudaSuccess &&
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess &&
      cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device) == cudaSuccess) {
    shape.sms = sms;
    shape.l2_bytes = l2;
  }
  return shape;
}

}  // namespace

int sparsify_split_for(int64_t padded_rows, int64_t cols) {
  // Two goals: at least one block per SM (small M), and the rows that resident blocks (2 per SM
  // at 128 registers) read in the norm pass still in half the L2 when the write pass re-reads
  // them (large K). A warp covers 32 chunks of 32 columns per step: keep half its lanes busy.
  // (H100: 4 blocks per SM as the goal made M=4096..8192, K=3072 7-30% slower than split 1.)
  const DeviceShape device = device_shape();
  const int64_t groups = padded_rows / 16;
  const int64_t chunks = cols / 32;
  const int64_t group_bytes = 16 * cols * 2;  // a 16-row group, split over `split` blocks
  int split = 1;
  while (split < 8 && chunks / (2 * split) >= 16 &&
         (groups * split < device.sms ||
          2 * device.sms * group_bytes / split > device.l2_bytes / 2)) {
    split *= 2;
  }
  return split;
}

void launch_sparsify_compress(const void* x, int64_t rows, int64_t padded_rows, int64_t cols,
                              int64_t ld_x, bool is_bf16, bool fold_scale, void* compressed,
                              float* scale, cudaStream_t stream, int split, int metadata_layout) {
  require(padded_rows % 64 == 0 && padded_rows >= rows, "sparsify: bad padded row count");
  require(cols % 32 == 0, "sparsify: columns must be a multiple of 32");
  require(metadata_layout == kMetadataCusparselt || metadata_layout == kMetadataSm90Block64 ||
              metadata_layout == kMetadataSm90Block128,
          "sparsify: unknown metadata layout ", metadata_layout);
  require(metadata_layout == kMetadataCusparselt || !fold_scale,
          "sparsify: the sm90 GEMM applies the scale in its epilogue; fold_scale is for cuSPARSELt");
  require(metadata_layout == kMetadataCusparselt || cols % metadata_layout == 0,
          "sparsify: columns must be a multiple of the metadata block ", metadata_layout);
  auto* values = static_cast<uint16_t*>(compressed);
  auto* meta = static_cast<uint8_t*>(compressed) + padded_rows * cols;  // after rows*cols/2 values
  if (split <= 0) split = sparsify_split_for(padded_rows, cols);
  require(split == 1 || split == 2 || split == 4 || split == 8, "sparsify: split must be 1, 2, 4 or 8");
  if (is_bf16) {
    launch_sparsify_layout<true>(metadata_layout, fold_scale, split, x, rows, padded_rows, cols, ld_x, values, meta, scale, stream);
  } else {
    launch_sparsify_layout<false>(metadata_layout, fold_scale, split, x, rows, padded_rows, cols, ld_x, values, meta, scale, stream);
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

// ---------------------------------------------------------------------------------------------
// fp8 e4m3 path. Compressed layout (cuSPARSELt 0.8, e4m3, rows padded to 64; checked at start-up
// against cuSPARSELt's own compression): values = rows * cols/2 bytes, row-major, kept entries in
// column order; then rows*cols/8 metadata bytes. For row r and b = column/8 (groups 2b, 2b+1),
//   byte (r/64)*8*cols + (b/8)*512 + ((r%64)/16)*128 + (r%8)*16 + 4*(b%4) + 2*((b%8)/4) + (r%16)/8
// holds code(2b) | code(2b+1) << 4. So rows r and r+8 over 64 columns fill one 16-byte word.
namespace {

__device__ __forceinline__ uint32_t max_abs_bits(uint4 a, uint4 b) {
  // |x| bits of 16-bit floats compare like |x| (non-NaN); max over 16 values.
  const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    m = max(m, max(w[i] & 0x7fffu, (w[i] >> 16) & 0x7fffu));
  }
  return m;
}

// Two kept 16-bit values -> two e4m3 bytes: one fp32 multiply and one round-to-nearest-even
// conversion each, as (x.float() * inv).to(float8_e4m3fn) does (|x * inv| <= 448, no overflow).
template <bool kBf16>
__device__ __forceinline__ uint32_t quantize_pair(uint32_t pair, float inv) {
  float2 v;
  v.x = __fmul_rn(bits_to_float<kBf16>(pair & 0xffffu), inv);
  v.y = __fmul_rn(bits_to_float<kBf16>(pair >> 16), inv);
  return static_cast<uint32_t>(__nv_cvt_float2_to_fp8x2(v, __NV_SATFINITE, __NV_E4M3));
}

template <bool kBf16>
__device__ __forceinline__ uint4 quantize_half_chunk(const uint4 (&kept)[2], float inv) {
  // 16 kept values (one 32-column half) -> 16 bytes.
  const uint32_t p[8] = {kept[0].x, kept[0].y, kept[0].z, kept[0].w,
                         kept[1].x, kept[1].y, kept[1].z, kept[1].w};
  uint32_t q[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    q[i] = quantize_pair<kBf16>(p[2 * i], inv) | (quantize_pair<kBf16>(p[2 * i + 1], inv) << 16);
  }
  return make_uint4(q[0], q[1], q[2], q[3]);
}

// Same grid as sparsify_compress_kernel (8 warps over a 16-row group, a warp per row pair r,
// r+8, kSplit warps sharing a row pair), but a lane step covers 64 columns: one 16-byte metadata
// word for the pair and 32 value bytes per row.
// kCutlass: CUTLASS's sm90 e4m3 metadata layout (atom 64 x 128, sm90_metadata_layout.h) instead
// of cuSPARSELt's.
template <bool kBf16, int kSplit, bool kCutlass>
__global__ void __launch_bounds__(256) sparsify_fp8_kernel(
    const uint16_t* __restrict__ x, int64_t rows, int64_t padded_rows, int64_t cols, int64_t ld_x,
    uint8_t* __restrict__ values, uint8_t* __restrict__ meta, float* __restrict__ token_scale,
    bool compensate) {
  constexpr int kPairsPerBlock = 8 / kSplit;
  const int lane = threadIdx.x;
  const int warp = threadIdx.y;
  const int pair_in_block = warp / kSplit;
  const int split = warp % kSplit;
  const int64_t group = int64_t(blockIdx.x) / kSplit;
  const int row_in_8 = int(blockIdx.x % kSplit) * kPairsPerBlock + pair_in_block;
  const int64_t block_row = group * 16;
  const int64_t r0 = block_row + row_in_8;
  const int64_t r1 = r0 + 8;
  const bool has_r0 = r0 < rows;
  const bool has_r1 = r1 < rows;
  const int64_t chunks = cols / 64;
  const uint4* x0 = reinterpret_cast<const uint4*>(x + (has_r0 ? r0 : 0) * ld_x);
  const uint4* x1 = reinterpret_cast<const uint4*>(x + (has_r1 ? r1 : 0) * ld_x);
  uint4* v0 = reinterpret_cast<uint4*>(values + r0 * (cols / 2));
  uint4* v1 = reinterpret_cast<uint4*>(values + r1 * (cols / 2));
  uint8_t* meta_row =
      meta + (block_row / 64) * 8 * cols + ((block_row % 64) / 16) * 128 + row_in_8 * 16;
  const int64_t first = int64_t(split) * 32 + lane;
  constexpr int64_t kStride = 32 * kSplit;

  // Pass 1: norms and max |kept| per row.
  float dense0 = 0.f, kept0 = 0.f, dense1 = 0.f, kept1 = 0.f;
  uint32_t amax0 = 0, amax1 = 0;
  for (int64_t c = first; c < chunks; c += kStride) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 in0[4], in1[4], out0[2], out1[2];
      uint32_t codes[8];
      load_chunk<kBf16>(x0, has_r0, 2 * c + h, in0);
      load_chunk<kBf16>(x1, has_r1, 2 * c + h, in1);
      select_chunk<kBf16>(in0, out0, codes, dense0, kept0);
      select_chunk<kBf16>(in1, out1, codes, dense1, kept1);
      amax0 = max(amax0, max_abs_bits(out0[0], out0[1]));
      amax1 = max(amax1, max_abs_bits(out1[0], out1[1]));
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    dense0 += __shfl_xor_sync(0xffffffffu, dense0, offset);
    kept0 += __shfl_xor_sync(0xffffffffu, kept0, offset);
    dense1 += __shfl_xor_sync(0xffffffffu, dense1, offset);
    kept1 += __shfl_xor_sync(0xffffffffu, kept1, offset);
  }
  amax0 = __reduce_max_sync(0xffffffffu, amax0);
  amax1 = __reduce_max_sync(0xffffffffu, amax1);
  if constexpr (kSplit > 1) {
    __shared__ float partial[8][4];
    __shared__ uint32_t partial_max[8][2];
    if (lane == 0) {
      partial[warp][0] = dense0; partial[warp][1] = kept0;
      partial[warp][2] = dense1; partial[warp][3] = kept1;
      partial_max[warp][0] = amax0; partial_max[warp][1] = amax1;
    }
    __syncthreads();
    dense0 = kept0 = dense1 = kept1 = 0.f;
    amax0 = amax1 = 0;
#pragma unroll
    for (int w = 0; w < kSplit; ++w) {  // same order in every warp: identical sums
      const int src = pair_in_block * kSplit + w;
      dense0 += partial[src][0]; kept0 += partial[src][1];
      dense1 += partial[src][2]; kept1 += partial[src][3];
      amax0 = max(amax0, partial_max[src][0]); amax1 = max(amax1, partial_max[src][1]);
    }
  }
  const float m0 = bits_to_float<kBf16>(amax0), m1 = bits_to_float<kBf16>(amax1);
  // 448 / max|kept| maps the largest kept value onto e4m3's largest finite value; the
  // compensation scale cancels in q and only enters the dequantisation scale.
  const float inv0 = m0 > 0.f ? __fdiv_rn(448.f, m0) : 0.f;
  const float inv1 = m1 > 0.f ? __fdiv_rn(448.f, m1) : 0.f;
  if (split == 0 && lane == 0) {
    const float s0 = compensate && kept0 > 0.f ? sqrtf(dense0 / kept0) : 1.f;
    const float s1 = compensate && kept1 > 0.f ? sqrtf(dense1 / kept1) : 1.f;
    token_scale[r0] = __fdiv_rn(__fmul_rn(s0, m0), 448.f);
    token_scale[r1] = __fdiv_rn(__fmul_rn(s1, m1), 448.f);
  }

  // Pass 2: quantised values and metadata.
  float unused_d = 0.f, unused_k = 0.f;
  for (int64_t c = first; c < chunks; c += kStride) {
    uint32_t codes0[16], codes1[16];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 in0[4], in1[4], out0[2], out1[2];
      uint32_t c0[8], c1[8];
      load_chunk<kBf16>(x0, has_r0, 2 * c + h, in0);
      load_chunk<kBf16>(x1, has_r1, 2 * c + h, in1);
      select_chunk<kBf16>(in0, out0, c0, unused_d, unused_k);
      select_chunk<kBf16>(in1, out1, c1, unused_d, unused_k);
      v0[c * 2 + h] = quantize_half_chunk<kBf16>(out0, inv0);
      v1[c * 2 + h] = quantize_half_chunk<kBf16>(out1, inv1);
#pragma unroll
      for (int g = 0; g < 8; ++g) {
        codes0[8 * h + g] = c0[g];
        codes1[8 * h + g] = c1[g];
      }
    }
    if constexpr (kCutlass) {
      // Each row's 64 columns are 8 neighbouring bytes, byte j = groups 2j, 2j + 1.
      uint64_t row_words[2] = {0, 0};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        row_words[0] |= uint64_t(codes0[2 * j] | (codes0[2 * j + 1] << 4)) << (8 * j);
        row_words[1] |= uint64_t(codes1[2 * j] | (codes1[2 * j + 1] << 4)) << (8 * j);
      }
      *reinterpret_cast<uint64_t*>(meta + sm90_metadata_byte_8bit(r0, c * 64, padded_rows, 128)) = row_words[0];
      *reinterpret_cast<uint64_t*>(meta + sm90_metadata_byte_8bit(r1, c * 64, padded_rows, 128)) = row_words[1];
    } else {
      // Word w, byte j: b = w + 4*(j/2), row r (j even) or r+8 (j odd).
      uint32_t words[4];
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const int b_lo = w, b_hi = w + 4;
        words[w] = (codes0[2 * b_lo] | (codes0[2 * b_lo + 1] << 4)) |
                   ((codes1[2 * b_lo] | (codes1[2 * b_lo + 1] << 4)) << 8) |
                   ((codes0[2 * b_hi] | (codes0[2 * b_hi + 1] << 4)) << 16) |
                   ((codes1[2 * b_hi] | (codes1[2 * b_hi + 1] << 4)) << 24);
      }
      *reinterpret_cast<uint4*>(meta_row + c * 512) = make_uint4(words[0], words[1], words[2], words[3]);
    }
  }
}

template <bool kBf16, int kSplit, bool kCutlass>
void launch_fp8_variant(const void* x, int64_t rows, int64_t padded_rows, int64_t cols,
                        int64_t ld_x, uint8_t* values, uint8_t* meta, float* token_scale,
                        bool compensate, cudaStream_t stream) {
  const int64_t blocks = padded_rows / 16 * kSplit;
  require(blocks <= 0x7fffffff, "sparsify_fp8: too many rows for one launch");
  sparsify_fp8_kernel<kBf16, kSplit, kCutlass><<<static_cast<unsigned>(blocks), dim3(32, 8), 0, stream>>>(
      static_cast<const uint16_t*>(x), rows, padded_rows, cols, ld_x, values, meta, token_scale, compensate);
}

template <bool kBf16, bool kCutlass>
void launch_fp8_split(int split, const void* x, int64_t rows, int64_t padded_rows, int64_t cols,
                      int64_t ld_x, uint8_t* values, uint8_t* meta, float* token_scale,
                      bool compensate, cudaStream_t stream) {
  switch (split) {
    case 1: return launch_fp8_variant<kBf16, 1, kCutlass>(x, rows, padded_rows, cols, ld_x, values, meta, token_scale, compensate, stream);
    case 2: return launch_fp8_variant<kBf16, 2, kCutlass>(x, rows, padded_rows, cols, ld_x, values, meta, token_scale, compensate, stream);
    case 4: return launch_fp8_variant<kBf16, 4, kCutlass>(x, rows, padded_rows, cols, ld_x, values, meta, token_scale, compensate, stream);
    default: return launch_fp8_variant<kBf16, 8, kCutlass>(x, rows, padded_rows, cols, ld_x, values, meta, token_scale, compensate, stream);
  }
}

template <bool kOutBf16, bool kBias, bool kBiasFloat>
__global__ void __launch_bounds__(kEpilogueThreads) fp8_epilogue_kernel(
    const uint4* d, uint4* y, int64_t total_vecs, int64_t vecs_per_row,
    const float* __restrict__ token_scale, const float* __restrict__ channel_scale,
    const void* __restrict__ bias) {
  const int64_t base = int64_t(blockIdx.x) * kEpilogueThreads * kEpilogueItems + threadIdx.x;
  uint4 in[kEpilogueItems];
#pragma unroll
  for (int k = 0; k < kEpilogueItems; ++k) {
    const int64_t i = base + k * kEpilogueThreads;
    if (i < total_vecs) in[k] = d[i];
  }
#pragma unroll
  for (int k = 0; k < kEpilogueItems; ++k) {
    const int64_t i = base + k * kEpilogueThreads;
    if (i >= total_vecs) break;
    const int64_t row = i / vecs_per_row;
    const int64_t col0 = (i - row * vecs_per_row) * 8;
    const float a = token_scale[row];
    const float4 w_lo = *reinterpret_cast<const float4*>(channel_scale + col0);
    const float4 w_hi = *reinterpret_cast<const float4*>(channel_scale + col0 + 4);
    const float ws[8] = {w_lo.x, w_lo.y, w_lo.z, w_lo.w, w_hi.x, w_hi.y, w_hi.z, w_hi.w};
    const uint32_t words[4] = {in[k].x, in[k].y, in[k].z, in[k].w};
    uint32_t packed[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      packed[w] = 0;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = 2 * w + h;
        // (d * a) * w_scale + b in fp32, one rounding to the output dtype (reference order).
        float v = __fmul_rn(__fmul_rn(bits_to_float<true>((words[w] >> (16 * h)) & 0xffffu), a), ws[j]);
        if (kBias) {
          const float b = kBiasFloat
              ? static_cast<const float*>(bias)[col0 + j]
              : bits_to_float<kOutBf16>(static_cast<const uint16_t*>(bias)[col0 + j]);
          v = __fadd_rn(v, b);
        }
        packed[w] |= float_to_bits<kOutBf16>(v) << (16 * h);
      }
    }
    y[i] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  }
}

template <bool kOutBf16, bool kBias, bool kBiasFloat>
void launch_fp8_epilogue_variant(const void* d, void* y, int64_t rows, int64_t cols,
                                 const float* token_scale, const float* channel_scale,
                                 const void* bias, cudaStream_t stream) {
  const int64_t vecs_per_row = cols / 8;
  const int64_t total = rows * vecs_per_row;
  const int64_t per_block = int64_t(kEpilogueThreads) * kEpilogueItems;
  const int64_t blocks = (total + per_block - 1) / per_block;
  require(blocks <= 0x7fffffff, "fp8 epilogue: output too large for one launch");
  fp8_epilogue_kernel<kOutBf16, kBias, kBiasFloat>
      <<<static_cast<unsigned>(blocks), kEpilogueThreads, 0, stream>>>(
          static_cast<const uint4*>(d), static_cast<uint4*>(y), total, vecs_per_row, token_scale,
          channel_scale, bias);
}

template <bool kOutBf16>
void launch_fp8_epilogue_dtype(const void* d, void* y, int64_t rows, int64_t cols,
                               const float* token_scale, const float* channel_scale,
                               const void* bias, bool bias_is_float, cudaStream_t stream) {
  if (bias == nullptr) return launch_fp8_epilogue_variant<kOutBf16, false, false>(d, y, rows, cols, token_scale, channel_scale, bias, stream);
  if (bias_is_float) return launch_fp8_epilogue_variant<kOutBf16, true, true>(d, y, rows, cols, token_scale, channel_scale, bias, stream);
  return launch_fp8_epilogue_variant<kOutBf16, true, false>(d, y, rows, cols, token_scale, channel_scale, bias, stream);
}

}  // namespace

int sparsify_fp8_split_for(int64_t padded_rows, int64_t cols) {
  // As sparsify_split_for, with 64-column lane steps.
  const DeviceShape device = device_shape();
  const int64_t groups = padded_rows / 16;
  const int64_t chunks = cols / 64;
  const int64_t group_bytes = 16 * cols * 2;
  int split = 1;
  while (split < 8 && chunks / (2 * split) >= 8 &&
         (groups * split < device.sms ||
          2 * device.sms * group_bytes / split > device.l2_bytes / 2)) {
    split *= 2;
  }
  return split;
}

void launch_sparsify_fp8(const void* x, int64_t rows, int64_t padded_rows, int64_t cols,
                         int64_t ld_x, bool is_bf16, bool compensate, void* compressed,
                         float* token_scale, cudaStream_t stream, int split, int metadata_layout) {
  require(padded_rows % 64 == 0 && padded_rows >= rows, "sparsify_fp8: bad padded row count");
  require(cols % 64 == 0, "sparsify_fp8: columns must be a multiple of 64");
  require(metadata_layout == kMetadataCusparselt || metadata_layout == kMetadataSm90Block128,
          "sparsify_fp8: unknown metadata layout ", metadata_layout);
  const bool cutlass = metadata_layout == kMetadataSm90Block128;
  require(!cutlass || cols % 128 == 0, "sparsify_fp8: columns must be a multiple of 128 for the sm90 GEMM");
  require(token_scale != nullptr, "sparsify_fp8: token_scale is required");
  auto* values = static_cast<uint8_t*>(compressed);
  auto* meta = values + padded_rows * cols / 2;
  if (split <= 0) split = sparsify_fp8_split_for(padded_rows, cols);
  require(split == 1 || split == 2 || split == 4 || split == 8, "sparsify_fp8: split must be 1, 2, 4 or 8");
  if (is_bf16) {
    if (cutlass) launch_fp8_split<true, true>(split, x, rows, padded_rows, cols, ld_x, values, meta, token_scale, compensate, stream);
    else launch_fp8_split<true, false>(split, x, rows, padded_rows, cols, ld_x, values, meta, token_scale, compensate, stream);
  } else {
    if (cutlass) launch_fp8_split<false, true>(split, x, rows, padded_rows, cols, ld_x, values, meta, token_scale, compensate, stream);
    else launch_fp8_split<false, false>(split, x, rows, padded_rows, cols, ld_x, values, meta, token_scale, compensate, stream);
  }
}

void launch_fp8_epilogue(const void* d, void* y, int64_t rows, int64_t cols,
                         const float* token_scale, const float* channel_scale, const void* bias,
                         bool bias_is_float, bool out_bf16, cudaStream_t stream) {
  require(cols % 8 == 0, "fp8 epilogue: columns must be a multiple of 8");
  if (rows == 0) return;
  if (out_bf16) {
    launch_fp8_epilogue_dtype<true>(d, y, rows, cols, token_scale, channel_scale, bias, bias_is_float, stream);
  } else {
    launch_fp8_epilogue_dtype<false>(d, y, rows, cols, token_scale, channel_scale, bias, bias_is_float, stream);
  }
}

}  // namespace rt_lynx
