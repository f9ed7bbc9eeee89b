// 16-bit floats (bf16 or fp16, picked by kBf16) to and from fp32, one value or the two of a 32-bit
// word, for the kernels that read and write raw 16-bit words.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace rt_lynx {

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

// The two 16-bit floats of a 32-bit word as floats (bf16: the halves' bits moved into place).
template <bool kBf16>
__device__ __forceinline__ float2 word_to_floats(uint32_t word) {
  if constexpr (kBf16) {
    return make_float2(__uint_as_float(word << 16), __uint_as_float(word & 0xffff0000u));
  } else {
    return make_float2(bits_to_float<false>(word & 0xffffu), bits_to_float<false>(word >> 16));
  }
}

}  // namespace rt_lynx
