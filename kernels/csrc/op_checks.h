// Operand checks and compressed-buffer sizes shared by the torch ops of both sparse GEMM backends
// (cuSPARSELt and the sm90 CUTLASS GEMM). Errors are std::runtime_error (a Python RuntimeError)
// naming the op.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "lynx_kernels.h"

namespace rt_lynx {

inline constexpr int64_t kRowPad = 64;  // the compressed layout tiles rows by 64

inline int64_t round_up_rows(int64_t rows) { return (rows + kRowPad - 1) / kRowPad * kRowPad; }

// Both layouts store padded_rows*K/2 values, then padded_rows*K/8 metadata bytes.
// 16-bit values: elements of the 16-bit dtype (9/16 of padded_rows*K).
inline int64_t compressed_numel(int64_t padded_rows, int64_t cols) { return padded_rows * cols * 9 / 16; }
// e4m3 values: bytes (5/8 of padded_rows*K).
inline int64_t fp8_compressed_bytes(int64_t padded_rows, int64_t cols) { return padded_rows * cols * 5 / 8; }

inline bool is_supported_dtype(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// x itself when its 16-bit rows are dense and start on 16-byte boundaries (the kernels' vector
// loads), else one aligned contiguous copy (contiguous() already copies a strided x).
inline at::Tensor with_aligned_rows(const at::Tensor& x) {
  const bool aligned = x.stride(1) == 1 && x.stride(0) % 8 == 0 && x.stride(0) >= x.size(1) &&
                       reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  if (aligned) return x;
  return x.is_contiguous() ? x.clone(at::MemoryFormat::Contiguous) : x.contiguous();
}

// X must be a CUDA 16-bit matrix with K % 64 == 0; rows that are not dense/16-byte aligned are
// copied (stated fallback), everything else is an error.
inline at::Tensor checked_activation(const at::Tensor& x, const char* op) {
  require(x.is_cuda(), op, ": x must be a CUDA tensor");
  require(x.dim() == 2, op, ": x must be 2-D (flatten leading dims), got ", x.dim(), "-D");
  require(is_supported_dtype(x.scalar_type()), op, ": x must be bfloat16 or float16, got ",
              x.scalar_type());
  require(x.size(0) >= 1, op, ": x needs at least one row");
  require(x.size(1) >= 64 && x.size(1) % 64 == 0, op,
              ": in_features must be a positive multiple of 64, got ", x.size(1));
  return with_aligned_rows(x);
}

inline void check_weight(const at::Tensor& weight, const at::Tensor& x, const char* op) {
  require(weight.is_cuda() && weight.device() == x.device(), op,
              ": weight must be on x's device");
  require(weight.dim() == 2, op, ": weight must be 2-D (out_features x in_features)");
  require(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ",
              weight.scalar_type(), " differs from x dtype ", x.scalar_type());
  require(weight.size(1) == x.size(1), op, ": weight in_features ", weight.size(1),
              " != x in_features ", x.size(1));
  require(weight.size(0) >= 16 && weight.size(0) % 16 == 0, op,
              ": out_features must be a positive multiple of 16, got ", weight.size(0));
  require(weight.is_contiguous() &&
                  reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0,
              op, ": weight must be contiguous and 16-byte aligned (a per-call copy of a weight "
              "would cost more than the sparse GEMM saves)");
}

inline void check_fp8_weight(const at::Tensor& wq, const at::Tensor& w_scale, int64_t k,
                      const at::Device& device, const char* op) {
  require(wq.is_cuda() && wq.device() == device && wq.dim() == 2 &&
              wq.scalar_type() == at::kFloat8_e4m3fn,
          op, ": wq must be a 2-D float8_e4m3fn CUDA tensor on x's device (quantize_weight_fp8)");
  require(wq.size(1) == k, op, ": wq in_features ", wq.size(1), " != ", k);
  require(wq.size(0) >= 32 && wq.size(0) % 32 == 0, op,
          ": out_features must be a positive multiple of 32, got ", wq.size(0));
  require(wq.is_contiguous() && reinterpret_cast<uintptr_t>(wq.data_ptr()) % 16 == 0, op,
          ": wq must be contiguous and 16-byte aligned");
  require(w_scale.is_cuda() && w_scale.device() == device && w_scale.dim() == 1 &&
              w_scale.size(0) == wq.size(0) && w_scale.scalar_type() == at::kFloat &&
              w_scale.is_contiguous() &&
              reinterpret_cast<uintptr_t>(w_scale.data_ptr()) % 16 == 0,
          op, ": w_scale must be a contiguous fp32 CUDA vector of out_features entries");
}

// The bias as the op uses it: 1-D, out_features long, on x's device, contiguous, in x's dtype
// or fp32; undefined when absent.
inline at::Tensor checked_bias(const c10::optional<at::Tensor>& bias_in, const at::Tensor& x, int64_t n,
                               const char* op) {
  if (!bias_in.has_value() || !bias_in->defined()) return at::Tensor();
  at::Tensor bias = *bias_in;
  require(bias.device() == x.device() && bias.dim() == 1 && bias.size(0) == n, op,
          ": bias must be a 1-D tensor of out_features=", n, " on x's device");
  if (bias.scalar_type() != x.scalar_type() && bias.scalar_type() != at::kFloat) {
    bias = bias.to(at::kFloat);
  }
  return bias.contiguous();
}

}  // namespace rt_lynx
