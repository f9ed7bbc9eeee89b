// y = x @ (w * w_scale)^T + bias for a few rows of 16-bit x and an e4m3 weight (N x K, one fp32
// scale per output channel): the per-image linears of an fp8 model (FLUX's and Qwen-Image's block
// modulations, Z-Image's adaLN), whose one or two input rows make the product a read of the weight.
// Reading it in e4m3 halves that read; x stays in 16 bits (no activation quantisation).
//
// A block copies x (rows x K, at most 8 rows and kGemvMaxSharedBytes) into shared memory once and its warps each
// compute kGemvChannelsPerWarp consecutive output channels: every lane reads 16 weight bytes per
// step, kGemvUnroll steps in flight, converts them to fp32 (cvt e4m3x2 -> f16x2, exact), and keeps
// one fp32 sum per row; the warp's sums reduce by shuffles in a fixed order (deterministic), then
// y[r, n] = sum * w_scale[n] + bias[n], rounded once to x's dtype. A warp's first weight loads of
// all its channels are issued before x is staged, so a block waits one memory latency, not one
// for x and one per channel after it (with one or two input rows the product is that read).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "half_words.cuh"
#include "lynx_kernels.h"
#include "programmatic_launch.cuh"

namespace rt_lynx {
namespace {

// 6 loads of 16 bytes a lane cover a 3072-column row (FLUX's, Qwen-Image's) in one turn, so a warp has
// both its channels (6 KB) in flight at once; a 9216-channel layer makes 576 blocks. Registers (74 at
// one row, 80 at two, 124 at eight; no spills, ptxas sm_90a) allow 3 blocks of 8 warps per SM at one
// or two rows: 144 KB of weight in flight per SM. Each block copies x again (from L2): at one row 6 KB
// against its 48 KB of weight.
constexpr int kGemvWarps = 8;
constexpr int kGemvChannelsPerWarp = 2;
constexpr int kGemvUnroll = 6;        // 16-byte weight loads a lane has in flight per channel
constexpr int kGemvStep = 32 * 16;    // weight columns a warp reads per step
constexpr int64_t kGemvColumnsPerTurn = int64_t(kGemvStep) * kGemvUnroll;

// A lane's kGemvUnroll 16-byte weight loads of one turn (columns from `base`), zeros past k.
__device__ __forceinline__ void load_turn(const uint8_t* w_row, int64_t base, int64_t k, int lane,
                                          uint4 (&loaded)[kGemvUnroll]) {
#pragma unroll
  for (int u = 0; u < kGemvUnroll; ++u) {   // every load issued before the first is used
    const int64_t col = base + int64_t(u) * kGemvStep + lane * 16;
    loaded[u] = col < k ? __ldcs(reinterpret_cast<const uint4*>(w_row + col)) : make_uint4(0, 0, 0, 0);
  }
}

// Two e4m3 bytes (the low 16 bits of `pair`) as two floats: e4m3 -> f16 is exact.
__device__ __forceinline__ float2 e4m3x2_to_float2(uint32_t pair) {
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair & 0xffffu), __NV_E4M3);
  return __half22float2(*reinterpret_cast<const __half2*>(&raw));
}

// sum[r] += dot(16 weights in `w`, x_shared row r at column k) for every row.
template <bool kBf16, int kRows>
__device__ __forceinline__ void accumulate16(const uint4& w, const uint16_t* x_shared, int k_stride, int k,
                                             float (&sum)[kRows]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  float wf[16];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 lo = e4m3x2_to_float2(words[i]);
    const float2 hi = e4m3x2_to_float2(words[i] >> 16);
    wf[4 * i] = lo.x, wf[4 * i + 1] = lo.y, wf[4 * i + 2] = hi.x, wf[4 * i + 3] = hi.y;
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const uint4* xr = reinterpret_cast<const uint4*>(x_shared + r * k_stride + k);
    const uint4 a = xr[0], b = xr[1];
    const uint32_t xw[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    float s = sum[r];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float2 xv = word_to_floats<kBf16>(xw[i]);
      s = fmaf(wf[2 * i], xv.x, s);
      s = fmaf(wf[2 * i + 1], xv.y, s);
    }
    sum[r] = s;
  }
}

template <bool kBf16, int kRows>
__global__ void __launch_bounds__(kGemvWarps * 32)
e4m3_weight_gemv_kernel(const uint16_t* __restrict__ x, int64_t ld_x, const uint8_t* __restrict__ w, int64_t k,
                        int64_t n, const float* __restrict__ w_scale, const uint16_t* __restrict__ bias,
                        uint16_t* __restrict__ y, int64_t ld_y) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  uint16_t* x_shared = reinterpret_cast<uint16_t*>(shared_bytes);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t first_channel = (int64_t(blockIdx.x) * kGemvWarps + warp) * kGemvChannelsPerWarp;
  allow_next_grid_launch();
  wait_for_previous_grid();
  // The first turn of every channel of this warp in flight while x is staged.
  uint4 loaded[kGemvChannelsPerWarp][kGemvUnroll];
#pragma unroll
  for (int c = 0; c < kGemvChannelsPerWarp; ++c) {
    const int64_t channel = first_channel + c;
    load_turn(w + (channel < n ? channel : 0) * k, 0, channel < n ? k : 0, lane, loaded[c]);
  }
  // x into shared memory, 16 bytes at a time (rows 16-byte aligned: the op checks).
  const int64_t vectors_per_row = k / 8;
  for (int64_t i = threadIdx.x; i < kRows * vectors_per_row; i += blockDim.x) {
    const int64_t r = i / vectors_per_row, v = i % vectors_per_row;
    reinterpret_cast<uint4*>(x_shared + r * k)[v] = reinterpret_cast<const uint4*>(x + r * ld_x)[v];
  }
  __syncthreads();

#pragma unroll
  for (int c = 0; c < kGemvChannelsPerWarp; ++c) {
    const int64_t channel = first_channel + c;
    if (channel >= n) {
      break;
    }
    const uint8_t* w_row = w + channel * k;
    float sum[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      sum[r] = 0.f;
    }
    for (int64_t base = 0; base < k; base += kGemvColumnsPerTurn) {
      if (base > 0) {   // rows past one turn (K > 3072): the later turns load here
        load_turn(w_row, base, k, lane, loaded[c]);
      }
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) {
        const int64_t col = base + int64_t(u) * kGemvStep + lane * 16;
        if (col < k) {
          accumulate16<kBf16, kRows>(loaded[c][u], x_shared, static_cast<int>(k), static_cast<int>(col), sum);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], offset);
      }
    }
    if (lane < kRows) {
      float value = 0.f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {   // lane r writes row r (a register array, read by a constant index)
        value = lane == r ? sum[r] : value;
      }
      float out = value * w_scale[channel];
      if (bias != nullptr) {
        out += bits_to_float<kBf16>(bias[channel]);
      }
      y[lane * ld_y + channel] = static_cast<uint16_t>(float_to_bits<kBf16>(out));
    }
  }
}

template <bool kBf16, int kRows>
void launch_rows(const void* x, int64_t ld_x, const void* w, int64_t k, int64_t n, const float* w_scale,
                 const void* bias, void* y, int64_t ld_y, cudaStream_t stream) {
  const int64_t channels_per_block = int64_t(kGemvWarps) * kGemvChannelsPerWarp;
  const dim3 grid(static_cast<unsigned>((n + channels_per_block - 1) / channels_per_block));
  const size_t shared = size_t(kRows) * size_t(k) * sizeof(uint16_t);
  launch_after_previous(e4m3_weight_gemv_kernel<kBf16, kRows>, grid, dim3(kGemvWarps * 32), shared, stream,
                        static_cast<const uint16_t*>(x), ld_x, static_cast<const uint8_t*>(w), k, n, w_scale,
                        static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(y), ld_y);
}

template <bool kBf16>
void launch_typed(int rows, const void* x, int64_t ld_x, const void* w, int64_t k, int64_t n, const float* w_scale,
                  const void* bias, void* y, int64_t ld_y, cudaStream_t stream) {
  switch (rows) {
    case 1: return launch_rows<kBf16, 1>(x, ld_x, w, k, n, w_scale, bias, y, ld_y, stream);
    case 2: return launch_rows<kBf16, 2>(x, ld_x, w, k, n, w_scale, bias, y, ld_y, stream);
    case 3: return launch_rows<kBf16, 3>(x, ld_x, w, k, n, w_scale, bias, y, ld_y, stream);
    case 4: return launch_rows<kBf16, 4>(x, ld_x, w, k, n, w_scale, bias, y, ld_y, stream);
    case 5: return launch_rows<kBf16, 5>(x, ld_x, w, k, n, w_scale, bias, y, ld_y, stream);
    case 6: return launch_rows<kBf16, 6>(x, ld_x, w, k, n, w_scale, bias, y, ld_y, stream);
    case 7: return launch_rows<kBf16, 7>(x, ld_x, w, k, n, w_scale, bias, y, ld_y, stream);
    default: return launch_rows<kBf16, 8>(x, ld_x, w, k, n, w_scale, bias, y, ld_y, stream);
  }
}

}  // namespace

void launch_e4m3_weight_gemv(const void* x, int64_t rows, int64_t ld_x, bool is_bf16, const void* w, int64_t k,
                             int64_t n, const float* w_scale, const void* bias, void* y, int64_t ld_y,
                             cudaStream_t stream) {
  const int r = static_cast<int>(rows);
  if (is_bf16) {
    launch_typed<true>(r, x, ld_x, w, k, n, w_scale, bias, y, ld_y, stream);
  } else {
    launch_typed<false>(r, x, ld_x, w, k, n, w_scale, bias, y, ld_y, stream);
  }
}

}  // namespace rt_lynx
