// RT-Lynx memory-bound kernels: fused 2:4 sparsify + cuSPARSELt compression + norm scale (folded
// into the values, or returned), and the scale/bias epilogue kept for the structured-A fallback.
//
// Compressed layout (cuSPARSELt 0.8, 16-bit types, rows padded to 64, checked at start-up
// against torch._cslt_compress): values = rows * cols/2 elements, row-major, the two kept
// entries of each group of 4 in column order; then rows*cols/8 metadata bytes. The 4-bit code of
// (row r, group g) is i0 | i1 << 2 (kept positions, i0 < i1); it sits in byte
//   (r/64)*8*cols + (g/8)*256 + ((r%64)/16)*64 + (r%8)*8 + 2*(g%4) + (g%8)/4,
// low nibble for r%16 < 8, high nibble for row r+8.
#include "half_words.cuh"
#include "lynx_kernels.h"
#include "programmatic_launch.cuh"
#include "sm90_metadata_layout.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cfloat>
#include <atomic>

namespace rt_lynx {
namespace {

// One group of 4 (two 32-bit words, two values each). Keeps the 2 largest |x|, ties to the lower
// index: key = |x| bits << 2 | (3 - position) makes every key distinct and orders exactly as the
// reference rule (j beats i if |x_j| > |x_i|, or equal and j < i). |x| bits compare like |x|
// for non-NaN 16-bit floats. The two largest keys come from min/max (no predicates: with
// comparisons, the many groups a thread selects at once ran out of predicate registers), their
// low bits give the kept positions, and one byte permute picks the kept values.
template <bool kBf16>
__device__ __forceinline__ void select_group(uint32_t lo, uint32_t hi, uint32_t& kept_pair,
                                             uint32_t& code, float& dense_sq, float& kept_sq) {
  const uint32_t k0 = ((lo & 0x7fffu) << 2) | 3u, k1 = ((lo >> 14) & 0x1fffcu) | 2u;
  const uint32_t k2 = ((hi & 0x7fffu) << 2) | 1u, k3 = (hi >> 14) & 0x1fffcu;
  const uint32_t hi01 = max(k0, k1), lo01 = min(k0, k1), hi23 = max(k2, k3), lo23 = min(k2, k3);
  const uint32_t first = max(hi01, hi23);
  const uint32_t second = max(min(hi01, hi23), max(lo01, lo23));
  const uint32_t p_first = ~first & 3u, p_second = ~second & 3u;  // positions: 3 - the key's low bits
  const uint32_t i_low = min(p_first, p_second), i_high = max(p_first, p_second);
  code = i_low | (i_high << 2);
  // Value i is bytes 2i, 2i + 1 of {hi, lo}.
  kept_pair = __byte_perm(lo, hi, 0x1010u + 0x22u * i_low + 0x2200u * i_high);
  const float2 f01 = word_to_floats<kBf16>(lo), f23 = word_to_floats<kBf16>(hi);
  dense_sq += f01.x * f01.x + f01.y * f01.y + f23.x * f23.x + f23.y * f23.y;
  const float2 g = word_to_floats<kBf16>(kept_pair);
  kept_sq += g.x * g.x + g.y * g.y;
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

// The norm compensation s = ||x|| / ||x_kept|| of one token; an all-zero token keeps nothing of
// weight and gets 1, as in the reference.
__device__ __forceinline__ float token_scale_of(float dense_sq, float kept_sq) {
  return kept_sq > 0.f ? sqrtf(dense_sq / kept_sq) : 1.f;
}

// Sums a row pair's four partial norms over kLanes aligned lanes of a warp (every lane of the
// group gets the sums).
template <int kLanes = 32>
__device__ __forceinline__ void warp_sum_norms(float& dense0, float& kept0, float& dense1, float& kept1) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset >>= 1) {
    dense0 += __shfl_xor_sync(0xffffffffu, dense0, offset);
    kept0 += __shfl_xor_sync(0xffffffffu, kept0, offset);
    dense1 += __shfl_xor_sync(0xffffffffu, dense1, offset);
    kept1 += __shfl_xor_sync(0xffffffffu, kept1, offset);
  }
}

// A row pair's statistics: sums of x^2 and x_kept^2, and (e4m3) max |x_kept| bits, of rows r0, r1.
struct PairStats {
  float dense0 = 0.f, kept0 = 0.f, dense1 = 0.f, kept1 = 0.f;
  uint32_t amax0 = 0, amax1 = 0;
};

// Reduces a row pair's stats over each warp, then over the kWarps warps that share the pair
// through shared memory (blocks of 8 warps; `warp` is this warp, `first` the pair's first), in
// the same order in every thread, so all threads of the pair get identical sums. kMax: the
// maxima too.
template <int kWarps, bool kMax>
__device__ __forceinline__ void reduce_pair_stats(PairStats& s, int warp, int first) {
  warp_sum_norms(s.dense0, s.kept0, s.dense1, s.kept1);
  if constexpr (kMax) {
    s.amax0 = __reduce_max_sync(0xffffffffu, s.amax0);
    s.amax1 = __reduce_max_sync(0xffffffffu, s.amax1);
  }
  if constexpr (kWarps > 1) {
    __shared__ float partial[8][4];
    __shared__ uint32_t partial_max[8][2];
    if (threadIdx.x % 32 == 0) {
      partial[warp][0] = s.dense0; partial[warp][1] = s.kept0;
      partial[warp][2] = s.dense1; partial[warp][3] = s.kept1;
      if constexpr (kMax) {
        partial_max[warp][0] = s.amax0; partial_max[warp][1] = s.amax1;
      }
    }
    __syncthreads();
    s = PairStats();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int src = first + w;
      s.dense0 += partial[src][0]; s.kept0 += partial[src][1];
      s.dense1 += partial[src][2]; s.kept1 += partial[src][3];
      if constexpr (kMax) {
        s.amax0 = max(s.amax0, partial_max[src][0]); s.amax1 = max(s.amax1, partial_max[src][1]);
      }
    }
  }
}

template <bool kBf16>
__device__ __forceinline__ void load_chunk(const uint4* row, bool valid, int64_t c, uint4 (&in)[4]) {
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int i = 0; i < 4; ++i) in[i] = valid ? __ldg(row + c * 4 + i) : zero;
}

// Logical columns cols + 8 * piece .. + 8 of one row of the K extension: the 4 values out (u / s,
// already 16-bit) as two 2:4 groups [u0 u1 0 0] [u2 u3 0 0], both codes 0b0100 in one byte.
template <int kBlockK>
__device__ __forceinline__ void store_k_extension_piece(const uint32_t (&out)[4], int64_t row, int64_t piece,
                                                        int64_t cols, int64_t padded_rows,
                                                        uint16_t* __restrict__ values, int64_t ld_values,
                                                        uint8_t* __restrict__ meta) {
  *reinterpret_cast<uint2*>(values + row * ld_values + cols / 2 + 4 * piece) =
      make_uint2(out[0] | (out[1] << 16), out[2] | (out[3] << 16));
  meta[sm90_metadata_byte_16bit(row, cols + 8 * piece, padded_rows, kBlockK)] = 0x44;
}

// The K extension of the sm90 GEMM (sm90_k_extended_mainloop.cuh) for one row: columns cols..
// cols + k_ext of the compressed A get u[row, :] / s as 2:4 groups [u0 u1 0 0] (code 0b0100, so
// both nibbles of a metadata byte are 4), zero past the rank and in padding rows. A lane writes 8
// logical columns per step: 4 values and 1 metadata byte.
template <bool kBf16, int kBlockK>
__device__ __forceinline__ void write_k_extension(const uint16_t* __restrict__ u, int64_t rank, int64_t k_ext,
                                                  int64_t cols, int64_t padded_rows, int64_t row, bool real_row,
                                                  float s, int lane, uint16_t* __restrict__ values,
                                                  int64_t ld_values, uint8_t* __restrict__ meta) {
  for (int64_t step = lane; step < k_ext / 8; step += 32) {
    uint32_t out[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t j = 4 * step + i;
      out[i] = real_row && j < rank ? float_to_bits<kBf16>(__fdiv_rn(bits_to_float<kBf16>(u[row * rank + j]), s))
                                    : 0u;
    }
    store_k_extension_piece<kBlockK>(out, row, step, cols, padded_rows, values, ld_values, meta);
  }
}

// kCutlassBlockK: 0 writes cuSPARSELt's metadata layout, 64 or 128 CUTLASS's sm90 layout with
// that metadata atom (sm90_metadata_layout.h). u (rows x rank, or nullptr): the K extension
// (sm90 layouts only), written once the token scale is known.
template <bool kBf16, bool kFold, int kSplit, int kCutlassBlockK>
__global__ void __launch_bounds__(256) sparsify_compress_kernel(
    const uint16_t* __restrict__ x, int64_t rows, int64_t padded_rows, int64_t cols, int64_t ld_x,
    uint16_t* __restrict__ values, int64_t ld_values, uint8_t* __restrict__ meta, float* __restrict__ scale,
    const uint16_t* __restrict__ u, int64_t rank, int64_t k_ext) {
  allow_next_grid_launch();
  wait_for_previous_grid();
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
  uint4* v0 = reinterpret_cast<uint4*>(values + r0 * ld_values);
  uint4* v1 = reinterpret_cast<uint4*>(values + r1 * ld_values);
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
    PairStats norms{dense0, kept0, dense1, kept1};
    reduce_pair_stats<kSplit, false>(norms, warp, pair_in_block * kSplit);
    s0 = token_scale_of(norms.dense0, norms.kept0);
    s1 = token_scale_of(norms.dense1, norms.kept1);
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

  float t0 = 1.f, t1 = 1.f;  // the token scales, once known (1 without compensation)
  if (!kFold && scale != nullptr) {
    PairStats norms{d0, k0, d1, k1};
    reduce_pair_stats<kSplit, false>(norms, warp, pair_in_block * kSplit);
    t0 = token_scale_of(norms.dense0, norms.kept0);
    t1 = token_scale_of(norms.dense1, norms.kept1);
    if (split == 0 && lane == 0) {
      scale[r0] = t0;
      scale[r1] = t1;
    }
  }
  if constexpr (kCutlassBlockK != 0) {
    if (u != nullptr && split == 0) {
      write_k_extension<kBf16, kCutlassBlockK>(u, rank, k_ext, cols, padded_rows, r0, has_r0, t0, lane, values,
                                                ld_values, meta);
      write_k_extension<kBf16, kCutlassBlockK>(u, rank, k_ext, cols, padded_rows, r1, has_r1, t1, lane, values,
                                                ld_values, meta);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Prologues (SparsifyPrologue, lynx_kernels.h): the producer's elementwise work applied to x before
// its 2:4 selection. A DiT block's LayerNorm + modulation, or an MLP's GELU.
struct PrologueArgs {
  const uint16_t* shift;    // (images, cols), x's dtype
  const uint16_t* scale1p;  // 1 + scale, (images, cols)
  int64_t tokens;           // rows per image
  float eps;
  int gelu_mode;            // GeluMode: gelu_mode_for at launch
};

template <bool kBf16>
__device__ __forceinline__ float sum_of_8(const uint4& v) {
  const float2 a = word_to_floats<kBf16>(v.x), b = word_to_floats<kBf16>(v.y);
  const float2 c = word_to_floats<kBf16>(v.z), d = word_to_floats<kBf16>(v.w);
  return ((a.x + a.y) + (b.x + b.y)) + ((c.x + c.y) + (d.x + d.y));
}

template <bool kBf16>
__device__ __forceinline__ float centered_squares_of_8(const uint4& v, float mean) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = word_to_floats<kBf16>(words[i]);
    const float a = f.x - mean, b = f.y - mean;
    sum += a * a + b * b;
  }
  return sum;
}

// Two values: xn = (x - mean) * rstd rounded to the 16-bit type (the LayerNorm's output), then
// xn * scale1p + shift in one fp32 multiply-add, rounded (torch.addcmul's opmath).
template <bool kBf16>
__device__ __forceinline__ uint32_t modulate_word(uint32_t x, uint32_t shift, uint32_t scale1p, float mean,
                                                  float rstd) {
  const float2 v = word_to_floats<kBf16>(x), sh = word_to_floats<kBf16>(shift), sc = word_to_floats<kBf16>(scale1p);
  const float n0 = bits_to_float<kBf16>(float_to_bits<kBf16>(__fmul_rn(__fsub_rn(v.x, mean), rstd)));
  const float n1 = bits_to_float<kBf16>(float_to_bits<kBf16>(__fmul_rn(__fsub_rn(v.y, mean), rstd)));
  return float_to_bits<kBf16>(__fmaf_rn(n0, sc.x, sh.x)) | (float_to_bits<kBf16>(__fmaf_rn(n1, sc.y, sh.y)) << 16);
}

template <bool kBf16>
__device__ __forceinline__ uint4 modulate_8(const uint4& x, const uint4& shift, const uint4& scale1p, float mean,
                                            float rstd) {
  return make_uint4(modulate_word<kBf16>(x.x, shift.x, scale1p.x, mean, rstd),
                    modulate_word<kBf16>(x.y, shift.y, scale1p.y, mean, rstd),
                    modulate_word<kBf16>(x.z, shift.z, scale1p.z, mean, rstd),
                    modulate_word<kBf16>(x.w, shift.w, scale1p.w, mean, rstd));
}

// gelu(x) = 0.5 x (1 + tanh(u)) with the tanh approximation, u = sqrt(2/pi) (x + 0.044715 x^3),
// rounded to the 16-bit type (set_fast_gelu). Exact: in fp32 in the order torch's CUDA kernel
// computes it, with tanhf: torch's result bit for bit. Fast: the same function as x / (1 +
// exp(-2u)), with -2u log2(e) = x (c1 + c2 x^2) (the constants folded: five fp32 operations and
// two special-function ones a value, three fewer than computing u first; against that, in an fp32
// emulation, the same bf16 result on every bf16 input and one ulp apart on two fp16 inputs), on ex2.approx
// and a fast division, no cancellation: a few fp32 ulps from the true
// value, so within a 16-bit ulp of torch's, except in the negative tail (x < about -3), where
// torch's 1 + tanh(u) cancels and its result is off by up to |x| 2^-23 (-0 below about -5.6, where
// the fast one keeps the tiny true value). +-inf and NaN give torch's results.
template <bool kBf16, bool kFast>
__device__ __forceinline__ uint32_t gelu_tanh_bits(uint32_t bits16) {
  constexpr float kBeta = 0.7978845608028654f;   // sqrt(2 / pi)
  constexpr float kKappa = 0.044715f;
  const float x = bits_to_float<kBf16>(bits16);
  if constexpr (kFast) {
    constexpr float kC1 = static_cast<float>(-2.0 * 0.7978845608028654 * 1.4426950408889634);
    constexpr float kC2 = static_cast<float>(-2.0 * 0.7978845608028654 * 0.044715 * 1.4426950408889634);
    const float exponent = x * fmaf(kC2, x * x, kC1);   // -2u log2(e)
    float e;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(exponent));
    return float_to_bits<kBf16>(__fdividef(x, 1.f + e));
  } else {
    const float cube = x * x * x;
    const float inner = kBeta * (x + kKappa * cube);
    return float_to_bits<kBf16>(0.5f * x * (1.f + tanhf(inner)));
  }
}

// The same gelu on two 16-bit values at once, in x's packed type (bf16x2 or f16x2): u, the
// hardware's packed tanh (one special-function operation per two values, where the fast GELU takes
// two per value) and 0.5 x (1 + t) as one fused multiply-add, each rounded to 16 bits. Only for
// passes whose output is e4m3 (GeluMode kGeluPackedForE4m3), whose rounding is up to 6%: this is
// within 2% of the value (bf16, x > -1; 1% in f16) and |x| 2^-8 in the negative tail, where 1 + t
// cancels (a CPU emulation with a 2^-8 tanh; on an H100 a bf16 product after it was 0.7% further
// from fp32 math, in quadrature). x^2 past f16's range gives t = +-1, so large |x| give x or 0 as
// the true gelu does.
template <bool kBf16>
__device__ __forceinline__ uint32_t gelu_tanh_packed_word(uint32_t word) {
  constexpr float kBeta = 0.7978845608028654f;
  constexpr float kBetaKappa = 0.7978845608028654f * 0.044715f;
  uint32_t inner, t, out;
  if constexpr (kBf16) {
    const __nv_bfloat162 x = *reinterpret_cast<const __nv_bfloat162*>(&word);
    const __nv_bfloat162 u = __hmul2(x, __hfma2(__hmul2(x, x), __float2bfloat162_rn(kBetaKappa),
                                                __float2bfloat162_rn(kBeta)));
    inner = *reinterpret_cast<const uint32_t*>(&u);
    asm("tanh.approx.bf16x2 %0, %1;" : "=r"(t) : "r"(inner));
    const __nv_bfloat162 half_x = __hmul2(x, __float2bfloat162_rn(0.5f));
    const __nv_bfloat162 y = __hfma2(half_x, *reinterpret_cast<const __nv_bfloat162*>(&t), half_x);
    out = *reinterpret_cast<const uint32_t*>(&y);
  } else {
    const __half2 x = *reinterpret_cast<const __half2*>(&word);
    const __half2 u = __hmul2(x, __hfma2(__hmul2(x, x), __float2half2_rn(kBetaKappa), __float2half2_rn(kBeta)));
    inner = *reinterpret_cast<const uint32_t*>(&u);
    asm("tanh.approx.f16x2 %0, %1;" : "=r"(t) : "r"(inner));
    const __half2 half_x = __hmul2(x, __float2half2_rn(0.5f));
    const __half2 y = __hfma2(half_x, *reinterpret_cast<const __half2*>(&t), half_x);
    out = *reinterpret_cast<const uint32_t*>(&y);
  }
  return out;
}

// How a launch computes its GELUs (gelu_mode_for): torch's bits, the fast fp32 form, or the packed
// form where the output is e4m3.
enum GeluMode : int { kGeluExact = 0, kGeluFast = 1, kGeluPackedForE4m3 = 2 };

template <bool kBf16, bool kFast>
__device__ __forceinline__ uint4 gelu_tanh_8_as(const uint4& v) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  uint32_t out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[i] = gelu_tanh_bits<kBf16, kFast>(words[i] & 0xffffu) | (gelu_tanh_bits<kBf16, kFast>(words[i] >> 16) << 16);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// One uniform branch per 8 values: the launch's setting, the same for every thread.
template <bool kBf16>
__device__ __forceinline__ uint4 gelu_tanh_8(const uint4& v, int mode) {
  if (mode == kGeluPackedForE4m3) {
    return make_uint4(gelu_tanh_packed_word<kBf16>(v.x), gelu_tanh_packed_word<kBf16>(v.y),
                      gelu_tanh_packed_word<kBf16>(v.z), gelu_tanh_packed_word<kBf16>(v.w));
  }
  return mode == kGeluFast ? gelu_tanh_8_as<kBf16, true>(v) : gelu_tanh_8_as<kBf16, false>(v);
}

// The GELU mode of a launch whose output is e4m3 or 16-bit: torch's bits when the fast GELU is off,
// else the packed form where the output is e4m3 and set_packed_e4m3_gelu is on, else the fast one.
int gelu_mode_for(bool e4m3_output) {
  if (!fast_gelu()) return kGeluExact;
  return e4m3_output && packed_e4m3_gelu() ? kGeluPackedForE4m3 : kGeluFast;
}

// ---------------------------------------------------------------------------------------------
// The sm90 sparsify pass with the Lynx LoRA's down projection on tensor cores: x is read once for
// both the 2:4 compression and u = x down^T, which goes into the K extension (write_k_extension's
// layout) once the token scale is known. Split over K: a block covers kFusedRows rows and a slice
// of K (whole kFusedTileK-column tiles through a double-buffered cp.async pipeline of shared-memory
// tiles: x rows, down's rank padded to 16 or 32), writes the values and metadata of its slice and
// its partial sums (u, ||x||^2, ||x_kept||^2 per row) to a workspace; a second small kernel adds
// the slices in slice order (deterministic), forms s and writes u / s. Why split: the previous
// version, 32-row blocks over all of K, ran at M = 4096 as one wave of one block per SM and read
// down from L2 once per 32 rows; it was slower than the plain pass plus cuBLAS's down. This one:
// 23.6 + 4.3 us against 18.6 + 9.7 us (ncu, FLUX qkv with rank 32, H200).
// Per tile: a thread selects 2 row pairs (r, r + 8) x 16 columns; warp w runs mma.sync m16n8k16
// for rows [16 (w % 4), + 16) and rank columns [16 (w / 4), + 16) over the whole tile.
constexpr int kFusedRows = 64;
constexpr int kFusedTileK = 256;
constexpr int kFusedPitch = kFusedTileK + 8;  // elements; ldmatrix's 8 rows land on distinct banks
constexpr int kFusedThreads = 256;
constexpr int kFusedStages = 2;
constexpr int kFusedPieces = kFusedTileK / 8;                  // 16-byte copies per tile row
constexpr int kFusedRowsPerCopy = kFusedThreads / kFusedPieces;  // tile rows one pass of copies covers

// Shared memory of one pipeline stage (x tile, then the down tile) and of all stages.
template <int kRankTiles>
struct FusedSmem {
  static constexpr int kStageElements = (kFusedRows + kRankTiles * 8) * kFusedPitch;
  static constexpr int kBytes = kFusedStages * kStageElements * 2;
  // Floats per (slice, row) of the workspace: u padded to the rank tiles, then ||x||^2, ||x_kept||^2,
  // two unused (rows start 16-byte aligned for the second kernel's loads).
  static constexpr int kPartialStride = kRankTiles * 8 + 4;
};

// Lanes of the second kernel (low_rank_extension_kernel) per row: 4 values of u each. 64-thread
// blocks, so 512 rows still take 64 blocks (latency-bound there: with 4 slices in flight the
// 512-row text qkv ran 3.7 us with these and with 256-thread blocks alike, 2.9 with a warp a row).
template <int kRankTiles>
constexpr int kLowRankExtensionLanesPerRow = kRankTiles * 8 / 4;
constexpr int kLowRankExtensionThreads = 64;
template <int kRankTiles>
constexpr int kLowRankExtensionRowsPerBlock = kLowRankExtensionThreads / kLowRankExtensionLanesPerRow<kRankTiles>;

template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t shared_address(const void* smem) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(smem));
}

// address: in the shared window (shared_address), so that a constant offset folds into the instruction.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// 16 bytes global -> shared, bypassing L1; zero-filled when !valid (rows past M, columns past K,
// rank rows past the rank). A copy of 0 source bytes reads nothing, so `global` may then point
// past the tensor (CUTLASS's cp_async_zfill relies on the same).
__device__ __forceinline__ void cp_async_16(uint32_t address, const uint16_t* global, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_16(uint16_t* smem, const uint16_t* global, bool valid) {
  cp_async_16(shared_address(smem), global, valid);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>  // "memory": the compiler must not move reads of the landed bytes above the wait
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory"); }

// 16 columns of one row: 4 groups -> 8 kept values (one 16-byte store) and 4 codes as nibbles.
template <bool kBf16>
__device__ __forceinline__ uint32_t select_16(const uint4 (&in)[2], uint4& kept, float& dense_sq, float& kept_sq) {
  uint32_t pairs[4], codes[4];
  select_group<kBf16>(in[0].x, in[0].y, pairs[0], codes[0], dense_sq, kept_sq);
  select_group<kBf16>(in[0].z, in[0].w, pairs[1], codes[1], dense_sq, kept_sq);
  select_group<kBf16>(in[1].x, in[1].y, pairs[2], codes[2], dense_sq, kept_sq);
  select_group<kBf16>(in[1].z, in[1].w, pairs[3], codes[3], dense_sq, kept_sq);
  kept = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
  return codes[0] | (codes[1] << 4) | (codes[2] << 8) | (codes[3] << 12);
}

// x's tile as the product takes it: the prologue applied by each thread to the vectors it copied
// (once its copies have landed, before the barrier that shows the tile to the other warps). Rows
// past the matrix and columns past K stay zero.
template <bool kBf16, int kPrologue>
__device__ __forceinline__ void prologue_on_tile(uint16_t* stage, int64_t first_row, int64_t rows_left, bool col_ok,
                                                 int64_t col, int64_t cols, const PrologueArgs& mod,
                                                 const float2* __restrict__ row_stats) {
  if constexpr (kPrologue != kPrologueNone) {
    if (!col_ok) return;
#pragma unroll
    for (int i = 0; i < kFusedRows / kFusedRowsPerCopy; ++i) {
      if (kFusedRowsPerCopy * i >= rows_left) break;
      uint4* v = reinterpret_cast<uint4*>(stage + i * kFusedRowsPerCopy * kFusedPitch);
      if constexpr (kPrologue == kPrologueGeluTanh) {
        *v = gelu_tanh_8<kBf16>(*v, mod.gelu_mode);
      } else {
        const int64_t row = first_row + kFusedRowsPerCopy * i;
        const float2 stats = __ldg(row_stats + row);
        const int64_t at = (row / mod.tokens) * cols + col;
        *v = modulate_8<kBf16>(*v, __ldg(reinterpret_cast<const uint4*>(mod.shift + at)),
                               __ldg(reinterpret_cast<const uint4*>(mod.scale1p + at)), stats.x, stats.y);
      }
    }
  }
}

template <bool kBf16, int kCutlassBlockK, int kRankTiles, int kPrologue>
__global__ void __launch_bounds__(kFusedThreads, 2) sparsify_low_rank_kernel(
    const uint16_t* __restrict__ x, int64_t rows, int64_t padded_rows, int64_t cols, int64_t ld_x,
    const uint16_t* __restrict__ down, int64_t rank, int64_t tiles_per_slice, uint16_t* __restrict__ values,
    int64_t ld_values, uint8_t* __restrict__ meta, float* __restrict__ partial, PrologueArgs mod,
    const float2* __restrict__ row_stats) {
  allow_next_grid_launch();
  wait_for_previous_grid();
  constexpr int kRankPadded = kRankTiles * 8;
  constexpr int kStride = FusedSmem<kRankTiles>::kPartialStride;
  constexpr int kStage = FusedSmem<kRankTiles>::kStageElements;
  constexpr int kXCopies = kFusedRows / kFusedRowsPerCopy;
  constexpr int kDownCopies = kRankPadded / kFusedRowsPerCopy;
  static_assert(kRankTiles == 2 || kRankTiles == 4, "rank columns of 16 per warp, two warps at most");
  static_assert(kFusedThreads / 32 == 8 && kFusedRows == 64 && kFusedTileK == 256, "the thread mapping below");
  static_assert(kFusedRows % kFusedRowsPerCopy == 0 && kRankPadded % kFusedRowsPerCopy == 0, "whole copy passes");
  extern __shared__ __align__(16) uint16_t stages[];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t block_row = int64_t(blockIdx.x) * kFusedRows;
  const int64_t slice = blockIdx.y;
  const int64_t first_col = slice * tiles_per_slice * kFusedTileK;
  const int64_t tiles = min(tiles_per_slice, (cols - first_col + kFusedTileK - 1) / kFusedTileK);
  // This thread's copies: tile rows copy_row + kFusedRowsPerCopy * i, 8 columns at copy_col. Which
  // of them are real rows (not past M, not past the rank) is the same for every tile: a bit each.
  const int copy_row = int(threadIdx.x) / kFusedPieces;
  const int copy_col = (int(threadIdx.x) % kFusedPieces) * 8;
  const int64_t x_copy_step = kFusedRowsPerCopy * ld_x, down_copy_step = kFusedRowsPerCopy * cols;
  uint32_t x_rows_real = 0, down_rows_real = 0;
#pragma unroll
  for (int i = 0; i < kXCopies; ++i) x_rows_real |= uint32_t(kFusedRowsPerCopy * i < rows - block_row - copy_row) << i;
#pragma unroll
  for (int i = 0; i < kDownCopies; ++i) down_rows_real |= uint32_t(kFusedRowsPerCopy * i < rank - copy_row) << i;
  asm("" : "+r"(x_rows_real), "+r"(down_rows_real));  // kept in registers, not recomputed at every tile
  const int64_t x_rows_left = rows - block_row - copy_row;  // for the prologue
  // 32-bit shared addresses: this thread's copy target and ldmatrix rows in stage 0.
  const uint32_t stages_address = shared_address(stages);
  const uint32_t copy_address = stages_address + 2 * (copy_row * kFusedPitch + copy_col);
  constexpr uint32_t kStageBytes = 2 * kStage;
  // Tiles are loaded in order: the next one's sources and column move on by a tile at each load.
  const uint16_t* x_next = x + (block_row + copy_row) * ld_x + first_col + copy_col;
  const uint16_t* down_next = down + int64_t(copy_row) * cols + first_col + copy_col;
  int64_t next_col = first_col + copy_col;
  auto load_tile = [&](int tile) {
    const uint32_t stage = copy_address + (tile % kFusedStages) * kStageBytes;
    const bool col_ok = next_col < cols;
    const uint32_t x_real = col_ok ? x_rows_real : 0u, down_real = col_ok ? down_rows_real : 0u;
    const uint16_t* source = x_next;
#pragma unroll
    for (int i = 0; i < kXCopies; ++i, source += x_copy_step) {
      cp_async_16(stage + 2 * i * kFusedRowsPerCopy * kFusedPitch, source, (x_real >> i) & 1u);
    }
    source = down_next;
#pragma unroll
    for (int i = 0; i < kDownCopies; ++i, source += down_copy_step) {
      cp_async_16(stage + 2 * (kFusedRows + i * kFusedRowsPerCopy) * kFusedPitch, source, (down_real >> i) & 1u);
    }
    x_next += kFusedTileK;
    down_next += kFusedTileK;
    next_col += kFusedTileK;
  };

  // Selection: row pairs pair0 + 2p (p = 0, 1), columns [16 piece, + 16) of each tile. The stores of
  // a pair move by a fixed step a tile: 256 columns are 128 values and, since 256 is a whole number
  // of metadata atoms, 32 * padded_rows metadata bytes.
  const int piece = lane % 16;
  const int pair0 = warp * 4 + (lane / 16) * 2;
  int local[2][2];
  uint16_t* pair_values[2];
  uint8_t* pair_meta[2];
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    local[p][0] = ((pair0 + p) / 8) * 16 + (pair0 + p) % 8;
    local[p][1] = local[p][0] + 8;
    const int64_t r0 = block_row + local[p][0], col0 = first_col + piece * 16;
    pair_values[p] = values + r0 * ld_values + col0 / 2;
    pair_meta[p] = meta + sm90_metadata_byte_16bit(r0, col0, padded_rows, kCutlassBlockK);
  }
  const int64_t meta_tile_step = 32 * padded_rows;
  static_assert(kFusedTileK % kCutlassBlockK == 0, "a tile is whole metadata atoms");
  // MMA: rows [16 m_tile, + 16), rank tiles 2 n_half and 2 n_half + 1.
  const int m_tile = warp % 4;
  const int n_half = warp / 4;
  const bool runs_mma = 2 * n_half < kRankTiles;  // warp-uniform
  const uint32_t a_address = stages_address + 2 * ((m_tile * 16 + lane % 16) * kFusedPitch + (lane / 16) * 8);
  // b[0], b[1]: rank tile 2 n_half (columns k..k+7, k+8..k+15); b[2], b[3]: the next tile.
  const uint32_t b_address =
      stages_address + 2 * ((kFusedRows + n_half * 16 + (lane / 16) * 8 + lane % 8) * kFusedPitch + ((lane / 8) % 2) * 8);

  float dense[2][2] = {}, kept[2][2] = {};
  float acc[2][4] = {};
  auto mma_step = [&](uint32_t stage, int k) {
    uint32_t a[4], b[4];
    ldmatrix_x4(a, a_address + stage + 2 * k);
    ldmatrix_x4(b, b_address + stage + 2 * k);
    mma_16816<kBf16>(acc[0], a, b[0], b[1]);
    mma_16816<kBf16>(acc[1], a, b[2], b[3]);
  };
  const int tile_count = static_cast<int>(tiles);
#pragma unroll
  for (int s = 0; s < kFusedStages - 1; ++s) {
    if (s < tile_count) load_tile(s);
    cp_async_commit();
  }
  for (int tile = 0; tile < tile_count; ++tile) {
    cp_async_wait<kFusedStages - 2>();
    prologue_on_tile<kBf16, kPrologue>(stages + (tile % kFusedStages) * kStage + copy_row * kFusedPitch + copy_col,
                                       block_row + copy_row, x_rows_left,
                                       first_col + tile * kFusedTileK + copy_col < cols,
                                       first_col + tile * kFusedTileK + copy_col, cols, mod, row_stats);
    __syncthreads();  // this tile is in (and prepared); every thread is done with the stage refilled next
    if (tile + kFusedStages - 1 < tile_count) load_tile(tile + kFusedStages - 1);
    cp_async_commit();
    const uint16_t* x_tile = stages + (tile % kFusedStages) * kStage;
    const int64_t tile_col = first_col + int64_t(tile) * kFusedTileK;
    // Columns of this tile inside K: cols is a multiple of 64, so whole 16-column steps.
    const int tile_cols = static_cast<int>(min(int64_t(kFusedTileK), cols - tile_col));
    if (piece * 16 < tile_cols) {
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const uint4* row0 = reinterpret_cast<const uint4*>(x_tile + local[p][0] * kFusedPitch + piece * 16);
        const uint4* row1 = reinterpret_cast<const uint4*>(x_tile + local[p][1] * kFusedPitch + piece * 16);
        const uint4 in0[2] = {row0[0], row0[1]}, in1[2] = {row1[0], row1[1]};
        uint4 kept_row0, kept_row1;
        const uint32_t codes0 = select_16<kBf16>(in0, kept_row0, dense[p][0], kept[p][0]);
        const uint32_t codes1 = select_16<kBf16>(in1, kept_row1, dense[p][1], kept[p][1]);
        uint16_t* tile_values = pair_values[p] + tile * (kFusedTileK / 2);
        *reinterpret_cast<uint4*>(tile_values) = kept_row0;
        *reinterpret_cast<uint4*>(tile_values + 8 * ld_values) = kept_row1;
        // Columns 16 piece .. + 15 of the pair's two rows are four neighbouring metadata bytes.
        *reinterpret_cast<uint32_t*>(pair_meta[p] + tile * meta_tile_step) = (codes0 & 0xffffu) | (codes1 << 16);
      }
    }
    if (runs_mma) {
      const uint32_t stage = (tile % kFusedStages) * kStageBytes;
      if (tile_cols == kFusedTileK) {
#pragma unroll
        for (int k = 0; k < kFusedTileK; k += 16) mma_step(stage, k);
      } else {
        for (int k = 0; k < tile_cols; k += 16) mma_step(stage, k);
      }
    }
  }
  cp_async_wait<0>();

  float* slice_partial = partial + (slice * padded_rows + block_row) * kStride;
  if (runs_mma) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int n = (2 * n_half + nt) * 8 + (lane % 4) * 2;
      const int row = m_tile * 16 + lane / 4;
      *reinterpret_cast<float2*>(slice_partial + row * kStride + n) = make_float2(acc[nt][0], acc[nt][1]);
      *reinterpret_cast<float2*>(slice_partial + (row + 8) * kStride + n) = make_float2(acc[nt][2], acc[nt][3]);
    }
  }
  // Row norms: the 16 lanes of a half-warp hold one row pair's partial sums.
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    warp_sum_norms<16>(dense[p][0], kept[p][0], dense[p][1], kept[p][1]);
    if (piece == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        *reinterpret_cast<float2*>(slice_partial + local[p][h] * kStride + kRankPadded) =
            make_float2(dense[p][h], kept[p][h]);
      }
    }
  }
}

// (mean, rstd) of each row for the fused pass's LayerNorm: a warp per row, the mean first, then
// the sum of squares about it from a second read of the row (L1/L2), as modulate_staged_pair does.
template <bool kBf16>
__global__ void __launch_bounds__(256) row_stats_kernel(const uint4* __restrict__ x, int64_t rows, int64_t ld_vecs,
                                                        int vecs, float eps, float2* __restrict__ stats) {
  allow_next_grid_launch();
  wait_for_previous_grid();
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;
  if (row >= rows) return;  // warp-uniform
  const uint4* x_row = x + row * ld_vecs;
  float sum = 0.f;
  for (int c = lane; c < vecs; c += 32) sum += sum_of_8<kBf16>(x_row[c]);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  const float n = float(vecs) * 8.f;
  const float mean = __fdiv_rn(sum, n);
  float squares = 0.f;
  for (int c = lane; c < vecs; c += 32) squares += centered_squares_of_8<kBf16>(x_row[c], mean);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) squares += __shfl_xor_sync(0xffffffffu, squares, offset);
  if (lane == 0) stats[row] = make_float2(mean, rsqrtf(__fdiv_rn(squares, n) + eps));
}

// Adds the slices' partial sums of each row in slice order, writes the token scale (when
// compensating) and the K extension u / s. kRankPadded / 4 lanes a row, lane `part` holding
// u[4 part .. + 3] (one 16-byte load a slice) and writing the extension's piece `part` (then the
// zero pieces past the rank), so a warp finishes 4 (rank 32) or 8 rows: a warp a row issued 4x
// the instructions for the same work (1.56 M for 4096 rows, 32% of the issue slots, 4.6 us).
template <bool kBf16, int kCutlassBlockK, int kRankTiles>
__global__ void __launch_bounds__(kLowRankExtensionThreads) low_rank_extension_kernel(
    const float* __restrict__ partial, int64_t slices, int64_t rows, int64_t padded_rows, int64_t cols,
    int64_t rank, int64_t k_ext, uint16_t* __restrict__ values, int64_t ld_values, uint8_t* __restrict__ meta,
    float* __restrict__ scale) {
  allow_next_grid_launch();
  wait_for_previous_grid();
  constexpr int kRankPadded = kRankTiles * 8;
  constexpr int kStride = FusedSmem<kRankTiles>::kPartialStride;
  constexpr int kLanesPerRow = kLowRankExtensionLanesPerRow<kRankTiles>;
  static_assert(kStride % 4 == 0, "16-byte aligned rows of partial sums");
  const int part = int(threadIdx.x) % kLanesPerRow;
  const int64_t row =
      int64_t(blockIdx.x) * kLowRankExtensionRowsPerBlock<kRankTiles> + int(threadIdx.x) / kLanesPerRow;
  if (row >= padded_rows) return;
  float4 u = make_float4(0.f, 0.f, 0.f, 0.f);
  float dense_sq = 0.f, kept_sq = 0.f;
  const float* row_partial = partial + row * kStride;
  const int64_t slice_step = padded_rows * kStride;
  // Slices loaded before any is added: one memory latency per 12 (at 512 rows the pass makes 12
  // slices of K 3072: 3.7 us with 4 in flight, 2.8 with 12).
  constexpr int kInFlight = 12;
  for (int64_t first = 0; first < slices; first += kInFlight) {
    float4 part_u[kInFlight];
    float2 part_norms[kInFlight];
#pragma unroll
    for (int i = 0; i < kInFlight; ++i) {
      const bool real = first + i < slices;
      const float* p = row_partial + (real ? first + i : 0) * slice_step;
      part_u[i] = real ? *reinterpret_cast<const float4*>(p + 4 * part) : make_float4(0.f, 0.f, 0.f, 0.f);
      part_norms[i] = real ? *reinterpret_cast<const float2*>(p + kRankPadded) : make_float2(0.f, 0.f);
    }
#pragma unroll
    for (int i = 0; i < kInFlight; ++i) {  // in slice order: the same sums on every run
      u.x += part_u[i].x;
      u.y += part_u[i].y;
      u.z += part_u[i].z;
      u.w += part_u[i].w;
      dense_sq += part_norms[i].x;
      kept_sq += part_norms[i].y;
    }
  }
  // Without compensation the epilogue scale is 1.
  const float s = scale != nullptr ? token_scale_of(dense_sq, kept_sq) : 1.f;
  if (scale != nullptr && part == 0) scale[row] = s;
  // Piece p: logical columns cols + 8 p .. + 8, i.e. u[4 p .. 4 p + 3]; past this lane's own, zeros.
  const float held[4] = {u.x, u.y, u.z, u.w};
  for (int64_t piece = part; piece < k_ext / 8; piece += kLanesPerRow) {
    uint32_t out[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t j = 4 * piece + i;
      out[i] = row < rows && j < rank ? float_to_bits<kBf16>(__fdiv_rn(held[i], s)) : 0u;
    }
    store_k_extension_piece<kCutlassBlockK>(out, row, piece, cols, padded_rows, values, ld_values, meta);
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

// The staged pass (sparsify_staged_kernel, below) for an sm90 layout; false when it is switched
// off or the row is too long for it (the caller runs the chunk loop then).
bool launch_sparsify_staged(bool is_bf16, bool e4m3, int metadata_layout, const void* x, int64_t rows,
                            int64_t padded_rows, int64_t cols, int64_t ld_x, void* values, int64_t ld_values,
                            uint8_t* meta, float* scale, bool compensate, const void* u, int64_t rank,
                            int64_t k_ext, const SparsifyPrologue& prologue, cudaStream_t stream);
int staged_threads_per_pair(int64_t padded_rows, int64_t cols);

struct SparsifyExtension {
  const void* u;    // rows x rank or nullptr
  int64_t rank, k_ext;
};

template <bool kBf16, bool kFold, int kSplit, int kCutlassBlockK>
void launch_sparsify_variant(const void* x, int64_t rows, int64_t padded_rows, int64_t cols,
                             int64_t ld_x, uint16_t* values, int64_t ld_values, uint8_t* meta, float* scale,
                             const SparsifyExtension& ext, cudaStream_t stream) {
  const int64_t blocks = padded_rows / 16 * kSplit;
  require(blocks <= 0x7fffffff, "sparsify: too many rows for one launch");
  launch_after_previous(sparsify_compress_kernel<kBf16, kFold, kSplit, kCutlassBlockK>,
                        dim3(static_cast<unsigned>(blocks)), dim3(32, 8), 0, stream, static_cast<const uint16_t*>(x),
                        rows, padded_rows, cols, ld_x, values, ld_values, meta, scale,
                        static_cast<const uint16_t*>(ext.u), ext.rank, ext.k_ext);
}

template <bool kBf16, bool kFold, int kCutlassBlockK>
void launch_sparsify_split(int split, const void* x, int64_t rows, int64_t padded_rows,
                           int64_t cols, int64_t ld_x, uint16_t* values, int64_t ld_values, uint8_t* meta,
                           float* scale, const SparsifyExtension& ext, cudaStream_t stream) {
  switch (split) {
    case 1: return launch_sparsify_variant<kBf16, kFold, 1, kCutlassBlockK>(x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, ext, stream);
    case 2: return launch_sparsify_variant<kBf16, kFold, 2, kCutlassBlockK>(x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, ext, stream);
    case 4: return launch_sparsify_variant<kBf16, kFold, 4, kCutlassBlockK>(x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, ext, stream);
    default: return launch_sparsify_variant<kBf16, kFold, 8, kCutlassBlockK>(x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, ext, stream);
  }
}

template <bool kBf16>
void launch_sparsify_layout(int layout, bool fold_scale, int split, const void* x, int64_t rows,
                            int64_t padded_rows, int64_t cols, int64_t ld_x, uint16_t* values,
                            int64_t ld_values, uint8_t* meta, float* scale, const SparsifyExtension& ext,
                            cudaStream_t stream) {
  switch (layout) {
    case kMetadataCusparselt:
      if (fold_scale) return launch_sparsify_split<kBf16, true, 0>(split, x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, ext, stream);
      return launch_sparsify_split<kBf16, false, 0>(split, x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, ext, stream);
    case kMetadataSm90Block64:
      return launch_sparsify_split<kBf16, false, 64>(split, x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, ext, stream);
    default:
      return launch_sparsify_split<kBf16, false, 128>(split, x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, ext, stream);
  }
}

// K slices of the fused pass: the fewest that keep the chip's block slots (two per SM) busy,
// counting tail waves (a slice's time ~ its tiles).
struct FusedSlicing {
  int64_t tiles_per_slice = 1, slices = 1;
};

FusedSlicing fused_slicing(int64_t padded_rows, int64_t cols);

// The fused pass's operands other than x and its outputs.
struct LowRankLaunch {
  const void* down;
  int64_t rank, k_ext;
  uint16_t* values;
  int64_t ld_values;
  uint8_t* meta;
  float* scale;
  float* workspace;  // the slices' partial sums, then (LayerNorm prologue) the rows' (mean, rstd)
  const SparsifyPrologue* prologue;
};

template <bool kBf16, int kCutlassBlockK, int kRankTiles, int kPrologue>
void launch_low_rank_tiles(const void* x, int64_t rows, int64_t padded_rows, int64_t cols, int64_t ld_x,
                           const LowRankLaunch& l, cudaStream_t stream) {
  auto* kernel = sparsify_low_rank_kernel<kBf16, kCutlassBlockK, kRankTiles, kPrologue>;
  constexpr int kSmem = FusedSmem<kRankTiles>::kBytes;
  // Idempotent, per device: set on every launch rather than cached per process.
  const cudaError_t configured = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  require(configured == cudaSuccess, "sparsify: ", kSmem, " bytes of shared memory refused: ",
          cudaGetErrorString(configured));
  const FusedSlicing slicing = fused_slicing(padded_rows, cols);
  PrologueArgs mod{static_cast<const uint16_t*>(l.prologue->shift), static_cast<const uint16_t*>(l.prologue->scale1p),
                   l.prologue->tokens, l.prologue->eps, gelu_mode_for(false)};
  const int64_t partial_floats = slicing.slices * padded_rows * FusedSmem<kMaxFusedRank / 8>::kPartialStride;
  float2* row_stats = nullptr;
  if constexpr (kPrologue == kPrologueLayerNormModulation) {
    row_stats = reinterpret_cast<float2*>(l.workspace + partial_floats);
    launch_after_previous(row_stats_kernel<kBf16>, dim3(static_cast<unsigned>((rows + 7) / 8)), dim3(256), 0, stream,
                          static_cast<const uint4*>(x), rows, ld_x / 8, static_cast<int>(cols / 8), mod.eps, row_stats);
  }
  const dim3 grid(static_cast<unsigned>(padded_rows / kFusedRows), static_cast<unsigned>(slicing.slices));
  launch_after_previous(kernel, grid, dim3(kFusedThreads), kSmem, stream, static_cast<const uint16_t*>(x), rows,
                        padded_rows, cols, ld_x, static_cast<const uint16_t*>(l.down), l.rank,
                        slicing.tiles_per_slice, l.values, l.ld_values, l.meta, l.workspace, mod,
                        static_cast<const float2*>(row_stats));
  launch_after_previous(low_rank_extension_kernel<kBf16, kCutlassBlockK, kRankTiles>,
                        dim3(static_cast<unsigned>(padded_rows / kLowRankExtensionRowsPerBlock<kRankTiles>)),
                        dim3(kLowRankExtensionThreads), 0, stream,
                        static_cast<const float*>(l.workspace), slicing.slices, rows, padded_rows, cols, l.rank,
                        l.k_ext, l.values, l.ld_values, l.meta, l.scale);
}

template <bool kBf16, int kCutlassBlockK, int kRankTiles>
void launch_low_rank_prologue(const void* x, int64_t rows, int64_t padded_rows, int64_t cols, int64_t ld_x,
                              const LowRankLaunch& l, cudaStream_t stream) {
  switch (l.prologue->kind) {
    case kPrologueLayerNormModulation:
      return launch_low_rank_tiles<kBf16, kCutlassBlockK, kRankTiles, kPrologueLayerNormModulation>(x, rows, padded_rows, cols, ld_x, l, stream);
    case kPrologueGeluTanh:
      return launch_low_rank_tiles<kBf16, kCutlassBlockK, kRankTiles, kPrologueGeluTanh>(x, rows, padded_rows, cols, ld_x, l, stream);
    default:
      return launch_low_rank_tiles<kBf16, kCutlassBlockK, kRankTiles, kPrologueNone>(x, rows, padded_rows, cols, ld_x, l, stream);
  }
}

template <bool kBf16, int kCutlassBlockK>
void launch_low_rank_layout(const void* x, int64_t rows, int64_t padded_rows, int64_t cols, int64_t ld_x,
                            const LowRankLaunch& l, cudaStream_t stream) {
  if (l.rank <= 16) {
    launch_low_rank_prologue<kBf16, kCutlassBlockK, 2>(x, rows, padded_rows, cols, ld_x, l, stream);
  } else {
    launch_low_rank_prologue<kBf16, kCutlassBlockK, 4>(x, rows, padded_rows, cols, ld_x, l, stream);
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

FusedSlicing fused_slicing(int64_t padded_rows, int64_t cols) {
  const int64_t slots = 2 * device_shape().sms;  // two blocks per SM (shared memory)
  const int64_t row_blocks = padded_rows / kFusedRows;
  const int64_t tiles = (cols + kFusedTileK - 1) / kFusedTileK;
  FusedSlicing best;
  int64_t best_cost = -1;
  for (int64_t wanted = 1; wanted <= tiles; ++wanted) {
    const int64_t per_slice = (tiles + wanted - 1) / wanted;
    const int64_t slices = (tiles + per_slice - 1) / per_slice;
    const int64_t waves = (row_blocks * slices + slots - 1) / slots;
    const int64_t cost = waves * per_slice;
    if (best_cost < 0 || cost < best_cost) {  // ties keep fewer slices (a smaller workspace)
      best_cost = cost;
      best.tiles_per_slice = per_slice;
      best.slices = slices;
    }
  }
  return best;
}

}  // namespace

int sparsify_split_for(int64_t padded_rows, int64_t cols) {
  // Two goals: at least one block per SM (small M), and the rows that two resident blocks per SM
  // read in the norm pass still in half the L2 when the write pass re-reads them (large K). A
  // warp covers 32 chunks of 32 columns per step: keep half its lanes busy.
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
                              float* scale, cudaStream_t stream, int split, int metadata_layout,
                              int64_t compressed_cols, const void* u, int64_t rank,
                              const SparsifyPrologue& prologue) {
  require(padded_rows % 64 == 0 && padded_rows >= rows, "sparsify: bad padded row count");
  require(cols % 32 == 0, "sparsify: columns must be a multiple of 32");
  require(metadata_layout == kMetadataCusparselt || metadata_layout == kMetadataSm90Block64 ||
              metadata_layout == kMetadataSm90Block128,
          "sparsify: unknown metadata layout ", metadata_layout);
  require(metadata_layout == kMetadataCusparselt || !fold_scale,
          "sparsify: the sm90 GEMM applies the scale in its epilogue; fold_scale is for cuSPARSELt");
  require(metadata_layout == kMetadataCusparselt || cols % metadata_layout == 0,
          "sparsify: columns must be a multiple of the metadata block ", metadata_layout);
  if (compressed_cols <= 0) compressed_cols = cols;
  require(compressed_cols == cols || (metadata_layout != kMetadataCusparselt && compressed_cols > cols &&
                                      compressed_cols % metadata_layout == 0),
          "sparsify: only the sm90 layouts take extra compressed columns");
  const SparsifyExtension ext{u, rank, compressed_cols - cols};
  require((ext.k_ext > 0) == (u != nullptr) && 2 * rank <= ext.k_ext,
          "sparsify: the K extension needs u, and k_ext >= 2 * rank (", ext.k_ext, " < 2 * ", rank, ")");
  auto* values = static_cast<uint16_t*>(compressed);
  // Values of compressed_cols / 2 per row, then the metadata.
  auto* meta = static_cast<uint8_t*>(compressed) + padded_rows * compressed_cols;
  const int64_t ld_values = compressed_cols / 2;
  require(!prologue.present() || (metadata_layout != kMetadataCusparselt && split <= 0),
          "sparsify: only the sm90 layouts' staged pass takes a prologue");
  if (metadata_layout != kMetadataCusparselt && split <= 0 &&
      launch_sparsify_staged(is_bf16, false, metadata_layout, x, rows, padded_rows, cols, ld_x, values, ld_values,
                             meta, scale, false, u, rank, ext.k_ext, prologue, stream)) {
    return;
  }
  if (split <= 0) split = sparsify_split_for(padded_rows, cols);
  require(split == 1 || split == 2 || split == 4 || split == 8, "sparsify: split must be 1, 2, 4 or 8");
  if (is_bf16) {
    launch_sparsify_layout<true>(metadata_layout, fold_scale, split, x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, ext, stream);
  } else {
    launch_sparsify_layout<false>(metadata_layout, fold_scale, split, x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, ext, stream);
  }
}

// The process-wide switches (see lynx_kernels.h), read at each launch.
namespace {
std::atomic<bool> low_rank_fusion_switch{true};
std::atomic<bool> staged_pass_switch{true};
std::atomic<bool> fast_gelu_switch{true};
std::atomic<bool> packed_e4m3_gelu_switch{false};
std::atomic<bool> programmatic_launch_switch{false};
}  // namespace

void set_sparsify_low_rank_fusion(bool enabled) { low_rank_fusion_switch.store(enabled); }
bool fast_gelu() { return fast_gelu_switch.load(); }
void set_fast_gelu(bool enabled) { fast_gelu_switch.store(enabled); }
bool packed_e4m3_gelu() { return packed_e4m3_gelu_switch.load(); }
void set_packed_e4m3_gelu(bool enabled) { packed_e4m3_gelu_switch.store(enabled); }
bool programmatic_launch() { return programmatic_launch_switch.load(); }
void set_programmatic_launch(bool enabled) { programmatic_launch_switch.store(enabled); }
void set_sparsify_staged_pass(bool enabled) { staged_pass_switch.store(enabled); }

bool sparsify_prologue_supported(int64_t padded_rows, int64_t cols) {
  return staged_threads_per_pair(padded_rows, cols) != 0;
}

bool sparsify_staged_pass(int64_t padded_rows, int64_t cols) {
  return staged_pass_switch.load() && staged_threads_per_pair(padded_rows, cols) != 0;
}

bool sparsify_low_rank_fused(int64_t rank) {
  return low_rank_fusion_switch.load() && rank >= 1 && rank <= kMaxFusedRank;
}

int64_t sparsify_low_rank_workspace_floats(int64_t padded_rows, int64_t cols) {
  // The slices' partial sums, then a (mean, rstd) pair per row for a LayerNorm prologue.
  return fused_slicing(padded_rows, cols).slices * padded_rows * FusedSmem<kMaxFusedRank / 8>::kPartialStride +
         2 * padded_rows;
}

void launch_sparsify_low_rank(const void* x, int64_t rows, int64_t padded_rows, int64_t cols, int64_t ld_x,
                              bool is_bf16, const void* down, int64_t rank, void* compressed,
                              int64_t compressed_cols, float* scale, int metadata_layout, float* workspace,
                              cudaStream_t stream, const SparsifyPrologue& prologue) {
  require(padded_rows % 64 == 0 && padded_rows >= rows, "sparsify: bad padded row count");
  require(metadata_layout == kMetadataSm90Block64 || metadata_layout == kMetadataSm90Block128,
          "sparsify: the low-rank extension is for the sm90 layouts");
  require(cols % metadata_layout == 0 && compressed_cols > cols && compressed_cols % metadata_layout == 0,
          "sparsify: columns and the K extension must be multiples of the metadata block ", metadata_layout);
  require(rank >= 1 && rank <= kMaxFusedRank && 2 * rank <= compressed_cols - cols && compressed_cols - cols <= 256,
          "sparsify: rank ", rank, " does not fit the fused down projection or the K extension");
  require(workspace != nullptr, "sparsify: the fused pass needs its workspace");
  require(ld_x % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(down) % 16 == 0,
          "sparsify: x and down need 16-byte aligned rows");
  if (prologue.kind == kPrologueLayerNormModulation) {
    require(prologue.shift != nullptr && prologue.scale1p != nullptr && prologue.tokens >= 1 && rows % prologue.tokens == 0 &&
                reinterpret_cast<uintptr_t>(prologue.shift) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(prologue.scale1p) % 16 == 0,
            "sparsify: the LayerNorm + modulation needs 16-byte aligned shift / scale1p and whole images");
  }
  const LowRankLaunch launch{down, rank, compressed_cols - cols, static_cast<uint16_t*>(compressed),
                             compressed_cols / 2, static_cast<uint8_t*>(compressed) + padded_rows * compressed_cols,
                             scale, workspace, &prologue};
  if (is_bf16) {
    if (metadata_layout == kMetadataSm90Block64) {
      launch_low_rank_layout<true, 64>(x, rows, padded_rows, cols, ld_x, launch, stream);
    } else {
      launch_low_rank_layout<true, 128>(x, rows, padded_rows, cols, ld_x, launch, stream);
    }
  } else if (metadata_layout == kMetadataSm90Block64) {
    launch_low_rank_layout<false, 64>(x, rows, padded_rows, cols, ld_x, launch, stream);
  } else {
    launch_low_rank_layout<false, 128>(x, rows, padded_rows, cols, ld_x, launch, stream);
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
template <int kSplit>
struct Fp8RowPair {
  static constexpr int kPairsPerBlock = 8 / kSplit;
  static constexpr int64_t kStride = 32 * kSplit;  // chunks between a lane's steps
  int pair_in_block, split;
  int64_t r0, r1;
  bool has_r0, has_r1;  // rows past `rows` read as zeros
  const uint4* x0;
  const uint4* x1;
  uint4* v0;
  uint4* v1;
  uint8_t* meta_row;  // cuSPARSELt layout: the pair's 16-byte word of chunk 0, 512 bytes apart
  int64_t first;      // this lane's first 64-column chunk

  __device__ __forceinline__ Fp8RowPair(const uint16_t* x, int64_t rows, int64_t cols,
                                        int64_t ld_x, uint8_t* values, uint8_t* meta) {
    pair_in_block = threadIdx.y / kSplit;
    split = threadIdx.y % kSplit;
    const int64_t block_row = int64_t(blockIdx.x) / kSplit * 16;
    const int row_in_8 = int(blockIdx.x % kSplit) * kPairsPerBlock + pair_in_block;
    r0 = block_row + row_in_8;
    r1 = r0 + 8;
    has_r0 = r0 < rows;
    has_r1 = r1 < rows;
    x0 = reinterpret_cast<const uint4*>(x + (has_r0 ? r0 : 0) * ld_x);
    x1 = reinterpret_cast<const uint4*>(x + (has_r1 ? r1 : 0) * ld_x);
    v0 = reinterpret_cast<uint4*>(values + r0 * (cols / 2));
    v1 = reinterpret_cast<uint4*>(values + r1 * (cols / 2));
    meta_row = meta + (block_row / 64) * 8 * cols + ((block_row % 64) / 16) * 128 + row_in_8 * 16;
    first = int64_t(split) * 32 + threadIdx.x;
  }
};

// Loads and selects one 32-column half (`half` = 2 * chunk + h) of both rows. codes0/codes1:
// the 8 group codes of each row as nibbles, group g at bits 4g (bytes in metadata order).
template <bool kBf16, int kSplit>
__device__ __forceinline__ void select_pair_half(const Fp8RowPair<kSplit>& pair, int64_t half,
                                                 uint4 (&out0)[2], uint4 (&out1)[2],
                                                 uint32_t& codes0, uint32_t& codes1,
                                                 PairStats& stats) {
  uint4 in0[4], in1[4];
  uint32_t c0[8], c1[8];
  load_chunk<kBf16>(pair.x0, pair.has_r0, half, in0);
  load_chunk<kBf16>(pair.x1, pair.has_r1, half, in1);
  select_chunk<kBf16>(in0, out0, c0, stats.dense0, stats.kept0);
  select_chunk<kBf16>(in1, out1, c1, stats.dense1, stats.kept1);
  stats.amax0 = max(stats.amax0, max_abs_bits(out0[0], out0[1]));
  stats.amax1 = max(stats.amax1, max_abs_bits(out1[0], out1[1]));
  codes0 = codes1 = 0;
#pragma unroll
  for (int g = 0; g < 8; ++g) {
    codes0 |= c0[g] << (4 * g);
    codes1 |= c1[g] << (4 * g);
  }
}

// Chunk c's metadata from the nibble words of select_pair_half ([h] = half h): byte j of a
// row's 64 columns is byte j % 4 of word j / 4.
// kCutlass: CUTLASS's sm90 e4m3 metadata layout (atom 64 x 128, sm90_metadata_layout.h) instead
// of cuSPARSELt's.
template <bool kCutlass, int kSplit>
__device__ __forceinline__ void store_pair_metadata(const Fp8RowPair<kSplit>& pair,
                                                    const uint32_t (&codes0)[2],
                                                    const uint32_t (&codes1)[2], int64_t c,
                                                    uint8_t* meta, int64_t padded_rows) {
  if constexpr (kCutlass) {
    // Each row's 64 columns are 8 neighbouring bytes. The byte offset is a column part plus a
    // row part (the row parts stay out of the loop).
    uint8_t* column = meta + sm90_metadata_byte_8bit(0, c * 64, padded_rows, 128);
    *reinterpret_cast<uint64_t*>(column + sm90_metadata_byte_8bit(pair.r0, 0, padded_rows, 128)) =
        codes0[0] | (uint64_t(codes0[1]) << 32);
    *reinterpret_cast<uint64_t*>(column + sm90_metadata_byte_8bit(pair.r1, 0, padded_rows, 128)) =
        codes1[0] | (uint64_t(codes1[1]) << 32);
  } else {
    // Word w: row bytes w and w + 4 of r and r+8, interleaved (r, r+8, r, r+8).
    uint32_t words[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int shift = 8 * w;
      words[w] = ((codes0[0] >> shift) & 0xffu) | (((codes1[0] >> shift) & 0xffu) << 8) |
                 (((codes0[1] >> shift) & 0xffu) << 16) | (((codes1[1] >> shift) & 0xffu) << 24);
    }
    *reinterpret_cast<uint4*>(pair.meta_row + c * 512) = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

// 448 / m, the factor that maps a row's largest |value| m onto e4m3's largest finite value; 0 for
// a zero row. Capped at FLT_MAX: for m below 448 / FLT_MAX (16-bit subnormals) the quotient is
// inf, and a zero entry times inf would be NaN (reference._quantize_rows_e4m3 caps it the same way).
__device__ __forceinline__ float inverse_scale(float m) {
  return m > 0.f ? fminf(__fdiv_rn(448.f, m), FLT_MAX) : 0.f;
}

// One token's quantisation: returns 448 / max|x_kept| (0 for a zero token), which maps the
// largest kept value onto e4m3's largest finite value, and sets the dequantisation scale
// a = s * max|x_kept| / 448 (the compensation s cancels in q and only enters a).
template <bool kBf16>
__device__ __forceinline__ float fp8_row_scales(float dense_sq, float kept_sq, uint32_t amax_bits, bool compensate,
                                                float& dequant_scale) {
  const float m = bits_to_float<kBf16>(amax_bits);
  const float s = compensate ? token_scale_of(dense_sq, kept_sq) : 1.f;
  dequant_scale = __fdiv_rn(__fmul_rn(s, m), 448.f);
  return inverse_scale(m);
}

// Reduces the lanes' stats over the warp, then over the pair's kSplit warps (through shared
// memory, the same order in every warp: identical sums); lane 0 of split 0 writes the
// dequantisation scales. Returns 448 / max|kept| of rows r0 and r1.
template <bool kBf16, int kSplit>
__device__ __forceinline__ float2 finish_pair_stats(const Fp8RowPair<kSplit>& pair,
                                                    PairStats s, float* token_scale,
                                                    bool compensate) {
  reduce_pair_stats<kSplit, true>(s, threadIdx.y, pair.pair_in_block * kSplit);
  float a0, a1;
  const float inv0 = fp8_row_scales<kBf16>(s.dense0, s.kept0, s.amax0, compensate, a0);
  const float inv1 = fp8_row_scales<kBf16>(s.dense1, s.kept1, s.amax1, compensate, a1);
  if (pair.split == 0 && threadIdx.x == 0) {
    token_scale[pair.r0] = a0;
    token_scale[pair.r1] = a1;
  }
  return make_float2(inv0, inv1);
}

// ---------------------------------------------------------------------------------------------
// The staged pass's prologues (the math above, PrologueArgs) on a row pair in registers.

// Sums two floats over the kWarps warps of a row pair: shuffles, then shared memory read in a
// fixed order, so every thread of the pair gets identical sums. `partial`: the call site's own
// block-shared array (8 warps a block).
template <int kWarps>
__device__ __forceinline__ float2 pair_sum(float2 v, int warp, int first, float (*partial)[2]) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, offset);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, offset);
  }
  if constexpr (kWarps > 1) {
    if (threadIdx.x % 32 == 0) {
      partial[warp][0] = v.x;
      partial[warp][1] = v.y;
    }
    __syncthreads();
    v = make_float2(0.f, 0.f);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      v.x += partial[first + w][0];
      v.y += partial[first + w][1];
    }
  }
  return v;
}

// Replaces a staged row pair (kUnits 16-column units per row and thread, zeros past the row and
// for rows past the matrix) by its normalised and modulated values. Mean first, then the sum of
// squares about it (the rows are in registers, so the second pass is free and exact where
// sum(x^2) - n * mean^2 would cancel). Rows past the matrix stay zero.
template <bool kBf16, int kUnits, int kThreadsPerPair>
__device__ __forceinline__ void modulate_staged_pair(uint4 (&in0)[kUnits][2], uint4 (&in1)[kUnits][2], int t,
                                                     int units, int64_t cols, int64_t r0, int64_t r1, bool has_r0,
                                                     bool has_r1, const PrologueArgs& mod, int warp, int first) {
  constexpr int kWarps = kThreadsPerPair / 32;
  __shared__ float sum_partial[8][2], square_partial[8][2];
  float2 sum = make_float2(0.f, 0.f);
#pragma unroll
  for (int j = 0; j < kUnits; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      sum.x += sum_of_8<kBf16>(in0[j][h]);
      sum.y += sum_of_8<kBf16>(in1[j][h]);
    }
  }
  sum = pair_sum<kWarps>(sum, warp, first, sum_partial);
  const float n = float(cols);
  const float mean0 = __fdiv_rn(sum.x, n), mean1 = __fdiv_rn(sum.y, n);
  float2 squares = make_float2(0.f, 0.f);
#pragma unroll
  for (int j = 0; j < kUnits; ++j) {
    if (t + j * kThreadsPerPair >= units) break;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      squares.x += centered_squares_of_8<kBf16>(in0[j][h], mean0);
      squares.y += centered_squares_of_8<kBf16>(in1[j][h], mean1);
    }
  }
  squares = pair_sum<kWarps>(squares, warp, first, square_partial);
  const float rstd0 = rsqrtf(__fdiv_rn(squares.x, n) + mod.eps), rstd1 = rsqrtf(__fdiv_rn(squares.y, n) + mod.eps);
  const int64_t image0 = has_r0 ? r0 / mod.tokens : 0, image1 = has_r1 ? r1 / mod.tokens : 0;
  const uint4* shift0 = reinterpret_cast<const uint4*>(mod.shift + image0 * cols);
  const uint4* scale0 = reinterpret_cast<const uint4*>(mod.scale1p + image0 * cols);
  const uint4* shift1 = reinterpret_cast<const uint4*>(mod.shift + image1 * cols);
  const uint4* scale1 = reinterpret_cast<const uint4*>(mod.scale1p + image1 * cols);
#pragma unroll
  for (int j = 0; j < kUnits; ++j) {
    const int unit = t + j * kThreadsPerPair;
    if (unit >= units) break;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (has_r0) in0[j][h] = modulate_8<kBf16>(in0[j][h], __ldg(shift0 + 2 * unit + h), __ldg(scale0 + 2 * unit + h), mean0, rstd0);
      if (has_r1) in1[j][h] = modulate_8<kBf16>(in1[j][h], __ldg(shift1 + 2 * unit + h), __ldg(scale1 + 2 * unit + h), mean1, rstd1);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The sm90 sparsify pass with the rows in registers (16-bit values or e4m3). A row pair (r,
// r + 8: they share metadata words) is spread over kThreadsPerPair threads; each holds up to
// kStagedUnits 16-column units of both rows, all loaded before any is used, so a thread keeps
// 4 x kStagedUnits 16-byte loads in flight. For e4m3 it reads x once without staging the kept
// values in shared memory, 11-13% faster than the chunk loop's fp8 kernel; for 16-bit values
// both run at about the copy-bandwidth floor (H200, bench/NOTES.md).
// Norms (and max|x_kept| for e4m3) reduce over the pair's warps through shared memory in a fixed
// order: the sums do not depend on timing. 16-bit values and all metadata are written as soon as
// a unit is selected; e4m3 values once the row's max|x_kept| is known, from registers.
// A unit of one row: 2 x 16-byte loads in, 8 kept values (16 bytes, or 8 e4m3 bytes) and 4 codes
// out: one 4-byte metadata word for the pair in the 16-bit layout, 2 bytes per row in the 8-bit one.
constexpr int kStagedUnits = 4;
constexpr int kStagedThreads = 256;

// kPrologue: the producer's work done on the row pair first (SparsifyPrologue).
template <bool kBf16, bool kE4m3, int kBlockK, int kThreadsPerPair, int kPrologue>
__global__ void __launch_bounds__(kStagedThreads, 2) sparsify_staged_kernel(
    const uint16_t* __restrict__ x, int64_t rows, int64_t padded_rows, int64_t cols, int64_t ld_x,
    void* __restrict__ values, int64_t ld_values, uint8_t* __restrict__ meta, float* __restrict__ scale,
    bool compensate, const uint16_t* __restrict__ u, int64_t rank, int64_t k_ext, PrologueArgs prologue) {
  allow_next_grid_launch();
  wait_for_previous_grid();
  static_assert(kThreadsPerPair % 32 == 0 && kStagedThreads % kThreadsPerPair == 0, "whole warps per pair");
  static_assert(!kE4m3 || kBlockK == 128, "the e4m3 GEMM's metadata atom is 128 columns");
  constexpr int kPairsPerBlock = kStagedThreads / kThreadsPerPair;
  constexpr int kWarpsPerPair = kThreadsPerPair / 32;
  const int t = int(threadIdx.x) % kThreadsPerPair;
  const int pair_in_block = int(threadIdx.x) / kThreadsPerPair;
  const int64_t pair = int64_t(blockIdx.x) * kPairsPerBlock + pair_in_block;
  const int64_t r0 = pair / 8 * 16 + pair % 8, r1 = r0 + 8;
  const bool has_r0 = r0 < rows, has_r1 = r1 < rows;
  const uint4* x0 = reinterpret_cast<const uint4*>(x + (has_r0 ? r0 : 0) * ld_x);
  const uint4* x1 = reinterpret_cast<const uint4*>(x + (has_r1 ? r1 : 0) * ld_x);
  const int units = int(cols / 16);
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

  uint4 in0[kStagedUnits][2], in1[kStagedUnits][2];
#pragma unroll
  for (int j = 0; j < kStagedUnits; ++j) {
    const int unit = t + j * kThreadsPerPair;
    const bool live = unit < units;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      in0[j][h] = live && has_r0 ? __ldg(x0 + 2 * unit + h) : zero;
      in1[j][h] = live && has_r1 ? __ldg(x1 + 2 * unit + h) : zero;
    }
  }
  if constexpr (kPrologue == kPrologueLayerNormModulation) {
    modulate_staged_pair<kBf16, kStagedUnits, kThreadsPerPair>(in0, in1, t, units, cols, r0, r1, has_r0, has_r1,
                                                               prologue, int(threadIdx.x) / 32,
                                                               pair_in_block * kWarpsPerPair);
  }

  // The metadata byte offsets are a row part plus a column part (sm90_metadata_layout.h).
  const int64_t meta_row0 = kE4m3 ? sm90_metadata_byte_8bit(r0, 0, padded_rows, 128)
                                  : sm90_metadata_byte_16bit(r0, 0, padded_rows, kBlockK);
  const int64_t meta_row1 = kE4m3 ? sm90_metadata_byte_8bit(r1, 0, padded_rows, 128) : 0;
  PairStats stats;
  uint4 kept_values[kStagedUnits][2];  // e4m3: the kept 16-bit values until the scale is known
#pragma unroll
  for (int j = 0; j < kStagedUnits; ++j) {
    const int unit = t + j * kThreadsPerPair;
    if (unit >= units) break;
    uint4 v0, v1;
    if constexpr (kPrologue == kPrologueGeluTanh) {
      // Unit by unit, as it is selected: all units at once keep too many tanh in flight (spills).
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        in0[j][h] = gelu_tanh_8<kBf16>(in0[j][h], prologue.gelu_mode);
        in1[j][h] = gelu_tanh_8<kBf16>(in1[j][h], prologue.gelu_mode);
      }
    }
    const uint32_t codes0 = select_16<kBf16>(in0[j], v0, stats.dense0, stats.kept0);
    const uint32_t codes1 = select_16<kBf16>(in1[j], v1, stats.dense1, stats.kept1);
    const int64_t col = 16 * int64_t(unit);
    if constexpr (kE4m3) {
      kept_values[j][0] = v0;
      kept_values[j][1] = v1;
      stats.amax0 = max(stats.amax0, max_abs_bits(v0, zero));
      stats.amax1 = max(stats.amax1, max_abs_bits(v1, zero));
      uint8_t* column = meta + sm90_metadata_byte_8bit(0, col, padded_rows, 128);
      *reinterpret_cast<uint16_t*>(column + meta_row0) = uint16_t(codes0);
      *reinterpret_cast<uint16_t*>(column + meta_row1) = uint16_t(codes1);
    } else {
      auto* out = static_cast<uint16_t*>(values);
      *reinterpret_cast<uint4*>(out + r0 * ld_values + col / 2) = v0;
      *reinterpret_cast<uint4*>(out + r1 * ld_values + col / 2) = v1;
      *reinterpret_cast<uint32_t*>(meta + meta_row0 + sm90_metadata_byte_16bit(0, col, padded_rows, kBlockK)) =
          codes0 | (codes1 << 16);
    }
  }

  reduce_pair_stats<kWarpsPerPair, kE4m3>(stats, int(threadIdx.x) / 32, pair_in_block * kWarpsPerPair);

  if constexpr (kE4m3) {
    float a0, a1;
    const float inv0 = fp8_row_scales<kBf16>(stats.dense0, stats.kept0, stats.amax0, compensate, a0);
    const float inv1 = fp8_row_scales<kBf16>(stats.dense1, stats.kept1, stats.amax1, compensate, a1);
    if (t == 0) {
      scale[r0] = a0;
      scale[r1] = a1;
    }
    auto* out = static_cast<uint8_t*>(values);
#pragma unroll
    for (int j = 0; j < kStagedUnits; ++j) {
      const int unit = t + j * kThreadsPerPair;
      if (unit >= units) break;
      const uint4 k0 = kept_values[j][0], k1 = kept_values[j][1];
      *reinterpret_cast<uint2*>(out + r0 * ld_values + 8 * int64_t(unit)) =
          make_uint2(quantize_pair<kBf16>(k0.x, inv0) | (quantize_pair<kBf16>(k0.y, inv0) << 16),
                     quantize_pair<kBf16>(k0.z, inv0) | (quantize_pair<kBf16>(k0.w, inv0) << 16));
      *reinterpret_cast<uint2*>(out + r1 * ld_values + 8 * int64_t(unit)) =
          make_uint2(quantize_pair<kBf16>(k1.x, inv1) | (quantize_pair<kBf16>(k1.y, inv1) << 16),
                     quantize_pair<kBf16>(k1.z, inv1) | (quantize_pair<kBf16>(k1.w, inv1) << 16));
    }
  } else {
    const float s0 = scale != nullptr ? token_scale_of(stats.dense0, stats.kept0) : 1.f;
    const float s1 = scale != nullptr ? token_scale_of(stats.dense1, stats.kept1) : 1.f;
    if (scale != nullptr && t == 0) {
      scale[r0] = s0;
      scale[r1] = s1;
    }
    if (u != nullptr && t < 32) {
      auto* out = static_cast<uint16_t*>(values);
      write_k_extension<kBf16, kBlockK>(u, rank, k_ext, cols, padded_rows, r0, has_r0, s0, t, out, ld_values, meta);
      write_k_extension<kBf16, kBlockK>(u, rank, k_ext, cols, padded_rows, r1, has_r1, s1, t, out, ld_values, meta);
    }
  }
}

// Threads per row pair of the staged pass for this shape (0: the row is longer than
// kStagedThreads threads hold, use the chunk loop): the fewest that hold the row, doubled while
// the grid has fewer than two blocks per SM (short inputs, e.g. a 512-token text stream).
int staged_threads_per_pair(int64_t padded_rows, int64_t cols) {
  const int64_t units = cols / 16;
  int threads = 32;
  while (threads < kStagedThreads && threads * kStagedUnits < units) threads *= 2;
  if (threads * kStagedUnits < units) return 0;
  const int64_t min_blocks = 2 * device_shape().sms;
  while (threads < kStagedThreads && padded_rows / 2 * threads / kStagedThreads < min_blocks) threads *= 2;
  return threads;
}

template <bool kBf16, bool kE4m3, int kBlockK, int kThreadsPerPair, int kPrologue>
void launch_staged_variant(const void* x, int64_t rows, int64_t padded_rows, int64_t cols, int64_t ld_x,
                           void* values, int64_t ld_values, uint8_t* meta, float* scale, bool compensate,
                           const void* u, int64_t rank, int64_t k_ext, const PrologueArgs& prologue,
                           cudaStream_t stream) {
  const int64_t blocks = padded_rows / 2 / (kStagedThreads / kThreadsPerPair);
  require(blocks <= 0x7fffffff, "sparsify: too many rows for one launch");
  launch_after_previous(sparsify_staged_kernel<kBf16, kE4m3, kBlockK, kThreadsPerPair, kPrologue>,
                        dim3(static_cast<unsigned>(blocks)), dim3(kStagedThreads), 0, stream,
                        static_cast<const uint16_t*>(x), rows, padded_rows, cols, ld_x, values, ld_values, meta, scale,
                        compensate, static_cast<const uint16_t*>(u), rank, k_ext, prologue);
}

template <bool kBf16, bool kE4m3, int kBlockK, int kPrologue>
void launch_staged_threads(int threads_per_pair, const void* x, int64_t rows, int64_t padded_rows, int64_t cols,
                           int64_t ld_x, void* values, int64_t ld_values, uint8_t* meta, float* scale,
                           bool compensate, const void* u, int64_t rank, int64_t k_ext,
                           const PrologueArgs& prologue, cudaStream_t stream) {
  switch (threads_per_pair) {
    case 32: return launch_staged_variant<kBf16, kE4m3, kBlockK, 32, kPrologue>(x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, compensate, u, rank, k_ext, prologue, stream);
    case 64: return launch_staged_variant<kBf16, kE4m3, kBlockK, 64, kPrologue>(x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, compensate, u, rank, k_ext, prologue, stream);
    case 128: return launch_staged_variant<kBf16, kE4m3, kBlockK, 128, kPrologue>(x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, compensate, u, rank, k_ext, prologue, stream);
    default: return launch_staged_variant<kBf16, kE4m3, kBlockK, 256, kPrologue>(x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, compensate, u, rank, k_ext, prologue, stream);
  }
}

template <bool kBf16, bool kE4m3, int kBlockK>
void launch_staged(int threads_per_pair, const void* x, int64_t rows, int64_t padded_rows, int64_t cols,
                   int64_t ld_x, void* values, int64_t ld_values, uint8_t* meta, float* scale, bool compensate,
                   const void* u, int64_t rank, int64_t k_ext, const SparsifyPrologue& prologue,
                   cudaStream_t stream) {
  const PrologueArgs args{static_cast<const uint16_t*>(prologue.shift), static_cast<const uint16_t*>(prologue.scale1p),
                          prologue.tokens, prologue.eps, gelu_mode_for(kE4m3)};
  switch (prologue.kind) {
    case kPrologueLayerNormModulation:
      return launch_staged_threads<kBf16, kE4m3, kBlockK, kPrologueLayerNormModulation>(
          threads_per_pair, x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, compensate, u, rank, k_ext,
          args, stream);
    case kPrologueGeluTanh:
      return launch_staged_threads<kBf16, kE4m3, kBlockK, kPrologueGeluTanh>(
          threads_per_pair, x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, compensate, u, rank, k_ext,
          args, stream);
    default:
      return launch_staged_threads<kBf16, kE4m3, kBlockK, kPrologueNone>(
          threads_per_pair, x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, compensate, u, rank, k_ext,
          args, stream);
  }
}

bool launch_sparsify_staged(bool is_bf16, bool e4m3, int metadata_layout, const void* x, int64_t rows,
                            int64_t padded_rows, int64_t cols, int64_t ld_x, void* values, int64_t ld_values,
                            uint8_t* meta, float* scale, bool compensate, const void* u, int64_t rank,
                            int64_t k_ext, const SparsifyPrologue& prologue, cudaStream_t stream) {
  const int threads = staged_threads_per_pair(padded_rows, cols);
  if (prologue.present()) {
    // Only the staged pass takes a prologue: it runs whatever the switch says.
    require(prologue.kind == kPrologueLayerNormModulation || prologue.kind == kPrologueGeluTanh,
            "sparsify: unknown prologue ", prologue.kind);
    require(threads != 0, "sparsify: a row of ", cols, " columns with a prologue is longer than the staged pass holds");
    require(u == nullptr, "sparsify: a pass with a prologue takes no low-rank extension");
  } else if (!staged_pass_switch.load() || threads == 0) {
    return false;
  }
  if (e4m3) {
    if (is_bf16) launch_staged<true, true, 128>(threads, x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, compensate, u, rank, k_ext, prologue, stream);
    else launch_staged<false, true, 128>(threads, x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, compensate, u, rank, k_ext, prologue, stream);
  } else if (metadata_layout == kMetadataSm90Block64) {
    if (is_bf16) launch_staged<true, false, 64>(threads, x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, compensate, u, rank, k_ext, prologue, stream);
    else launch_staged<false, false, 64>(threads, x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, compensate, u, rank, k_ext, prologue, stream);
  } else {
    if (is_bf16) launch_staged<true, false, 128>(threads, x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, compensate, u, rank, k_ext, prologue, stream);
    else launch_staged<false, false, 128>(threads, x, rows, padded_rows, cols, ld_x, values, ld_values, meta, scale, compensate, u, rank, k_ext, prologue, stream);
  }
  return true;
}

// Reads x once. Pass 1 selects, writes the metadata and stages the kept 16-bit values in
// shared memory (dynamic, fp8_staged_bytes: cols bytes per row); pass 2 quantises them from
// there once max|kept| is known. A lane reads back only what it staged: no barrier between the
// passes. Per row pair, 8 planes (row, half, 16-byte word) of `chunks` words, so the lanes of a
// warp (consecutive chunks) touch consecutive words: no bank conflicts.
// Two blocks per SM, as the staged shared memory allows (kFp8StagedPerBlock).
template <bool kBf16, int kSplit, bool kCutlass>
__global__ void __launch_bounds__(256, 2) sparsify_fp8_kernel(
    const uint16_t* __restrict__ x, int64_t rows, int64_t padded_rows, int64_t cols, int64_t ld_x,
    uint8_t* __restrict__ values, uint8_t* __restrict__ meta, float* __restrict__ token_scale,
    bool compensate) {
  allow_next_grid_launch();
  wait_for_previous_grid();
  extern __shared__ uint4 fp8_staged_kept[];
  const Fp8RowPair<kSplit> pair(x, rows, cols, ld_x, values, meta);
  const int chunks = int(cols / 64);  // small: the staged rows fit in shared memory
  const int first = int(pair.first);
  constexpr int kStride = int(Fp8RowPair<kSplit>::kStride);
  uint4* staged = fp8_staged_kept + pair.pair_in_block * 8 * chunks;

  PairStats stats;
#pragma unroll 1
  for (int c = first; c < chunks; c += kStride) {
    uint32_t codes0[2], codes1[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 out0[2], out1[2];
      select_pair_half<kBf16>(pair, 2 * c + h, out0, out1, codes0[h], codes1[h], stats);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        staged[(2 * h + i) * chunks + c] = out0[i];
        staged[(4 + 2 * h + i) * chunks + c] = out1[i];
      }
    }
    store_pair_metadata<kCutlass>(pair, codes0, codes1, c, meta, padded_rows);
  }
  const float2 inv = finish_pair_stats<kBf16>(pair, stats, token_scale, compensate);

#pragma unroll 1
  for (int c = first; c < chunks; c += kStride) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint4 kept0[2] = {staged[(2 * h) * chunks + c], staged[(2 * h + 1) * chunks + c]};
      const uint4 kept1[2] = {staged[(4 + 2 * h) * chunks + c], staged[(5 + 2 * h) * chunks + c]};
      pair.v0[c * 2 + h] = quantize_half_chunk<kBf16>(kept0, inv.x);
      pair.v1[c * 2 + h] = quantize_half_chunk<kBf16>(kept1, inv.y);
    }
  }
}

// Fallback for rows too long to stage (launch_fp8_variant): pass 1 only reads (stats), pass 2
// re-reads x (mostly from L2) and writes values and metadata.
template <bool kBf16, int kSplit, bool kCutlass>
__global__ void __launch_bounds__(256) sparsify_fp8_two_pass_kernel(
    const uint16_t* __restrict__ x, int64_t rows, int64_t padded_rows, int64_t cols, int64_t ld_x,
    uint8_t* __restrict__ values, uint8_t* __restrict__ meta, float* __restrict__ token_scale,
    bool compensate) {
  allow_next_grid_launch();
  wait_for_previous_grid();
  const Fp8RowPair<kSplit> pair(x, rows, cols, ld_x, values, meta);
  const int64_t chunks = cols / 64;
  constexpr int64_t kStride = Fp8RowPair<kSplit>::kStride;

  PairStats stats;
  for (int64_t c = pair.first; c < chunks; c += kStride) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 out0[2], out1[2];
      uint32_t codes0, codes1;
      select_pair_half<kBf16>(pair, 2 * c + h, out0, out1, codes0, codes1, stats);
    }
  }
  const float2 inv = finish_pair_stats<kBf16>(pair, stats, token_scale, compensate);

  PairStats unused;
  for (int64_t c = pair.first; c < chunks; c += kStride) {
    uint32_t codes0[2], codes1[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 out0[2], out1[2];
      select_pair_half<kBf16>(pair, 2 * c + h, out0, out1, codes0[h], codes1[h], unused);
      pair.v0[c * 2 + h] = quantize_half_chunk<kBf16>(out0, inv.x);
      pair.v1[c * 2 + h] = quantize_half_chunk<kBf16>(out1, inv.y);
    }
    store_pair_metadata<kCutlass>(pair, codes0, codes1, c, meta, padded_rows);
  }
}

// Shared memory the one-pass kernel stages per block: 16 / split rows, each cols/2 kept 16-bit
// values.
int64_t fp8_staged_bytes(int64_t cols, int split) { return 16 / split * cols; }

// Staged bytes per block that still let two blocks share the 228 KB of an H100/H200 SM;
// sparsify_fp8_split_for splits longer rows.
constexpr int64_t kFp8StagedPerBlock = 100 * 1024;

// Lets `kernel` launch with `bytes` of dynamic shared memory on this device, or returns false
// if the opt-in limit (227 KB per block on H100/H200, static shared memory included) is too low.
template <typename Kernel>
bool reserve_dynamic_smem(Kernel* kernel, int64_t bytes) {
  int device = 0, optin = 0;
  cudaFuncAttributes attributes{};
  require(cudaGetDevice(&device) == cudaSuccess &&
              cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) ==
                  cudaSuccess &&
              cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess,
          "sparsify_fp8: cannot query the shared memory limits");
  if (bytes + int64_t(attributes.sharedSizeBytes) > optin) return false;
  if (bytes > attributes.maxDynamicSharedSizeBytes) {  // 48 KB less static by default
    const cudaError_t status = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    require(status == cudaSuccess, "sparsify_fp8: cannot reserve ", bytes,
            " bytes of shared memory: ", cudaGetErrorString(status));
  }
  return true;
}

// The one-pass kernel when a block's rows fit in shared memory (H100/H200: cols <= 14,528 at
// split 1, 28,992 at 2, 58,048 at 4, 116,096 at 8), else the two-pass one.
template <bool kBf16, int kSplit, bool kCutlass>
void launch_fp8_variant(const void* x, int64_t rows, int64_t padded_rows, int64_t cols,
                        int64_t ld_x, uint8_t* values, uint8_t* meta, float* token_scale,
                        bool compensate, cudaStream_t stream) {
  const int64_t blocks = padded_rows / 16 * kSplit;
  require(blocks <= 0x7fffffff, "sparsify_fp8: too many rows for one launch");
  const auto grid = static_cast<unsigned>(blocks);
  const auto* xs = static_cast<const uint16_t*>(x);
  auto* one_pass = sparsify_fp8_kernel<kBf16, kSplit, kCutlass>;
  const int64_t staged = fp8_staged_bytes(cols, kSplit);
  if (reserve_dynamic_smem(one_pass, staged)) {
    launch_after_previous(one_pass, grid, dim3(32, 8), static_cast<size_t>(staged), stream, xs, rows, padded_rows,
                          cols, ld_x, values, meta, token_scale, compensate);
  } else {
    launch_after_previous(sparsify_fp8_two_pass_kernel<kBf16, kSplit, kCutlass>, grid, dim3(32, 8), 0, stream, xs,
                          rows, padded_rows, cols, ld_x, values, meta, token_scale, compensate);
  }
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
  // x is read once, so no L2 re-read to protect (unlike sparsify_split_for): fill the chip, and
  // split long rows until two blocks' staged values share an SM. A warp covers 32 chunks of 64
  // columns per step: keep half its lanes busy.
  const DeviceShape device = device_shape();
  const int64_t groups = padded_rows / 16;
  const int64_t chunks = cols / 64;
  int split = 1;
  while (split < 8 && chunks / (2 * split) >= 8 &&
         (groups * split < device.sms || fp8_staged_bytes(cols, split) > kFp8StagedPerBlock)) {
    split *= 2;
  }
  return split;
}

void launch_sparsify_fp8(const void* x, int64_t rows, int64_t padded_rows, int64_t cols,
                         int64_t ld_x, bool is_bf16, bool compensate, void* compressed,
                         float* token_scale, cudaStream_t stream, int split, int metadata_layout,
                         const SparsifyPrologue& prologue) {
  require(padded_rows % 64 == 0 && padded_rows >= rows, "sparsify_fp8: bad padded row count");
  require(cols % 64 == 0, "sparsify_fp8: columns must be a multiple of 64");
  require(metadata_layout == kMetadataCusparselt || metadata_layout == kMetadataSm90Block128,
          "sparsify_fp8: unknown metadata layout ", metadata_layout);
  const bool cutlass = metadata_layout == kMetadataSm90Block128;
  require(!cutlass || cols % 128 == 0, "sparsify_fp8: columns must be a multiple of 128 for the sm90 GEMM");
  require(token_scale != nullptr, "sparsify_fp8: token_scale is required");
  auto* values = static_cast<uint8_t*>(compressed);
  auto* meta = values + padded_rows * cols / 2;
  require(!prologue.present() || (cutlass && split <= 0), "sparsify_fp8: only the sm90 layout's staged pass takes a prologue");
  if (cutlass && split <= 0 &&
      launch_sparsify_staged(is_bf16, true, metadata_layout, x, rows, padded_rows, cols, ld_x, values, cols / 2, meta,
                             token_scale, compensate, nullptr, 0, 0, prologue, stream)) {
    return;
  }
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

// ---------------------------------------------------------------------------------------------
// Dense e4m3 rows, for the layers an fp8 model keeps dense: q = e4m3(x * (448 / max|x|)) per row
// and a = max|x| / 448 (0 for a zero row), as reference.quantize_rows_fp8. With a GELU tail
// (kGeluTail) the row is [x row, gelu_tanh(tail row)], the input of FLUX's single-block linear2,
// so neither the activation nor the concatenation is written. A block works on one row at a time,
// held in registers (x is read once), and walks rows gridDim.x apart with the next row's loads in
// flight (cp.async into shared memory) while it computes this one: a block per row loaded, then
// computed, then stored, so its memory and arithmetic time added up (fast GELU: 88 us for FLUX's
// linear2 input, its memory time 44 us, its arithmetic about 38 us).
namespace {

template <bool kBf16, bool kGeluTail>
__global__ void __launch_bounds__(kQuantizeMaxThreads)
    quantize_rows_e4m3_kernel(const uint4* __restrict__ x, int64_t ld_vecs, int head_vecs,
                              const uint4* __restrict__ tail, int64_t ld_tail_vecs, int vecs_per_row, int64_t rows,
                              uint2* __restrict__ q, float* __restrict__ dequant_scale, int gelu_mode) {
  extern __shared__ uint4 staged_rows[];   // two rows: [buffer * vecs_per_row + vector]
  __shared__ uint32_t warp_max[2][kQuantizeMaxThreads / 32];
  allow_next_grid_launch();
  wait_for_previous_grid();
  const uint4 zero = make_uint4(0, 0, 0, 0);
  // This thread's vectors of `row` into `buffer`: one commit group (empty past the last row). A
  // thread reads only the vectors it copied itself, so their landing needs no barrier; refilling a
  // buffer the turn after it was read is safe because the row's barrier below comes between (the
  // reads feed the row's max before it).
  auto stage = [&](int64_t row, int buffer) {
    if (row < rows) {
      const uint4* x_row = x + row * ld_vecs;
      const uint4* tail_row = kGeluTail ? tail + row * ld_tail_vecs : nullptr;
#pragma unroll
      for (int i = 0; i < kQuantizeVecsPerThread; ++i) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < vecs_per_row) {
          const uint4* from = kGeluTail && c >= head_vecs ? tail_row + (c - head_vecs) : x_row + c;
          cp_async_16(reinterpret_cast<uint16_t*>(staged_rows + buffer * vecs_per_row + c),
                      reinterpret_cast<const uint16_t*>(from), true);
        }
      }
    }
    cp_async_commit();
  };
  int64_t row = blockIdx.x;
  stage(row, 0);
  for (int turn = 0; row < rows; ++turn, row += gridDim.x) {
    const int buffer = turn & 1;
    stage(row + gridDim.x, buffer ^ 1);
    cp_async_wait<1>();   // this thread's vectors of `row` have landed
    uint4 v[kQuantizeVecsPerThread];
    uint32_t amax = 0;
#pragma unroll
    for (int i = 0; i < kQuantizeVecsPerThread; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      v[i] = c < vecs_per_row ? staged_rows[buffer * vecs_per_row + c] : zero;
      if (kGeluTail && c >= head_vecs && c < vecs_per_row) v[i] = gelu_tanh_8<kBf16>(v[i], gelu_mode);
      amax = max(amax, max_abs_bits(v[i], zero));
    }
    // The row's max over its warps: every thread reads all warps' maxima. warp_max alternates with
    // the turns: a thread reads this turn's entries before it reaches the next turn's barrier, which
    // the writers of the turn after must pass first.
    amax = __reduce_max_sync(0xffffffffu, amax);
    if (threadIdx.x % 32 == 0) warp_max[buffer][threadIdx.x / 32] = amax;
    __syncthreads();
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) amax = max(amax, warp_max[buffer][w]);
    const float m = bits_to_float<kBf16>(amax);
    const float inv = inverse_scale(m);
    if (threadIdx.x == 0) dequant_scale[row] = __fdiv_rn(m, 448.f);
    uint2* q_row = q + row * vecs_per_row;
#pragma unroll
    for (int i = 0; i < kQuantizeVecsPerThread; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      if (c < vecs_per_row) {
        q_row[c] = make_uint2(quantize_pair<kBf16>(v[i].x, inv) | (quantize_pair<kBf16>(v[i].y, inv) << 16),
                              quantize_pair<kBf16>(v[i].z, inv) | (quantize_pair<kBf16>(v[i].w, inv) << 16));
      }
    }
  }
}

template <bool kBf16, bool kGeluTail>
void launch_quantize_rows_variant(const uint4* x, int64_t ld_vecs, int head_vecs, const uint4* tail,
                                  int64_t ld_tail_vecs, int vecs, int64_t rows, uint2* q, float* dequant_scale,
                                  cudaStream_t stream) {
  auto* kernel = quantize_rows_e4m3_kernel<kBf16, kGeluTail>;
  // As many threads as put at most kQuantizeVecsPerThread vectors on each, whole warps; two rows
  // of shared memory (at most 128 KB); as many blocks as fit on the chip, each walking its rows.
  const int threads = std::max(32, (vecs + kQuantizeVecsPerThread * 32 - 1) / (kQuantizeVecsPerThread * 32) * 32);
  const int smem = 2 * vecs * static_cast<int>(sizeof(uint4));
  // The widest row's two buffers, the same on every launch (per device, and no race between host
  // threads quantising rows of different widths).
  constexpr int kMaxSmem = 2 * static_cast<int>(kQuantizeMaxCols / 8 * sizeof(uint4));
  const cudaError_t configured = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmem);
  require(configured == cudaSuccess, "quantize_rows_fp8: ", kMaxSmem, " bytes of shared memory refused: ",
          cudaGetErrorString(configured));
  int per_sm = 0;
  require(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) == cudaSuccess,
          "quantize_rows_fp8: cannot query the occupancy");
  const int64_t blocks = std::min<int64_t>(rows, int64_t(std::max(per_sm, 1)) * device_shape().sms);
  launch_after_previous(kernel, dim3(static_cast<unsigned>(blocks)), dim3(threads), static_cast<size_t>(smem), stream, x,
                        ld_vecs, head_vecs, tail, ld_tail_vecs, vecs, rows, q, dequant_scale, gelu_mode_for(true));
}

template <bool kBf16>
void launch_quantize_rows_dtype(const uint4* x, int64_t ld_vecs, int head_vecs, const uint4* tail,
                                int64_t ld_tail_vecs, int vecs, int64_t rows, uint2* q, float* dequant_scale,
                                cudaStream_t stream) {
  if (tail != nullptr) {
    launch_quantize_rows_variant<kBf16, true>(x, ld_vecs, head_vecs, tail, ld_tail_vecs, vecs, rows, q, dequant_scale,
                                              stream);
  } else {
    launch_quantize_rows_variant<kBf16, false>(x, ld_vecs, head_vecs, nullptr, 0, vecs, rows, q, dequant_scale,
                                               stream);
  }
}

// [a row, gelu_tanh(b row)] per row, 16-bit in and out: the concatenation FLUX's single block
// feeds its linear2, written once. Every thread loads its kCatVecsPerThread vectors, then
// converts and stores them.
constexpr int kCatThreads = 256;
constexpr int kCatVecsPerThread = 4;

template <bool kBf16>
__global__ void __launch_bounds__(kCatThreads)
    cat_gelu_tanh_kernel(const uint4* __restrict__ a, int64_t ld_a_vecs, int a_vecs, const uint4* __restrict__ b,
                         int64_t ld_b_vecs, int row_vecs, int64_t total_vecs, uint4* __restrict__ out,
                         int gelu_mode) {
  const int64_t stride = int64_t(gridDim.x) * kCatThreads;
  for (int64_t first = int64_t(blockIdx.x) * kCatThreads + threadIdx.x; first < total_vecs;
       first += stride * kCatVecsPerThread) {
    uint4 v[kCatVecsPerThread];
    bool activated[kCatVecsPerThread];
#pragma unroll
    for (int j = 0; j < kCatVecsPerThread; ++j) {
      const int64_t i = first + j * stride;
      activated[j] = false;
      if (i < total_vecs) {
        const int64_t row = i / row_vecs;
        const int c = static_cast<int>(i - row * row_vecs);
        activated[j] = c >= a_vecs;
        v[j] = activated[j] ? b[row * ld_b_vecs + (c - a_vecs)] : a[row * ld_a_vecs + c];
      }
    }
#pragma unroll
    for (int j = 0; j < kCatVecsPerThread; ++j) {
      const int64_t i = first + j * stride;
      if (i < total_vecs) out[i] = activated[j] ? gelu_tanh_8<kBf16>(v[j], gelu_mode) : v[j];
    }
  }
}

void require_rows(const void* x, int64_t ld, int64_t cols, const char* what) {
  require(cols % 8 == 0 && cols >= 8, what, ": columns must be a positive multiple of 8, got ", cols);
  require(ld % 8 == 0 && ld >= cols && reinterpret_cast<uintptr_t>(x) % 16 == 0, what,
          ": rows must be 16-byte aligned");
}

}  // namespace

void launch_quantize_rows_fp8(const void* x, int64_t rows, int64_t cols, int64_t ld_x, bool is_bf16, void* q,
                              float* dequant_scale, cudaStream_t stream, const void* gelu_tail, int64_t tail_cols,
                              int64_t ld_tail) {
  require_rows(x, ld_x, cols, "quantize_rows_fp8");
  if (gelu_tail != nullptr) require_rows(gelu_tail, ld_tail, tail_cols, "quantize_rows_fp8 (GELU tail)");
  const int64_t total_cols = cols + (gelu_tail != nullptr ? tail_cols : 0);
  require(total_cols <= kQuantizeMaxCols, "quantize_rows_fp8: at most ", kQuantizeMaxCols, " columns, got ",
          total_cols);
  if (rows == 0) return;
  const auto* xv = static_cast<const uint4*>(x);
  const auto* tv = static_cast<const uint4*>(gelu_tail);
  const int head_vecs = static_cast<int>(cols / 8), vecs = static_cast<int>(total_cols / 8);
  auto* qv = static_cast<uint2*>(q);
  if (is_bf16) {
    launch_quantize_rows_dtype<true>(xv, ld_x / 8, head_vecs, tv, ld_tail / 8, vecs, rows, qv, dequant_scale, stream);
  } else {
    launch_quantize_rows_dtype<false>(xv, ld_x / 8, head_vecs, tv, ld_tail / 8, vecs, rows, qv, dequant_scale, stream);
  }
}

void launch_cat_gelu_tanh(const void* a, int64_t ld_a, int64_t a_cols, const void* b, int64_t ld_b, int64_t b_cols,
                          int64_t rows, bool is_bf16, void* out, cudaStream_t stream) {
  require_rows(a, ld_a, a_cols, "cat_gelu_tanh (a)");
  require_rows(b, ld_b, b_cols, "cat_gelu_tanh (b)");
  require(reinterpret_cast<uintptr_t>(out) % 16 == 0, "cat_gelu_tanh: out must be 16-byte aligned");
  require(a_cols + b_cols <= 0x7fffffff, "cat_gelu_tanh: rows too long");
  const int row_vecs = static_cast<int>((a_cols + b_cols) / 8);
  const int64_t total = rows * row_vecs;
  if (total == 0) return;
  // Enough blocks to keep every SM busy; each thread covers kCatVecsPerThread vectors per round.
  const int64_t wanted = (total + int64_t(kCatThreads) * kCatVecsPerThread - 1) / (int64_t(kCatThreads) * kCatVecsPerThread);
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(wanted, 65535));
  const auto* av = static_cast<const uint4*>(a);
  const auto* bv = static_cast<const uint4*>(b);
  auto* ov = static_cast<uint4*>(out);
  const int a_vecs = static_cast<int>(a_cols / 8);
  if (is_bf16) {
    cat_gelu_tanh_kernel<true><<<blocks, kCatThreads, 0, stream>>>(av, ld_a / 8, a_vecs, bv, ld_b / 8, row_vecs, total, ov,
                                                                    gelu_mode_for(false));
  } else {
    cat_gelu_tanh_kernel<false><<<blocks, kCatThreads, 0, stream>>>(av, ld_a / 8, a_vecs, bv, ld_b / 8, row_vecs, total, ov,
                                                                     gelu_mode_for(false));
  }
}

}  // namespace rt_lynx
