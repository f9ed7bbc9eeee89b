// RT-Lynx sm90a sparse GEMM library: a C interface with no torch in it, so that the CUTLASS
// kernels (slow to compile) build once per CUDA toolkit and survive torch upgrades. The torch
// extension loads it with dlopen (kernels/build.py builds both).
//
//   D[m, n] = out( row_scale[m] * col_scale[n] * (sum_k A[m, k] B[n, k] + sum_j A[m, k + j] B_ext[n, j])
//                  + bias[n] )
//
// A is the 2:4-sparse activation matrix (M x K logical) in CUTLASS's sm90 compressed form:
// values M x K/2 row-major (the two kept entries of each group of 4, in column order) and
// metadata in the layout of sm90_metadata_layout.h. B is the weight, N x K row-major (what
// nn.Linear stores). The scales and the bias are applied in the GEMM's epilogue: the output is
// written once. The optional K extension (k_ext more columns of A times B_ext) is how a low-rank
// branch joins the same accumulators (sm90_k_extended_mainloop.cuh). row_scale == nullptr means
// 1; col_scale is for e4m3 inputs only (per output channel weight scale), nullptr means 1;
// bias == nullptr means 0. With a residual (a DiT block's gated residual around the linear):
//
//   D[m, n] = out( residual[m, n] + gate[n] * (the product above before its rounding) )
//
// gate == nullptr means 1.
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RT_LYNX_SM90_API_VERSION 5

enum RtLynxElement { RT_LYNX_BF16 = 0, RT_LYNX_FP16 = 1, RT_LYNX_E4M3 = 2 };

typedef struct {
  int tile_m, tile_n, tile_k;   // tile_k in logical (uncompressed) columns
  int cluster_m, cluster_n;
  int pingpong;                 // 1: ping-pong schedule, 0: cooperative
  int metadata_block_k;         // K extent of one metadata atom (the writer needs it)
  int overlap;                  // 1: a k-tile's MMAs still run while the next k-tile's issue
} RtLynxSm90Config;

typedef struct {
  int in_element;               // RtLynxElement of A and B
  int out_element;              // RT_LYNX_BF16 or RT_LYNX_FP16; the bias has this type too
  int config;                   // index < rt_lynx_sm90_config_count(in_element)
  int64_t m, n, k;              // k logical; m any >= 1; n % 16 == 0; k % 128 == 0
  int64_t k_ext;                // extra logical columns of A that multiply b_ext (0: none; % 128 == 0)
  const void* a_values;         // m x (k + k_ext)/2
  const void* a_metadata;       // round_up(m, 64) * (k + k_ext) / 8 bytes
  const void* b;                // n x k row-major
  const void* b_ext;            // n x b_ext_cols row-major, in_element (nullptr when k_ext == 0)
  int64_t b_ext_cols;           // stored columns of b_ext, <= k_ext, % 8 == 0 (the rest read as 0)
  void* d;                      // m x n row-major, out_element
  const float* row_scale;       // m floats or nullptr
  const float* col_scale;       // n floats or nullptr (e4m3 only)
  const void* bias;             // n values of out_element or nullptr
  void* workspace;              // rt_lynx_sm90_workspace_bytes(...) bytes
  int sm_count;                 // multiprocessors of the device (0: queried)
  cudaStream_t stream;
  int programmatic_launch;      // 1: may start while the previous kernel in the stream ends (it waits
                                // for that kernel before its first load), 0: a plain launch
  const void* residual;         // m x n row-major out_element, 16-byte aligned, or nullptr (none)
  const void* gate;             // n values of out_element or nullptr (only with a residual)
} RtLynxSm90Gemm;

int rt_lynx_sm90_api_version(void);
int rt_lynx_sm90_config_count(int in_element);
// 0 on success; fills *config.
int rt_lynx_sm90_config_info(int in_element, int config, RtLynxSm90Config* info);
size_t rt_lynx_sm90_workspace_bytes(const RtLynxSm90Gemm* gemm);
// 0 on success, else nonzero with a one-line reason in error (may be nullptr).
int rt_lynx_sm90_gemm(const RtLynxSm90Gemm* gemm, char* error, size_t error_size);
// Compares the metadata byte formula of sm90_metadata_layout.h with the layout CUTLASS's sparse
// config builds for this config (host only, every coordinate of an m x k matrix). 0 if equal.
int rt_lynx_sm90_check_metadata_layout(int in_element, int config, int64_t m, int64_t k,
                                       char* error, size_t error_size);

#ifdef __cplusplus
}
#endif
