// The dense e4m3 GEMM of a layer an fp8 model keeps dense, with a DiT block's residual added in the
// GEMM's epilogue (kernels/fp8_dense.py):
//
//   out[m, n] = residual[m, n] + a[m] * w_scale[n] * sum_k q[m, k] wq[n, k] + bias[n]
//
// cuBLASLt's row-wise (outer-vector) scaled e4m3 GEMM, the one torch._scaled_mm runs, called here
// because torch's op takes no C: with beta = 1 and C = the residual, the product is never written
// and read back. A block's gate folds into w_scale and bias before the call. Where cuBLASLt has no
// such kernel for a shape (it lacks some fast-accumulating ones with C at odd row counts), the
// product is computed as torch._scaled_mm does and the residual added after: the same math.
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>

#include <mutex>
#include <tuple>
#include <unordered_map>

#include "op_checks.h"

namespace rt_lynx {
namespace {

constexpr const char* kOp = "rt_lynx::scaled_mm_residual";
constexpr int64_t kWorkspaceBytes = 32 << 20;   // what cuBLASLt's heuristics may ask of Hopper kernels

void check(cublasStatus_t status, const char* call) {
  require(status == CUBLAS_STATUS_SUCCESS, kOp, ": ", call, " failed (cuBLAS status ", static_cast<int>(status), ")");
}

template <class Handle, cublasStatus_t (*Destroy)(Handle)>
struct Owned {
  Handle handle = nullptr;
  ~Owned() {
    if (handle != nullptr) Destroy(handle);
  }
};

struct Problem {
  int device;
  int64_t m, n, k;
  bool bias, fast_accumulation;
  bool operator==(const Problem& o) const {
    return device == o.device && m == o.m && n == o.n && k == o.k && bias == o.bias &&
           fast_accumulation == o.fast_accumulation;
  }
};

struct ProblemHash {
  size_t operator()(const Problem& p) const {
    size_t h = std::hash<int64_t>()(p.m);
    h = h * 1000003u ^ std::hash<int64_t>()(p.n);
    h = h * 1000003u ^ std::hash<int64_t>()(p.k);
    return h * 1000003u ^ size_t(p.device * 4 + p.bias * 2 + p.fast_accumulation);
  }
};

// The heuristic's first algorithm per problem, asked once (the call is host time a step repeats);
// found == false: none, the product and the sum run apart.
struct Choice {
  bool found = false;
  cublasLtMatmulAlgo_t algo{};
};

std::mutex& algo_mutex() {
  static std::mutex mutex;
  return mutex;
}

std::unordered_map<Problem, Choice, ProblemHash>& algos() {
  static std::unordered_map<Problem, Choice, ProblemHash> cache;
  return cache;
}

void set(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, const void* value, size_t size) {
  check(cublasLtMatmulDescSetAttribute(desc, attribute, value, size), "cublasLtMatmulDescSetAttribute");
}

at::Tensor scaled_mm_residual_op(const at::Tensor& q, const at::Tensor& a, const at::Tensor& wq,
                                 const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias_in,
                                 const at::Tensor& residual_in, bool fast_accumulation) {
  require(q.is_cuda() && q.dim() == 2 && q.scalar_type() == at::kFloat8_e4m3fn && q.is_contiguous(), kOp,
          ": q must be a contiguous 2-D float8_e4m3fn CUDA tensor (quantize_rows_fp8)");
  const int64_t m = q.size(0), k = q.size(1);
  require(wq.device() == q.device() && wq.dim() == 2 && wq.scalar_type() == at::kFloat8_e4m3fn && wq.is_contiguous() &&
              wq.size(1) == k,
          kOp, ": wq must be a contiguous float8_e4m3fn (out_features, ", k, ") tensor on q's device");
  const int64_t n = wq.size(0);
  require(k % 16 == 0 && n % 16 == 0 && m >= 1, kOp, ": in_features and out_features must be multiples of 16");
  require(a.device() == q.device() && a.scalar_type() == at::kFloat && a.numel() == m && a.is_contiguous(), kOp,
          ": a must hold one fp32 scale per row of q");
  require(w_scale.device() == q.device() && w_scale.scalar_type() == at::kFloat && w_scale.numel() == n &&
              w_scale.is_contiguous(),
          kOp, ": w_scale must hold one fp32 scale per output channel");
  require(residual_in.device() == q.device() && residual_in.dim() == 2 && residual_in.size(0) == m &&
              residual_in.size(1) == n && residual_in.scalar_type() == at::kBFloat16,
          kOp, ": residual must be a bfloat16 ", m, " x ", n, " tensor on q's device (cuBLASLt's row-wise "
          "scaled GEMM writes bfloat16)");
  const at::Tensor residual = residual_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    require(bias_in->device() == q.device() && bias_in->numel() == n, kOp, ": bias must hold out_features values");
    bias = bias_in->to(at::kBFloat16).contiguous();
  }
  for (const at::Tensor* t : {&q, &wq, &residual}) {
    require(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, kOp, ": operands must be 16-byte aligned");
  }
  const c10::cuda::CUDAGuard guard(q.device());

  // Column-major, as cuBLASLt reads: out^T (n x m) = wq (k x n stored, transposed) times q^T (k x m).
  Owned<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy> desc;
  check(cublasLtMatmulDescCreate(&desc.handle, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const cublasOperation_t transpose = CUBLAS_OP_T, plain = CUBLAS_OP_N;
  set(desc.handle, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof(transpose));
  set(desc.handle, CUBLASLT_MATMUL_DESC_TRANSB, &plain, sizeof(plain));
  const void* channel_scale = w_scale.data_ptr();
  const void* token_scale = a.data_ptr();
  const cublasLtMatmulMatrixScale_t outer = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
  set(desc.handle, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &channel_scale, sizeof(channel_scale));
  set(desc.handle, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &outer, sizeof(outer));
  set(desc.handle, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &token_scale, sizeof(token_scale));
  set(desc.handle, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &outer, sizeof(outer));
  const int8_t fast = fast_accumulation ? 1 : 0;
  set(desc.handle, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof(fast));
  if (bias.defined()) {
    const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    const void* bias_pointer = bias.data_ptr();
    const cudaDataType_t bias_type = CUDA_R_16BF;
    set(desc.handle, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue));
    set(desc.handle, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_pointer, sizeof(bias_pointer));
    set(desc.handle, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type));
  }
  Owned<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy> a_layout, b_layout, c_layout;
  check(cublasLtMatrixLayoutCreate(&a_layout.handle, CUDA_R_8F_E4M3, k, n, k), "cublasLtMatrixLayoutCreate(A)");
  check(cublasLtMatrixLayoutCreate(&b_layout.handle, CUDA_R_8F_E4M3, k, m, k), "cublasLtMatrixLayoutCreate(B)");
  check(cublasLtMatrixLayoutCreate(&c_layout.handle, CUDA_R_16BF, n, m, n), "cublasLtMatrixLayoutCreate(C)");

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const Problem problem{q.get_device(), m, n, k, bias.defined(), fast_accumulation};
  Choice choice;
  {
    std::lock_guard<std::mutex> lock(algo_mutex());
    auto hit = algos().find(problem);
    if (hit == algos().end()) {
      Owned<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy> preference;
      check(cublasLtMatmulPreferenceCreate(&preference.handle), "cublasLtMatmulPreferenceCreate");
      const uint64_t workspace_limit = kWorkspaceBytes;
      check(cublasLtMatmulPreferenceSetAttribute(preference.handle, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                 &workspace_limit, sizeof(workspace_limit)),
            "cublasLtMatmulPreferenceSetAttribute");
      cublasLtMatmulHeuristicResult_t result{};
      int found = 0;
      const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
          handle, desc.handle, a_layout.handle, b_layout.handle, c_layout.handle, c_layout.handle, preference.handle,
          1, &result, &found);
      if (status != CUBLAS_STATUS_NOT_SUPPORTED) check(status, "cublasLtMatmulAlgoGetHeuristic");
      Choice made;
      made.found = status == CUBLAS_STATUS_SUCCESS && found > 0;
      if (made.found) made.algo = result.algo;
      hit = algos().emplace(problem, made).first;
    }
    choice = hit->second;
  }
  if (!choice.found) {
    const at::Tensor product = at::_scaled_mm(q, wq.t(), a.reshape({m, 1}), w_scale.reshape({1, n}),
                                              bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt,
                                              c10::nullopt, at::kBFloat16, fast_accumulation);
    return at::add(residual, product);
  }
  at::Tensor out = at::empty_like(residual);
  const at::Tensor workspace = at::empty({kWorkspaceBytes}, q.options().dtype(at::kByte));
  const float alpha = 1.f, beta = 1.f;
  check(cublasLtMatmul(handle, desc.handle, &alpha, wq.data_ptr(), a_layout.handle, q.data_ptr(), b_layout.handle,
                       &beta, residual.data_ptr(), c_layout.handle, out.data_ptr(), c_layout.handle, &choice.algo,
                       workspace.data_ptr(), kWorkspaceBytes, at::cuda::getCurrentCUDAStream()),
        "cublasLtMatmul");
  return out;
}

}  // namespace
}  // namespace rt_lynx

TORCH_LIBRARY_IMPL(rt_lynx, CUDA, m) { m.impl("scaled_mm_residual", &rt_lynx::scaled_mm_residual_op); }
