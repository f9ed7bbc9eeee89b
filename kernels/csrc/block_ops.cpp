// Torch ops over the fused elementwise kernels of DiT blocks (block_elementwise.cu). The schemas
// and fake kernels are defined in Python (kernels/block_ops.py).
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <tuple>

#include "block_elementwise.h"
#include "op_checks.h"

namespace rt_lynx {
namespace {

// A qkv part as the kernel reads it: its rows and batch entries may be strided (a split of a
// wider projection), but each row's values dense and every head's vector load aligned; else one
// contiguous copy (stated fallback).
at::Tensor aligned_part(const at::Tensor& part, int64_t head_dim) {
  const int64_t alignment = head_dim / 32;  // elements of one lane's vector load
  const bool aligned = part.stride(2) == 1 && part.stride(1) % alignment == 0 && part.stride(0) % alignment == 0 &&
                       reinterpret_cast<uintptr_t>(part.data_ptr()) % (alignment * 2) == 0;
  return aligned ? part : part.contiguous();
}

void check_norm_weight(const at::Tensor& weight, const at::Tensor& qkv, int64_t head_dim, const char* op) {
  require(weight.device() == qkv.device() && weight.scalar_type() == qkv.scalar_type() && weight.dim() == 1 &&
              weight.size(0) == head_dim && weight.is_contiguous() &&
              reinterpret_cast<uintptr_t>(weight.data_ptr()) % (head_dim / 16) == 0,
          op, ": the q/k norm weights must be contiguous (head_dim,) vectors in qkv's dtype, on its device");
}

// Part b, when given, is a second projection whose tokens follow part a's (FLUX's text and image
// streams), with its own q/k norm weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_op(
    const at::Tensor& qkv_a, const at::Tensor& q_weight_a, const at::Tensor& k_weight_a,
    const c10::optional<at::Tensor>& qkv_b, const c10::optional<at::Tensor>& q_weight_b,
    const c10::optional<at::Tensor>& k_weight_b, const at::Tensor& pe_in, int64_t heads, double eps) {
  const char* op = "rt_lynx::qk_norm_rope";
  const bool two_parts = qkv_b.has_value() && qkv_b->defined();
  require(qkv_a.is_cuda() && qkv_a.dim() == 3 && is_supported_dtype(qkv_a.scalar_type()), op,
          ": qkv must be a 3-D bfloat16/float16 CUDA tensor (batch, tokens, 3 * heads * head_dim)");
  require(heads >= 1 && qkv_a.size(2) % (3 * heads) == 0, op, ": qkv width ", qkv_a.size(2),
          " is not 3 x heads (", heads, ") x head_dim");
  const int64_t head_dim = qkv_a.size(2) / (3 * heads);
  require(head_dim == 64 || head_dim == 128 || head_dim == 256, op, ": head_dim must be 64, 128 or 256, got ",
          head_dim);
  const int64_t batch = qkv_a.size(0);
  at::Tensor parts[2] = {aligned_part(qkv_a, head_dim), at::Tensor()};
  const at::Tensor* q_weights[2] = {&q_weight_a, nullptr};
  const at::Tensor* k_weights[2] = {&k_weight_a, nullptr};
  if (two_parts) {
    const at::Tensor& b = *qkv_b;
    require(b.device() == qkv_a.device() && b.scalar_type() == qkv_a.scalar_type() && b.dim() == 3 &&
                b.size(0) == batch && b.size(2) == qkv_a.size(2),
            op, ": the second qkv part must match the first in device, dtype, batch and width");
    require(q_weight_b.has_value() && q_weight_b->defined() && k_weight_b.has_value() && k_weight_b->defined(), op,
            ": the second qkv part needs its own q/k norm weights");
    parts[1] = aligned_part(b, head_dim);
    q_weights[1] = &*q_weight_b;
    k_weights[1] = &*k_weight_b;
  }
  const int part_count = two_parts ? 2 : 1;
  for (int i = 0; i < part_count; ++i) {
    check_norm_weight(*q_weights[i], qkv_a, head_dim, op);
    check_norm_weight(*k_weights[i], qkv_a, head_dim, op);
  }
  const int64_t tokens = qkv_a.size(1) + (two_parts ? parts[1].size(1) : 0);
  require(pe_in.device() == qkv_a.device() && pe_in.scalar_type() == at::kFloat && pe_in.dim() == 6 &&
              (pe_in.size(0) == 1 || pe_in.size(0) == batch) && pe_in.size(1) == 1 && pe_in.size(2) == tokens &&
              pe_in.size(3) == head_dim / 2 && pe_in.size(4) == 2 && pe_in.size(5) == 2,
          op, ": pe must be fp32 (1 or batch, 1, tokens, head_dim / 2, 2, 2) on qkv's device, tokens = ", tokens);
  const at::Tensor pe = pe_in.contiguous();
  const c10::cuda::CUDAGuard guard(qkv_a.device());
  auto q = at::empty({batch, heads, tokens, head_dim}, qkv_a.options());
  auto k = at::empty({batch, heads, tokens, head_dim}, qkv_a.options());
  auto v = at::empty({batch, heads, tokens, head_dim}, qkv_a.options());

  QkNormRopeParams p{};
  for (int i = 0; i < part_count; ++i) {
    p.part[i] = parts[i].data_ptr();
    p.batch_stride[i] = parts[i].stride(0);
    p.row_stride[i] = parts[i].stride(1);
    p.part_tokens[i] = parts[i].size(1);
    p.q_weight[i] = q_weights[i]->data_ptr();
    p.k_weight[i] = k_weights[i]->data_ptr();
  }
  p.pe = pe.data_ptr<float>();
  p.pe_batch_stride = pe.size(0) == 1 ? 0 : pe.stride(0);
  p.q_out = q.data_ptr();
  p.k_out = k.data_ptr();
  p.v_out = v.data_ptr();
  p.batch = batch;
  p.tokens = tokens;
  p.heads = heads;
  p.eps = static_cast<float>(eps);
  launch_qk_norm_rope(p, static_cast<int>(head_dim), qkv_a.scalar_type() == at::kBFloat16,
                      at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, k, v};
}

}  // namespace
}  // namespace rt_lynx

TORCH_LIBRARY_IMPL(rt_lynx, CUDA, m) { m.impl("qk_norm_rope", &rt_lynx::qk_norm_rope_op); }
