// Torch ops over the fused elementwise kernels of DiT blocks (block_elementwise.cu). The schemas
// and fake kernels are defined in Python (kernels/block_ops.py).
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <tuple>
#include <vector>

#include "block_elementwise.h"
#include "op_checks.h"

namespace rt_lynx {
namespace {

// q, k and v of one token stream (batch, tokens, heads * head_dim each) and its q/k norm weights.
struct Stream {
  at::Tensor q, k, v;
  at::Tensor q_weight, k_weight;
};

// The stream as the kernel reads it: rows and batch entries may be strided (views into a wider
// projection) but each head's vector load aligned, and q, k, v with the same strides; else one
// fresh copy of each (stated fallback; a fresh allocation, since contiguous() would return a
// contiguous view that starts off alignment as it is).
Stream readable(Stream s, int64_t head_dim) {
  const int64_t alignment = head_dim / 32;  // elements of one lane's vector load
  auto aligned = [&](const at::Tensor& t) {
    return t.stride(2) == 1 && t.stride(1) % alignment == 0 && t.stride(0) % alignment == 0 &&
           reinterpret_cast<uintptr_t>(t.data_ptr()) % (alignment * 2) == 0 && t.strides() == s.q.strides();
  };
  if (!(aligned(s.q) && aligned(s.k) && aligned(s.v))) {
    s.q = s.q.clone(at::MemoryFormat::Contiguous), s.k = s.k.clone(at::MemoryFormat::Contiguous),
    s.v = s.v.clone(at::MemoryFormat::Contiguous);
  }
  return s;
}

void check_stream(const Stream& s, const at::Tensor& first, int64_t width, int64_t head_dim, const char* op) {
  for (const auto* t : {&s.q, &s.k, &s.v}) {
    require(t->device() == first.device() && t->scalar_type() == first.scalar_type() && t->dim() == 3 &&
                t->size(0) == first.size(0) && t->size(1) == s.q.size(1) && t->size(2) == width,
            op, ": q, k and v of every stream must be (batch, tokens, ", width, ") in one dtype, on one device");
  }
  for (const auto* w : {&s.q_weight, &s.k_weight}) {
    require(w->defined() && w->device() == first.device() && w->scalar_type() == first.scalar_type() &&
                w->dim() == 1 && w->size(0) == head_dim && w->is_contiguous() &&
                reinterpret_cast<uintptr_t>(w->data_ptr()) % (head_dim / 16) == 0,
            op, ": each stream needs q/k norm weights: contiguous (head_dim,) vectors in its dtype, on its device");
  }
}

int64_t checked_head_dim(const at::Tensor& first, int64_t width, int64_t heads, const char* op) {
  require(first.is_cuda() && first.dim() == 3 && is_supported_dtype(first.scalar_type()), op,
          ": the projections must be 3-D bfloat16/float16 CUDA tensors (batch, tokens, features)");
  require(heads >= 1 && width % heads == 0, op, ": width ", width, " is not a multiple of heads (", heads, ")");
  const int64_t head_dim = width / heads;
  require(head_dim == 64 || head_dim == 128 || head_dim == 256, op, ": head_dim must be 64, 128 or 256, got ",
          head_dim);
  return head_dim;
}

// FLUX's table is (batch or 1, 1, tokens, head_dim / 2, 2, 2), Qwen-Image's (batch or 1, tokens, 1, ...): the
// same memory order. fp32, or the projections' dtype (RoPE then rounds as in that dtype).
at::Tensor checked_pe(const at::Tensor& pe, const at::Tensor& first, int64_t tokens, int64_t head_dim, const char* op) {
  require(pe.device() == first.device() && (pe.scalar_type() == at::kFloat || pe.scalar_type() == first.scalar_type()) &&
              pe.dim() == 6 && (pe.size(0) == 1 || pe.size(0) == first.size(0)) && pe.size(1) * pe.size(2) == tokens &&
              (pe.size(1) == 1 || pe.size(2) == 1) && pe.size(3) == head_dim / 2 && pe.size(4) == 2 && pe.size(5) == 2,
          op, ": pe must be (1 or batch, tokens, head_dim / 2, 2, 2) with a unit dim before or after the tokens, "
          "fp32 or the projections' dtype, on their device; tokens = ", tokens);
  const at::Tensor table = pe.contiguous();
  // A 16-bit table is read 8 bytes at a time, an fp32 one 16.
  return reinterpret_cast<uintptr_t>(table.data_ptr()) % 16 == 0 ? table : table.clone();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_qk_norm_rope(Stream (&streams)[2], int stream_count,
                                                                const at::Tensor& pe_in, int64_t heads,
                                                                int64_t head_dim, double eps, bool heads_major_out,
                                                                bool write_v, const char* op) {
  const at::Tensor& first = streams[0].q;
  const int64_t batch = first.size(0);
  const int64_t tokens = first.size(1) + (stream_count == 2 ? streams[1].q.size(1) : 0);
  const at::Tensor pe = checked_pe(pe_in, first, tokens, head_dim, op);
  const c10::cuda::CUDAGuard guard(first.device());
  const std::vector<int64_t> shape = heads_major_out ? std::vector<int64_t>{batch, heads, tokens, head_dim}
                                                     : std::vector<int64_t>{batch, tokens, heads * head_dim};
  auto q = at::empty(shape, first.options());
  auto k = at::empty(shape, first.options());
  auto v = write_v ? at::empty(shape, first.options()) : at::Tensor();

  QkNormRopeParams p{};
  for (int i = 0; i < stream_count; ++i) {
    const Stream& s = streams[i];
    p.q_src[i] = s.q.data_ptr();
    p.k_src[i] = s.k.data_ptr();
    p.v_src[i] = write_v ? s.v.data_ptr() : nullptr;
    p.batch_stride[i] = s.q.stride(0);
    p.row_stride[i] = s.q.stride(1);
    p.part_tokens[i] = s.q.size(1);
    p.q_weight[i] = s.q_weight.data_ptr();
    p.k_weight[i] = s.k_weight.data_ptr();
  }
  p.pe = pe.data_ptr();
  p.pe_16bit = pe.scalar_type() != at::kFloat;
  p.pe_batch_stride = pe.size(0) == 1 ? 0 : pe.stride(0);
  p.q_out = q.data_ptr();
  p.k_out = k.data_ptr();
  p.v_out = write_v ? v.data_ptr() : nullptr;
  p.heads_major_out = heads_major_out;
  p.batch = batch;
  p.tokens = tokens;
  p.heads = heads;
  p.eps = static_cast<float>(eps);
  launch_qk_norm_rope(p, static_cast<int>(head_dim), first.scalar_type() == at::kBFloat16,
                      at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, k, v};
}

bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// FLUX: each stream's q, k, v side by side in one projection (batch, tokens, 3 * heads * head_dim);
// out (batch, heads, tokens, head_dim). Stream b, when given, follows stream a's tokens. With
// write_v false v is left where it is (returned undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_side_by_side(
    const at::Tensor& qkv_a, const at::Tensor& q_weight_a, const at::Tensor& k_weight_a,
    const c10::optional<at::Tensor>& qkv_b, const c10::optional<at::Tensor>& q_weight_b,
    const c10::optional<at::Tensor>& k_weight_b, const at::Tensor& pe, int64_t heads, double eps, bool write_v,
    const char* op) {
  require(qkv_a.dim() == 3 && qkv_a.size(2) % 3 == 0, op, ": qkv must be (batch, tokens, 3 * heads * head_dim)");
  const int64_t width = qkv_a.size(2) / 3;
  const int64_t head_dim = checked_head_dim(qkv_a, width, heads, op);
  auto split = [&](const at::Tensor& qkv, const at::Tensor& q_weight, const at::Tensor& k_weight) {
    require(qkv.dim() == 3 && qkv.size(2) == 3 * width, op, ": both qkv projections must be ", 3 * width, " wide");
    return Stream{qkv.narrow(2, 0, width), qkv.narrow(2, width, width), qkv.narrow(2, 2 * width, width), q_weight,
                  k_weight};
  };
  Stream streams[2];
  streams[0] = split(qkv_a, q_weight_a, k_weight_a);
  const int count = given(qkv_b) ? 2 : 1;
  if (count == 2) {
    require(given(q_weight_b) && given(k_weight_b), op, ": the second qkv part needs its own q/k norm weights");
    streams[1] = split(*qkv_b, *q_weight_b, *k_weight_b);
  }
  for (int i = 0; i < count; ++i) {
    check_stream(streams[i], qkv_a, width, head_dim, op);
    streams[i] = readable(streams[i], head_dim);
  }
  return run_qk_norm_rope(streams, count, pe, heads, head_dim, eps, /*heads_major_out=*/true, write_v, op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_op(
    const at::Tensor& qkv_a, const at::Tensor& q_weight_a, const at::Tensor& k_weight_a,
    const c10::optional<at::Tensor>& qkv_b, const c10::optional<at::Tensor>& q_weight_b,
    const c10::optional<at::Tensor>& k_weight_b, const at::Tensor& pe, int64_t heads, double eps) {
  return run_side_by_side(qkv_a, q_weight_a, k_weight_a, qkv_b, q_weight_b, k_weight_b, pe, heads, eps,
                          /*write_v=*/true, "rt_lynx::qk_norm_rope");
}

// One stream's q and k only: attention reads v in place, a heads-major view of the projection
// (FLUX's single blocks; the copy would be a read and a write of v for nothing).
std::tuple<at::Tensor, at::Tensor> qk_norm_rope_qk_op(const at::Tensor& qkv, const at::Tensor& q_weight,
                                                      const at::Tensor& k_weight, const at::Tensor& pe, int64_t heads,
                                                      double eps) {
  auto [q, k, v] = run_side_by_side(qkv, q_weight, k_weight, c10::nullopt, c10::nullopt, c10::nullopt, pe, heads,
                                    eps, /*write_v=*/false, "rt_lynx::qk_norm_rope_qk");
  return {q, k};
}

// Qwen-Image: q, k, v from separate projections (batch, tokens, heads * head_dim each); out in the
// same token-major layout.
std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_split_op(
    const at::Tensor& q_a, const at::Tensor& k_a, const at::Tensor& v_a, const at::Tensor& q_weight_a,
    const at::Tensor& k_weight_a, const c10::optional<at::Tensor>& q_b, const c10::optional<at::Tensor>& k_b,
    const c10::optional<at::Tensor>& v_b, const c10::optional<at::Tensor>& q_weight_b,
    const c10::optional<at::Tensor>& k_weight_b, const at::Tensor& pe, int64_t heads, double eps) {
  const char* op = "rt_lynx::qk_norm_rope_split";
  require(q_a.dim() == 3, op, ": q must be (batch, tokens, heads * head_dim)");
  const int64_t width = q_a.size(2);
  const int64_t head_dim = checked_head_dim(q_a, width, heads, op);
  Stream streams[2];
  streams[0] = Stream{q_a, k_a, v_a, q_weight_a, k_weight_a};
  const int count = given(q_b) ? 2 : 1;
  if (count == 2) {
    require(given(k_b) && given(v_b) && given(q_weight_b) && given(k_weight_b), op,
            ": the second stream needs its k, v and q/k norm weights");
    streams[1] = Stream{*q_b, *k_b, *v_b, *q_weight_b, *k_weight_b};
  }
  for (int i = 0; i < count; ++i) {
    check_stream(streams[i], q_a, width, head_dim, op);
    streams[i] = readable(streams[i], head_dim);
  }
  return run_qk_norm_rope(streams, count, pe, heads, head_dim, eps, /*heads_major_out=*/false, /*write_v=*/true, op);
}

}  // namespace
}  // namespace rt_lynx

TORCH_LIBRARY_IMPL(rt_lynx, CUDA, m) {
  m.impl("qk_norm_rope", &rt_lynx::qk_norm_rope_op);
  m.impl("qk_norm_rope_qk", &rt_lynx::qk_norm_rope_qk_op);
  m.impl("qk_norm_rope_split", &rt_lynx::qk_norm_rope_split_op);
}
