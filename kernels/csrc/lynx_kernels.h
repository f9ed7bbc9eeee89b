// Launchers for the RT-Lynx CUDA kernels (lynx_kernels.cu), called from cusparselt_ext.cpp.
#pragma once
#include <c10/core/ScalarType.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace rt_lynx {

// Error checks that build their message without iostreams: in this extension, formatting an
// integer through std::ostream (as TORCH_CHECK does) crashed inside the loaded libstdc++ on the
// H100 machine, so messages are concatenated by hand. torch turns std::runtime_error into a
// Python RuntimeError.
inline std::string message_piece(const char* text) { return text; }
inline std::string message_piece(const std::string& text) { return text; }
inline std::string message_piece(c10::ScalarType type) { return c10::toString(type); }
inline std::string message_piece(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.3g", value);
  return buffer;
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string message_piece(T value) {
  return std::to_string(value);
}

template <typename... Parts>
inline void require(bool ok, const Parts&... parts) {
  if (ok) return;
  std::string message;
  ((message += message_piece(parts)), ...);
  throw std::runtime_error(message);
}

// Metadata layouts the sparsify kernels write: cuSPARSELt's, or CUTLASS's sm90 layout with a
// metadata atom of 64 or 128 columns (the value is the atom width; sm90_metadata_layout.h).
constexpr int kMetadataCusparselt = 0;
constexpr int kMetadataSm90Block64 = 64;
constexpr int kMetadataSm90Block128 = 128;

// Elementwise work of the producer of x that the sm90 layouts' staged sparsify pass does on the
// rows it holds, before the 2:4 selection, so that what the producer would write is never written:
// - kPrologueLayerNormModulation, a DiT block's input to a linear: each row of x is
//   layer-normalised without affine, xn = (x - mean) * rsqrt(var + eps) rounded to x's dtype
//   (what the model's LayerNorm writes), then modulated per image, x' = xn * scale1p + shift in
//   one fp32 multiply-add rounded once (torch.addcmul). shift and scale1p: (rows / tokens) x cols
//   in x's dtype, contiguous, 16-byte aligned; row r uses their row r / tokens.
// - kPrologueGeluTanh, an MLP's activation before its down projection: x' = gelu(x) with the tanh
//   approximation (see set_fast_gelu for how), rounded to x's dtype.
// Rows must fit the staged pass (sparsify_prologue_supported); no low-rank extension.
constexpr int kPrologueNone = 0;
constexpr int kPrologueLayerNormModulation = 1;
constexpr int kPrologueGeluTanh = 2;
struct SparsifyPrologue {
  int kind = kPrologueNone;
  const void* shift = nullptr;
  const void* scale1p = nullptr;
  int64_t tokens = 1;
  float eps = 0.f;
  bool present() const { return kind != kPrologueNone; }
};
bool sparsify_prologue_supported(int64_t padded_rows, int64_t cols);

// Reads x (rows x cols, row stride ld_x elements, 16-bit floats); writes the compressed buffer
// of the 2:4-sparsified matrix padded to padded_rows (values, row-major, then metadata in
// `metadata_layout`; rows*cols*9/16 elements either way).
// fold_scale: values are round(s * x_kept) with s = ||x|| / ||x_kept|| per row (read twice);
// else the kept values unchanged. scale (padded_rows floats, may be nullptr) receives s.
// split: warps per row pair (1, 2, 4, 8), <= 0 picks one from the shape and the SM count.
// compressed_cols (sm90 layouts only, 0 = cols): the compressed buffer is that many logical
// columns wide (values compressed_cols/2 per row); columns from cols on are the K extension of the
// sm90 GEMM: u (rows x rank, x's dtype, contiguous) divided by the token scale as 2:4 groups
// [u0 u1 0 0], so that the GEMM's epilogue scale restores u (sm90_k_extended_mainloop.cuh).
void launch_sparsify_compress(const void* x, int64_t rows, int64_t padded_rows, int64_t cols,
                              int64_t ld_x, bool is_bf16, bool fold_scale, void* compressed,
                              float* scale, cudaStream_t stream, int split = 0,
                              int metadata_layout = kMetadataCusparselt, int64_t compressed_cols = 0,
                              const void* u = nullptr, int64_t rank = 0,
                              const SparsifyPrologue& prologue = {});

// The split launch_sparsify_compress picks for split <= 0.
int sparsify_split_for(int64_t padded_rows, int64_t cols);

// The same pass for the sm90 layouts with a Lynx LoRA: also computes u = x down^T (down: rank x
// cols, x's dtype, contiguous) on tensor cores from the same read of x, and writes u / s into the
// K extension (compressed_cols - cols columns), as launch_sparsify_compress does with a given u.
// The token scale goes to `scale` when compensating (nullptr: s = 1). rank <= kMaxFusedRank.
// Two kernels: the pass over slices of K, then the sum of the slices' partial sums
// (workspace: sparsify_low_rank_workspace_floats floats, no initialisation needed). A prologue
// applies to x's tiles before both the selection and the down projection; a LayerNorm one first
// takes each row's mean and rstd in a small kernel of its own (the slices need them up front).
constexpr int64_t kMaxFusedRank = 32;  // two 16-column rank halves a block
int64_t sparsify_low_rank_workspace_floats(int64_t padded_rows, int64_t cols);
void launch_sparsify_low_rank(const void* x, int64_t rows, int64_t padded_rows, int64_t cols, int64_t ld_x,
                              bool is_bf16, const void* down, int64_t rank, void* compressed,
                              int64_t compressed_cols, float* scale, int metadata_layout, float* workspace,
                              cudaStream_t stream, const SparsifyPrologue& prologue = {});

// Whether the sm90 path computes down(x) inside the sparsify pass (launch_sparsify_low_rank) for
// this rank; else cuBLAS computes u first. On by default: on the FLUX shapes at rank 32 the fused
// pass beats the plain pass plus cuBLAS's product in eager time on every shape (H200,
// bench/NOTES.md). Process-wide, for benchmarks and tests that compare both on the same data.
bool sparsify_low_rank_fused(int64_t rank);
void set_sparsify_low_rank_fusion(bool enabled);

// How every GELU of these kernels (the sparsify prologue, the quantise pass's tail, cat_gelu_tanh)
// is computed. On (the default): as x / (1 + exp(-2u)) on the hardware exp2 and a fast division:
// within one 16-bit ulp of torch's result, plus up to |x| 2^-21 in the negative tail where torch's
// 1 + tanh(u) cancels (see gelu_tanh_bits); a 2:4 selection or an e4m3 rounding follows it, each
// far coarser. Off: in fp32 in torch's order with its accurate tanhf, torch's result bit for bit,
// at about three times the instructions, more than these passes' memory time. Read at each launch
// (a captured CUDA graph keeps the setting it was captured with); process-wide, for benchmarks and
// tests that compare with torch's bits.
bool fast_gelu();
void set_fast_gelu(bool enabled);

// The GELUs of the passes whose output is e4m3 (the fp8 sparsify pass's prologue, the fp8 quantise
// pass's tail) in x's packed 16-bit type with the hardware's packed tanh: one special-function
// operation per two values instead of two per value, for passes whose GELU costs more than their
// memory time. Within 2% of the value (bf16; 1% in f16), |x| 2^-8 where 1 + tanh(u) cancels, against
// e4m3's rounding of up to 6% (gelu_tanh_packed_word). Measured on an H100 (bench/NOTES.md): the fp8
// sparsify pass with a GELU prologue 81 -> 64 us at FLUX's MLP input, the quantise pass with a GELU
// tail unchanged, a compiled FLUX fp8 step 0.6% faster, a bf16 product 0.7% further from fp32 math
// (in quadrature). Off by default for that trade; needs the fast GELU (off, torch's bits win). Read
// at each launch like set_fast_gelu.
bool packed_e4m3_gelu();
void set_packed_e4m3_gelu(bool enabled);

// Programmatic dependent launch (sm90; off by default, see sm90.programmatic_launch): the sparse
// GEMM (RtLynxSm90Gemm.programmatic_launch), the sparsify passes, the quantise pass, the e4m3-weight
// GEMV and the q/k norm + RoPE pass are launched so that they may start while the kernel before them
// in the stream ends (each waits for it before touching memory), and each of ours lets the next
// launch begin at its own start: the GEMM's set-up overlaps the pass's last blocks instead of
// following them (programmatic_launch.cuh). Read at each launch (a captured CUDA
// graph keeps what it was captured with); process-wide, for benchmarks and tests that compare both.
bool programmatic_launch();
void set_programmatic_launch(bool enabled);

// The sm90 layouts' pass (launch_sparsify_compress without a split, launch_sparsify_fp8 with
// kMetadataSm90Block128) keeps each row pair in registers, loaded all at once, when the row
// fits (cols <= 16384); else, or when switched off, it loops over 32/64-column chunks (e4m3:
// staging the kept values in shared memory). Whether the staged pass runs for this shape; the
// switch is process-wide, for benchmarks and tests.
bool sparsify_staged_pass(int64_t padded_rows, int64_t cols);
void set_sparsify_staged_pass(bool enabled);

// y[r, c] = out_dtype(float(gemm[r, c]) * scale[r] + bias[c]) for r < rows; scale and bias may be
// nullptr. gemm and y may be the same buffer. bias_is_float selects fp32 bias, else x's dtype.
void launch_scale_bias_epilogue(const void* gemm, void* y, int64_t rows, int64_t cols,
                                const float* scale, const void* bias, bool bias_is_float,
                                bool is_bf16, cudaStream_t stream);

// fp8 e4m3 path. Reads x once: the kept values wait in shared memory while the norms and
// max|x_kept| of each token are reduced (very long rows fall back to a second read of x), then
// q = e4m3(x_kept * (448 / max|x_kept|)) is written in the fp8 compressed layout
// (cuSPARSELt's, or CUTLASS's sm90 layout with kMetadataSm90Block128)
// (padded_rows*cols/2 value bytes, then padded_rows*cols/8 metadata bytes) and the per-token
// dequantisation scale a = s * max|x_kept| / 448 (s = 1 without compensation; 0 for a zero token).
void launch_sparsify_fp8(const void* x, int64_t rows, int64_t padded_rows, int64_t cols,
                         int64_t ld_x, bool is_bf16, bool compensate, void* compressed,
                         float* token_scale, cudaStream_t stream, int split = 0,
                         int metadata_layout = kMetadataCusparselt,
                         const SparsifyPrologue& prologue = {});

int sparsify_fp8_split_for(int64_t padded_rows, int64_t cols);

// y[r, c] = out_dtype(float(d[r, c]) * token_scale[r] * channel_scale[c] + bias[c]) for r < rows;
// d is bf16 (the fp8 GEMM's output), y bf16 or fp16 (may alias d). bias may be nullptr.
void launch_fp8_epilogue(const void* d, void* y, int64_t rows, int64_t cols,
                         const float* token_scale, const float* channel_scale, const void* bias,
                         bool bias_is_float, bool out_bf16, cudaStream_t stream);

// Dense e4m3 rows (the layers an fp8 model keeps dense): q (rows x cols bytes, contiguous) =
// e4m3(x * (448 / max|x|)) per row, dequant_scale[r] = max|x| / 448 (0 for a zero row). x is read
// once: a block holds the row it works on in registers (and the next one in shared memory), so
// cols <= kQuantizeMaxCols. With gelu_tail, each row is [x row, gelu_tanh(gelu_tail row)] (cols +
// tail_cols columns in all).
constexpr int kQuantizeVecsPerThread = 8;    // 16-byte vectors of x a thread holds
constexpr int kQuantizeMaxThreads = 512;     // 128 registers a thread: no spills
constexpr int64_t kQuantizeMaxCols = int64_t(kQuantizeMaxThreads) * kQuantizeVecsPerThread * 8;
void launch_quantize_rows_fp8(const void* x, int64_t rows, int64_t cols, int64_t ld_x, bool is_bf16, void* q,
                              float* dequant_scale, cudaStream_t stream, const void* gelu_tail = nullptr,
                              int64_t tail_cols = 0, int64_t ld_tail = 0);

// y (rows x n, row stride ld_y) = x @ (w * w_scale)^T + bias for 16-bit x (rows x k, rows 16-byte aligned,
// stride ld_x) and an e4m3 weight w (n x k, contiguous) with one fp32 scale per output channel; bias
// (n, x's dtype) or null. 1 <= rows <= kGemvMaxRows, k a multiple of 16, rows * k * 2 <= kGemvMaxSharedBytes
// (x is held in shared memory). The per-image linears (modulation) of an fp8 model.
constexpr int kGemvMaxRows = 8;
constexpr int64_t kGemvMaxSharedBytes = 48 * 1024;
void launch_e4m3_weight_gemv(const void* x, int64_t rows, int64_t ld_x, bool is_bf16, const void* w, int64_t k,
                             int64_t n, const float* w_scale, const void* bias, void* y, int64_t ld_y,
                             cudaStream_t stream);

// out (rows x (a_cols + b_cols), contiguous) = [a row, gelu_tanh(b row)], 16-bit, GELU rounded as
// set_fast_gelu says (FLUX's single-block linear2 input). Rows of a and b may be strided (16-byte aligned).
void launch_cat_gelu_tanh(const void* a, int64_t ld_a, int64_t a_cols, const void* b, int64_t ld_b, int64_t b_cols,
                          int64_t rows, bool is_bf16, void* out, cudaStream_t stream);

}  // namespace rt_lynx
