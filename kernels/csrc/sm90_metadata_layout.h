// Where CUTLASS's sm90 sparse GEMM reads the 2:4 metadata of row m, column k (logical).
//
// One 4-bit code per group of 4 columns, i0 | i1 << 2 (the kept positions, i0 < i1); a byte
// holds the codes of two neighbouring groups (low nibble: the group at k % 8 < 4). The byte
// offset follows CUTLASS's Sm90GemmSparseConfig::fill_layoutE with rows padded to 64 and a
// metadata atom of block_k columns (min(tile K, 128), so it depends on the GEMM config):
//  - 16-bit inputs: atom 64 rows x block_k columns, rows and 16-column halves interleaved so that
//    rows r and r + 8 of one 32-column chunk share a 4-byte word;
//  - 8-bit inputs: atom 64 rows x block_k columns, row-major.
// The formulas are checked against CuTe's layout at start-up (rt_lynx_sm90_check_metadata_layout).
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define RT_LYNX_HD __host__ __device__ __forceinline__
#else
#define RT_LYNX_HD inline
#endif

namespace rt_lynx {

RT_LYNX_HD int64_t sm90_metadata_byte_16bit(int64_t m, int64_t k, int64_t padded_rows, int block_k) {
  const int num_k = block_k / 32;
  const int64_t k2 = (k / 32) % num_k, k1 = (k / 16) % 2;
  const int64_t m0 = m % 8, m1 = (m / 8) % 2, m2 = (m / 16) % 4;
  return (k % 16) / 8 + 2 * m1 + 4 * k2 + 4 * num_k * m0 + 32 * num_k * k1 + 64 * num_k * m2 +
         256 * num_k * (m / 64) + padded_rows * 4 * num_k * (k / block_k);
}

RT_LYNX_HD int64_t sm90_metadata_byte_8bit(int64_t m, int64_t k, int64_t padded_rows, int block_k) {
  return (k % block_k) / 8 + (block_k / 8) * (m % 64) + 8 * int64_t(block_k) * (m / 64) +
         padded_rows * (block_k / 8) * (k / block_k);
}

// Nibble (0 low, 1 high) of column k's group inside its byte.
RT_LYNX_HD int sm90_metadata_nibble(int64_t k) { return int((k % 8) / 4); }

}  // namespace rt_lynx
