// RT-Lynx CUDA ops: fused 2:4 sparsify+compress, cached cuSPARSELt sparse GEMM, fused epilogue.
//
// The op schemas are defined in Python (kernels/cusparselt.py, namespace rt_lynx) together with
// their fake kernels; this file registers the CUDA implementations.
//
// Y = X W^T, X (M x K, compressed by our kernel, rows padded to 64) the structured operand, in
// one of two orientations (both give D = Y as M_padded x N row-major memory):
//  - sparse B (RT_LYNX_SPARSE_OPERAND=B): D (N x M, col-major, ld N) = W (op T of a K x N
//    col-major, i.e. W as stored) x X_s^T (K x M col-major, ld K: X's own memory). Same compressed layout as A.
//  - sparse A (default): D (M x N row-major) = X_s (M x K row-major) x W^T.
// The norm-compensation scale is folded into the compressed values by the sparsify kernel. The
// bias needs our epilogue pass in both: cuSPARSELt 0.8 adds CUSPARSELT_MATMUL_BIAS_POINTER per
// token in both orientations (H100: every algorithm wrong, error 1.16 = bias on the token axis).
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <cusparseLt.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "lynx_kernels.h"
#include "op_checks.h"

namespace rt_lynx {
namespace {

#define RT_LYNX_CSLT_CHECK(expr)                                                          \
  do {                                                                                    \
    const cusparseStatus_t status_ = (expr);                                              \
    require(status_ == CUSPARSE_STATUS_SUCCESS, "cuSPARSELt call ", #expr,            \
                " failed: ", cusparseLtGetErrorString(status_), " (status ",              \
                static_cast<int>(status_), ")");                                          \
  } while (0)


cusparseLtHandle_t* handle_for_device(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, std::unique_ptr<cusparseLtHandle_t>> handles;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = handles.find(device);
  if (it != handles.end()) return it->second.get();
  auto handle = std::make_unique<cusparseLtHandle_t>();
  RT_LYNX_CSLT_CHECK(cusparseLtInit(handle.get()));
  return handles.emplace(device, std::move(handle)).first->second.get();
}

struct PlanKey {
  int device;
  int64_t padded_rows, k, n;
  bool bf16;
  bool sparse_b;
  // e4m3 operands, D in bf16 (fp16 D would overflow: |D| reaches 448^2 * K).
  bool fp8 = false;
  bool operator==(const PlanKey& o) const {
    return device == o.device && padded_rows == o.padded_rows && k == o.k && n == o.n &&
           bf16 == o.bf16 && sparse_b == o.sparse_b && fp8 == o.fp8;
  }
};

struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const {
    size_t h = std::hash<int64_t>()(key.padded_rows);
    h = h * 1000003u ^ std::hash<int64_t>()(key.k);
    h = h * 1000003u ^ std::hash<int64_t>()(key.n);
    h = h * 1000003u ^ std::hash<int>()(key.device * 8 + (key.bf16 ? 1 : 0) + (key.sparse_b ? 2 : 0) +
                                        (key.fp8 ? 4 : 0));
    return h;
  }
};

// Descriptors, algorithm selection and plan for one (M_padded, K, N, dtype, device).
struct GemmPlan {
  PlanKey key{};
  cusparseLtHandle_t* handle = nullptr;
  cusparseLtMatDescriptor_t mat_a{}, mat_b{}, mat_d{};
  cusparseLtMatmulDescriptor_t matmul{};
  cusparseLtMatmulAlgSelection_t alg_selection{};
  cusparseLtMatmulPlan_t plan{};
  bool descriptors_ready = false, selection_ready = false, plan_ready = false;
  size_t workspace_bytes = 0;
  int alg_id = -1, split_k = 1, split_k_mode = 0;
  std::string chosen_by;

  GemmPlan() = default;
  GemmPlan(const GemmPlan&) = delete;
  GemmPlan& operator=(const GemmPlan&) = delete;
  ~GemmPlan() {
    // Destroy errors are ignored: nothing useful can be done about them here.
    if (plan_ready) cusparseLtMatmulPlanDestroy(&plan);
    if (selection_ready) cusparseLtMatmulAlgSelectionDestroy(&alg_selection);
    if (descriptors_ready) {
      cusparseLtMatDescriptorDestroy(&mat_a);
      cusparseLtMatDescriptorDestroy(&mat_b);
      cusparseLtMatDescriptorDestroy(&mat_d);
    }
  }

  void init_descriptors() {
    if (key.fp8) return init_fp8_descriptors();
    const cudaDataType type = key.bf16 ? CUDA_R_16BF : CUDA_R_16F;
    const cusparseLtMatDescriptor_t* sparse = nullptr;
    if (key.sparse_b) {
      RT_LYNX_CSLT_CHECK(cusparseLtDenseDescriptorInit(handle, &mat_a, key.k, key.n, key.k, 16,
                                                       type, CUSPARSE_ORDER_COL));
      RT_LYNX_CSLT_CHECK(cusparseLtStructuredDescriptorInit(
          handle, &mat_b, key.k, key.padded_rows, key.k, 16, type, CUSPARSE_ORDER_COL,
          CUSPARSELT_SPARSITY_50_PERCENT));
      RT_LYNX_CSLT_CHECK(cusparseLtDenseDescriptorInit(handle, &mat_d, key.n, key.padded_rows,
                                                       key.n, 16, type, CUSPARSE_ORDER_COL));
      sparse = &mat_b;
    } else {
      RT_LYNX_CSLT_CHECK(cusparseLtStructuredDescriptorInit(
          handle, &mat_a, key.padded_rows, key.k, key.k, 16, type, CUSPARSE_ORDER_ROW,
          CUSPARSELT_SPARSITY_50_PERCENT));
      RT_LYNX_CSLT_CHECK(cusparseLtDenseDescriptorInit(handle, &mat_b, key.n, key.k, key.k, 16,
                                                       type, CUSPARSE_ORDER_ROW));
      RT_LYNX_CSLT_CHECK(cusparseLtDenseDescriptorInit(handle, &mat_d, key.padded_rows, key.n,
                                                       key.n, 16, type, CUSPARSE_ORDER_ROW));
      sparse = &mat_a;
    }
    descriptors_ready = true;
    RT_LYNX_CSLT_CHECK(cusparseLtMatmulDescriptorInit(
        handle, &matmul,
        key.sparse_b ? CUSPARSE_OPERATION_TRANSPOSE : CUSPARSE_OPERATION_NON_TRANSPOSE,
        key.sparse_b ? CUSPARSE_OPERATION_NON_TRANSPOSE : CUSPARSE_OPERATION_TRANSPOSE, &mat_a,
        &mat_b, &mat_d, &mat_d, CUSPARSE_COMPUTE_32F));
    size_t compressed_bytes = 0, compress_buffer_bytes = 0;
    RT_LYNX_CSLT_CHECK(cusparseLtSpMMACompressedSize2(handle, sparse, &compressed_bytes,
                                                      &compress_buffer_bytes));
    const size_t ours = static_cast<size_t>(compressed_numel(key.padded_rows, key.k)) * 2;
    require(compressed_bytes <= ours, "cuSPARSELt wants ", compressed_bytes,
                " bytes for a compressed ", key.padded_rows, "x", key.k,
                " matrix, the layout this build writes has ", ours,
                ": unsupported cuSPARSELt version");
  }

  // e4m3 in, bf16 D, fp32 compute. Both orientations keep the dense operand "T" and the sparse one
  // "N" in column-major terms (the TN layout 8-bit tensor-core GEMMs want):
  //  - sparse A: X_s M x K row-major, W^T as K x N column-major (W's memory), D M x N row-major
  //    (what torch._cslt_sparse_mm(c8, w8.t()) does);
  //  - sparse B: W as op T of K x N column-major, X_s K x M column-major, D N x M column-major.
  void init_fp8_descriptors() {
    const cusparseLtMatDescriptor_t* sparse = nullptr;
    if (key.sparse_b) {
      RT_LYNX_CSLT_CHECK(cusparseLtDenseDescriptorInit(handle, &mat_a, key.k, key.n, key.k, 16,
                                                       CUDA_R_8F_E4M3, CUSPARSE_ORDER_COL));
      RT_LYNX_CSLT_CHECK(cusparseLtStructuredDescriptorInit(
          handle, &mat_b, key.k, key.padded_rows, key.k, 16, CUDA_R_8F_E4M3, CUSPARSE_ORDER_COL,
          CUSPARSELT_SPARSITY_50_PERCENT));
      RT_LYNX_CSLT_CHECK(cusparseLtDenseDescriptorInit(handle, &mat_d, key.n, key.padded_rows,
                                                       key.n, 16, CUDA_R_16BF, CUSPARSE_ORDER_COL));
      sparse = &mat_b;
    } else {
      RT_LYNX_CSLT_CHECK(cusparseLtStructuredDescriptorInit(
          handle, &mat_a, key.padded_rows, key.k, key.k, 16, CUDA_R_8F_E4M3, CUSPARSE_ORDER_ROW,
          CUSPARSELT_SPARSITY_50_PERCENT));
      RT_LYNX_CSLT_CHECK(cusparseLtDenseDescriptorInit(handle, &mat_b, key.k, key.n, key.k, 16,
                                                       CUDA_R_8F_E4M3, CUSPARSE_ORDER_COL));
      RT_LYNX_CSLT_CHECK(cusparseLtDenseDescriptorInit(handle, &mat_d, key.padded_rows, key.n,
                                                       key.n, 16, CUDA_R_16BF, CUSPARSE_ORDER_ROW));
      sparse = &mat_a;
    }
    descriptors_ready = true;
    RT_LYNX_CSLT_CHECK(cusparseLtMatmulDescriptorInit(
        handle, &matmul,
        key.sparse_b ? CUSPARSE_OPERATION_TRANSPOSE : CUSPARSE_OPERATION_NON_TRANSPOSE,
        CUSPARSE_OPERATION_NON_TRANSPOSE, &mat_a, &mat_b, &mat_d, &mat_d, CUSPARSE_COMPUTE_32F));
    size_t compressed_bytes = 0, compress_buffer_bytes = 0;
    RT_LYNX_CSLT_CHECK(cusparseLtSpMMACompressedSize2(handle, sparse, &compressed_bytes,
                                                      &compress_buffer_bytes));
    const size_t ours = static_cast<size_t>(fp8_compressed_bytes(key.padded_rows, key.k));
    require(compressed_bytes <= ours, "cuSPARSELt wants ", compressed_bytes,
            " bytes for a compressed e4m3 ", key.padded_rows, "x", key.k,
            " matrix, the layout this build writes has ", ours,
            ": unsupported cuSPARSELt version");
  }

  // (Re)initialises the selection; alg < 0 keeps cuSPARSELt's default, split <= 1 and
  // split_mode <= 0 keep no split-K.
  void init_selection(int alg, int split, int split_mode) {
    if (plan_ready) {
      RT_LYNX_CSLT_CHECK(cusparseLtMatmulPlanDestroy(&plan));
      plan_ready = false;
    }
    if (selection_ready) {
      RT_LYNX_CSLT_CHECK(cusparseLtMatmulAlgSelectionDestroy(&alg_selection));
      selection_ready = false;
    }
    RT_LYNX_CSLT_CHECK(cusparseLtMatmulAlgSelectionInit(handle, &alg_selection, &matmul,
                                                        CUSPARSELT_MATMUL_ALG_DEFAULT));
    selection_ready = true;
    if (alg >= 0) {
      RT_LYNX_CSLT_CHECK(cusparseLtMatmulAlgSetAttribute(
          handle, &alg_selection, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg, sizeof(alg)));
    }
    if (split > 1) {
      RT_LYNX_CSLT_CHECK(cusparseLtMatmulAlgSetAttribute(
          handle, &alg_selection, CUSPARSELT_MATMUL_SPLIT_K, &split, sizeof(split)));
      if (split_mode > 0) {
        RT_LYNX_CSLT_CHECK(cusparseLtMatmulAlgSetAttribute(
            handle, &alg_selection, CUSPARSELT_MATMUL_SPLIT_K_MODE, &split_mode,
            sizeof(split_mode)));
      }
    }
    init_plan();
  }

  void init_plan() {
    if (plan_ready) {
      RT_LYNX_CSLT_CHECK(cusparseLtMatmulPlanDestroy(&plan));
      plan_ready = false;
    }
    RT_LYNX_CSLT_CHECK(cusparseLtMatmulPlanInit(handle, &plan, &matmul, &alg_selection));
    plan_ready = true;
    RT_LYNX_CSLT_CHECK(cusparseLtMatmulGetWorkspace(handle, &plan, &workspace_bytes));
  }

  void read_selection() {
    RT_LYNX_CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(
        handle, &alg_selection, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg_id, sizeof(alg_id)));
    RT_LYNX_CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(
        handle, &alg_selection, CUSPARSELT_MATMUL_SPLIT_K, &split_k, sizeof(split_k)));
    RT_LYNX_CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(
        handle, &alg_selection, CUSPARSELT_MATMUL_SPLIT_K_MODE, &split_k_mode,
        sizeof(split_k_mode)));
  }

  // One launch on `stream`; the workspace comes from torch's caching allocator.
  void run(const void* sparse, const void* weight, void* d, cudaStream_t stream,
           const at::Device& device, bool search = false) {
    const void* a = key.sparse_b ? weight : sparse;
    const void* b = key.sparse_b ? sparse : weight;
    at::Tensor workspace;
    void* workspace_ptr = nullptr;
    if (workspace_bytes > 0) {
      workspace = at::empty({static_cast<int64_t>(workspace_bytes)},
                            at::TensorOptions().dtype(at::kByte).device(device));
      workspace_ptr = workspace.data_ptr();
    }
    const float alpha = 1.f, beta = 0.f;
    if (search) {
      RT_LYNX_CSLT_CHECK(cusparseLtMatmulSearch(handle, &plan, &alpha, a, b, &beta, d, d,
                                                workspace_ptr, &stream, 1));
    } else {
      RT_LYNX_CSLT_CHECK(cusparseLtMatmul(handle, &plan, &alpha, a, b, &beta, d, d,
                                          workspace_ptr, &stream, 1));
    }
  }
};

// cuSPARSELt's own compression of `pruned` (the plan's structured operand, x's memory) into
// `out` (at least cusparseLtSpMMACompressedSize2 bytes).
void compress_with_cusparselt(GemmPlan& plan, const at::Tensor& pruned, void* out,
                              cudaStream_t stream) {
  const cusparseLtMatDescriptor_t* sparse = plan.key.sparse_b ? &plan.mat_b : &plan.mat_a;
  size_t compressed_bytes = 0, buffer_bytes = 0;
  RT_LYNX_CSLT_CHECK(
      cusparseLtSpMMACompressedSize2(plan.handle, sparse, &compressed_bytes, &buffer_bytes));
  auto buffer = at::empty({static_cast<int64_t>(std::max<size_t>(buffer_bytes, 1))},
                          pruned.options().dtype(at::kByte));
  RT_LYNX_CSLT_CHECK(cusparseLtSpMMACompress2(
      plan.handle, sparse, plan.key.sparse_b ? 0 : 1, CUSPARSE_OPERATION_NON_TRANSPOSE,
      pruned.data_ptr(), out, buffer.data_ptr(), stream));
}

// A 2:4 matrix with random patterns and random non-zero values, a weight, and the cuBLAS dense
// product: every candidate algorithm must reproduce it before it is used.
struct PlanCheckData {
  at::Tensor dense_sparse, weight, compressed, reference;
  double reference_norm = 0.0;
  at::TensorOptions out_options;  // D's dtype and device
};

void compress_with_cusparselt(GemmPlan& plan, const at::Tensor& pruned, void* out,
                              cudaStream_t stream);

PlanCheckData make_check_data(const PlanKey& key, cudaStream_t stream) {
  const auto device = at::Device(at::kCUDA, key.device);
  const auto dtype = key.bf16 ? at::kBFloat16 : at::kHalf;
  const auto opts = at::TensorOptions().dtype(dtype).device(device);
  // A private generator leaves the caller's random stream untouched.
  auto gen = at::make_generator<at::CUDAGeneratorImpl>(static_cast<c10::DeviceIndex>(key.device));
  gen.set_current_seed(0x5eed);
  PlanCheckData data;
  // The six ways to keep 2 of 4.
  const auto patterns = at::tensor(std::vector<int64_t>{1, 1, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1,
                                                        0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1, 1})
                            .to(device)
                            .to(at::kBool)
                            .view({6, 4});
  const auto choice = at::randint(6, {key.padded_rows * key.k / 4}, gen,
                                  at::TensorOptions().dtype(at::kLong).device(device));
  const auto mask = patterns.index_select(0, choice).view({key.padded_rows, key.k});
  const auto values = at::randn({key.padded_rows, key.k}, gen, opts);
  data.dense_sparse = at::where(mask, values, at::zeros({}, opts));
  data.weight = at::randn({key.n, key.k}, gen, opts).div_(std::sqrt(static_cast<double>(key.k)));
  data.out_options = opts;
  if (key.fp8) {
    // Unit-scale values (no e4m3 underflow); cuSPARSELt's own compression, so the algorithm
    // check does not depend on our fp8 layout writer.
    data.dense_sparse = at::where(mask, values, at::zeros({}, opts)).to(at::kFloat8_e4m3fn);
    data.weight = at::randn({key.n, key.k}, gen, opts).to(at::kFloat8_e4m3fn);
    data.out_options = opts.dtype(at::kBFloat16);
    data.compressed = at::zeros({fp8_compressed_bytes(key.padded_rows, key.k)},
                                opts.dtype(at::kByte));
    auto plan = std::make_unique<GemmPlan>();
    plan->key = key;
    plan->handle = handle_for_device(key.device);
    plan->init_descriptors();
    compress_with_cusparselt(*plan, data.dense_sparse, data.compressed.data_ptr(), stream);
    data.reference = at::matmul(data.dense_sparse.to(at::kFloat), data.weight.to(at::kFloat).t());
    data.reference_norm = data.reference.norm().item<double>();
    return data;
  }
  data.compressed = at::empty({compressed_numel(key.padded_rows, key.k)}, opts);
  launch_sparsify_compress(data.dense_sparse.data_ptr(), key.padded_rows, key.padded_rows, key.k,
                           key.k, key.bf16, /*fold_scale=*/false, data.compressed.data_ptr(),
                           nullptr, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  data.reference = at::matmul(data.dense_sparse, data.weight.t()).to(at::kFloat);
  data.reference_norm = data.reference.norm().item<double>();
  return data;
}

// Runs the plan `repeats` times into a NaN-poisoned output; true if every run matches dense.
bool plan_matches_dense(GemmPlan& plan, const PlanCheckData& data, cudaStream_t stream,
                        int repeats, double* worst_error) {
  const auto device = data.weight.device();
  *worst_error = 0.0;
  for (int i = 0; i < repeats; ++i) {
    auto out = at::full({plan.key.padded_rows, plan.key.n},
                        std::numeric_limits<double>::quiet_NaN(), data.out_options);
    plan.run(data.compressed.data_ptr(), data.weight.data_ptr(), out.data_ptr(), stream, device);
    const double err = (out.to(at::kFloat) - data.reference).norm().item<double>() /
                       std::max(data.reference_norm, 1e-30);
    if (!std::isfinite(err) || err > 2e-2) {
      *worst_error = std::isfinite(err) ? err : std::numeric_limits<double>::infinity();
      return false;
    }
    *worst_error = std::max(*worst_error, err);
  }
  return true;
}

float time_plan_ms(GemmPlan& plan, const PlanCheckData& data, cudaStream_t stream, int iters) {
  auto out = at::empty({plan.key.padded_rows, plan.key.n}, data.out_options);
  const auto device = data.weight.device();
  plan.run(data.compressed.data_ptr(), data.weight.data_ptr(), out.data_ptr(), stream, device);
  cudaEvent_t start, stop;
  C10_CUDA_CHECK(cudaEventCreate(&start));
  C10_CUDA_CHECK(cudaEventCreate(&stop));
  C10_CUDA_CHECK(cudaEventRecord(start, stream));
  for (int i = 0; i < iters; ++i) {
    plan.run(data.compressed.data_ptr(), data.weight.data_ptr(), out.data_ptr(), stream, device);
  }
  C10_CUDA_CHECK(cudaEventRecord(stop, stream));
  C10_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0.f;
  C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  C10_CUDA_CHECK(cudaEventDestroy(start));
  C10_CUDA_CHECK(cudaEventDestroy(stop));
  return ms / iters;
}

// The algorithm chosen (and checked against dense) for one config key.
struct AlgConfig {
  int alg_id = -1, split_k = 1, split_k_mode = 0;
  std::string chosen_by;
};

std::unique_ptr<GemmPlan> new_plan(const PlanKey& key) {
  auto plan = std::make_unique<GemmPlan>();
  plan->key = key;
  plan->handle = handle_for_device(key.device);
  plan->init_descriptors();
  return plan;
}

AlgConfig search_config(const PlanKey& config_key, cudaStream_t stream) {
  const auto data = make_check_data(config_key, stream);
  const auto device = data.weight.device();
  auto plan = new_plan(config_key);
  plan->init_selection(-1, 1, 0);

  // cuSPARSELt's own search first; some algorithm ids give wrong results now and then, so the
  // winner is checked against dense several times before it is trusted.
  {
    auto out = at::empty({config_key.padded_rows, config_key.n}, data.out_options);
    plan->run(data.compressed.data_ptr(), data.weight.data_ptr(), out.data_ptr(), stream, device,
              /*search=*/true);
    plan->read_selection();
    // A fresh selection and plan with the found configuration, as for any later process.
    plan->init_selection(plan->alg_id, plan->split_k, plan->split_k_mode);
    double err = 0.0;
    if (plan_matches_dense(*plan, data, stream, 3, &err)) {
      return AlgConfig{plan->alg_id, plan->split_k, plan->split_k_mode, "search"};
    }
    std::fprintf(stderr,
                 "RT-Lynx: cuSPARSELt's searched algorithm %d (split_k %d) gave a wrong product "
                 "(rel. error %.3g); trying every algorithm id\n",
                 plan->alg_id, plan->split_k, err);
  }

  int max_id = 0;
  RT_LYNX_CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(plan->handle, &plan->alg_selection,
                                                     CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID, &max_id,
                                                     sizeof(max_id)));
  int best_id = -1;
  float best_ms = std::numeric_limits<float>::infinity();
  std::string rejected;
  for (int id = 0; id < max_id; ++id) {
    try {
      plan->init_selection(id, 1, 0);
    } catch (const std::exception&) {
      continue;  // id not available for this problem
    }
    double err = 0.0;
    if (!plan_matches_dense(*plan, data, stream, 3, &err)) {
      rejected += " " + std::to_string(id);
      continue;
    }
    const float ms = time_plan_ms(*plan, data, stream, 5);
    if (ms < best_ms) {
      best_ms = ms;
      best_id = id;
    }
  }
  require(best_id >= 0, "RT-Lynx: no cuSPARSELt algorithm gives a correct product for M=",
              config_key.padded_rows, " K=", config_key.k, " N=", config_key.n,
              config_key.sparse_b ? " (sparse B)" : " (sparse A)", " (wrong ids:", rejected,
              ")");
  plan->init_selection(best_id, 1, 0);
  plan->read_selection();
  return AlgConfig{plan->alg_id, plan->split_k, plan->split_k_mode,
                   "sweep (wrong ids:" + rejected + ")"};
}

std::mutex& plan_mutex() {
  static std::mutex mutex;
  return mutex;
}

std::unordered_map<PlanKey, std::unique_ptr<GemmPlan>, PlanKeyHash>& plan_cache() {
  static std::unordered_map<PlanKey, std::unique_ptr<GemmPlan>, PlanKeyHash> cache;
  return cache;
}

GemmPlan& plan_for(const PlanKey& key, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(plan_mutex());
  auto& cache = plan_cache();
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  require(capture == cudaStreamCaptureStatusNone,
              "RT-Lynx: the sparse GEMM plan for M_padded=", key.padded_rows, " K=", key.k,
              " N=", key.n, " is searched and checked on first use, which cannot happen inside "
              "CUDA graph capture: run the layer once eagerly before capturing");
  const AlgConfig config = search_config(key, stream);
  auto plan = new_plan(key);
  plan->init_selection(config.alg_id, config.split_k, config.split_k_mode);
  plan->read_selection();
  plan->chosen_by = config.chosen_by;
  return *cache.emplace(key, std::move(plan)).first->second;
}

// The orientation sparse_linear and sparse_mm use (set by the Python self-test).
std::atomic<bool>& sparse_b_mode() {
  static std::atomic<bool> mode{false};
  return mode;
}

PlanKey key_for(const at::Tensor& x, int64_t padded_rows, int64_t n) {
  return PlanKey{x.get_device(), padded_rows, x.size(1), n, x.scalar_type() == at::kBFloat16,
                 sparse_b_mode().load()};
}




std::tuple<at::Tensor, at::Tensor> sparsify_op(const at::Tensor& x_in, int64_t padded_rows,
                                               bool fold, int64_t split, const char* op) {
  const auto x = checked_activation(x_in, op);
  const c10::cuda::CUDAGuard guard(x.device());
  require(padded_rows >= x.size(0) && padded_rows % kRowPad == 0, op,
              ": m_padded must be a multiple of 64 and >= M, got ", padded_rows, " for M=",
              x.size(0));
  require(split >= 0 && split <= 8 && (split & (split - 1)) == 0, op,
              ": split must be 0 (auto), 1, 2, 4 or 8");
  auto compressed = at::empty({compressed_numel(padded_rows, x.size(1))}, x.options());
  auto scale = at::empty({padded_rows}, x.options().dtype(at::kFloat));
  const auto stream = at::cuda::getCurrentCUDAStream();
  launch_sparsify_compress(x.data_ptr(), x.size(0), padded_rows, x.size(1), x.stride(0),
                           x.scalar_type() == at::kBFloat16, fold, compressed.data_ptr(),
                           scale.data_ptr<float>(), stream, static_cast<int>(split));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {compressed, scale};
}

std::tuple<at::Tensor, at::Tensor> sparsify_compress_op(const at::Tensor& x, int64_t padded_rows) {
  return sparsify_op(x, padded_rows, false, 0, "rt_lynx::sparsify_compress");
}

std::tuple<at::Tensor, at::Tensor> sparsify_compress_scaled_op(const at::Tensor& x,
                                                               int64_t padded_rows,
                                                               int64_t split) {
  return sparsify_op(x, padded_rows, true, split, "rt_lynx::sparsify_compress_scaled");
}

at::Tensor sparse_mm_op(const at::Tensor& compressed, const at::Tensor& weight,
                        int64_t padded_rows) {
  require(compressed.is_cuda() && compressed.dim() == 1 && compressed.is_contiguous(),
              "rt_lynx::sparse_mm: compressed must be the 1-D CUDA tensor of sparsify_compress");
  require(weight.dim() == 2, "rt_lynx::sparse_mm: weight must be 2-D");
  require(padded_rows > 0 && padded_rows % kRowPad == 0,
              "rt_lynx::sparse_mm: m_padded must be a positive multiple of 64");
  const int64_t k = weight.size(1);
  require(compressed.numel() == compressed_numel(padded_rows, k),
              "rt_lynx::sparse_mm: compressed has ", compressed.numel(), " elements, expected ",
              compressed_numel(padded_rows, k), " for ", padded_rows, "x", k);
  require(is_supported_dtype(compressed.scalar_type()) && k % 64 == 0,
              "rt_lynx::sparse_mm: needs bf16/fp16 and in_features % 64 == 0");
  require(weight.is_cuda() && weight.device() == compressed.device() &&
                  weight.scalar_type() == compressed.scalar_type() && weight.is_contiguous() &&
                  weight.size(0) % 16 == 0,
              "rt_lynx::sparse_mm: weight must be contiguous, same device and dtype as compressed,"
              " out_features % 16 == 0");
  const c10::cuda::CUDAGuard guard(compressed.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const PlanKey key{compressed.get_device(), padded_rows, k, weight.size(0),
                    compressed.scalar_type() == at::kBFloat16, sparse_b_mode().load()};
  auto& plan = plan_for(key, stream);
  auto out = at::empty({padded_rows, weight.size(0)}, weight.options());
  plan.run(compressed.data_ptr(), weight.data_ptr(), out.data_ptr(), stream, out.device());
  return out;
}

at::Tensor sparse_linear_op(const at::Tensor& x_in, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias_in, bool compensate) {
  const char* op = "rt_lynx::sparse_linear";
  const auto x = checked_activation(x_in, op);
  check_weight(weight, x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), k = x.size(1), n = weight.size(0);
  const int64_t padded_rows = round_up_rows(rows);
  const bool is_bf16 = x.scalar_type() == at::kBFloat16;

  const at::Tensor bias = checked_bias(bias_in, x, n, op);

  const auto stream = at::cuda::getCurrentCUDAStream();
  auto compressed = at::empty({compressed_numel(padded_rows, k)}, x.options());
  launch_sparsify_compress(x.data_ptr(), rows, padded_rows, k, x.stride(0), is_bf16, compensate,
                           compressed.data_ptr(), nullptr, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Both orientations leave D as M_padded x N row-major memory; y is its first M rows (a
  // contiguous view, no copy).
  auto out = at::empty({padded_rows, n}, x.options());
  auto& plan = plan_for(key_for(x, padded_rows, n), stream);
  plan.run(compressed.data_ptr(), weight.data_ptr(), out.data_ptr(), stream, x.device());
  if (bias.defined()) {
    // Bias only (the scale is in the values), in place over the first M rows.
    launch_scale_bias_epilogue(out.data_ptr(), out.data_ptr(), rows, n, nullptr, bias.data_ptr(),
                               bias.scalar_type() == at::kFloat, is_bf16, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return padded_rows == rows ? out : out.narrow(0, 0, rows);
}

at::Tensor scale_bias_epilogue_op(const at::Tensor& gemm, const c10::optional<at::Tensor>& scale,
                                  const c10::optional<at::Tensor>& bias, int64_t rows) {
  const char* op = "rt_lynx::scale_bias_epilogue";
  require(gemm.is_cuda() && gemm.dim() == 2 && gemm.is_contiguous() &&
                  is_supported_dtype(gemm.scalar_type()) && gemm.size(1) % 8 == 0,
              op, ": gemm must be a contiguous 2-D bf16/fp16 CUDA tensor with N % 8 == 0");
  require(rows >= 0 && rows <= gemm.size(0), op, ": rows out of range");
  const c10::cuda::CUDAGuard guard(gemm.device());
  const int64_t n = gemm.size(1);
  at::Tensor s, b;
  if (scale.has_value() && scale->defined()) {
    s = scale->to(at::kFloat).contiguous();
    require(s.numel() >= rows, op, ": scale has fewer than rows entries");
  }
  if (bias.has_value() && bias->defined()) {
    b = bias->scalar_type() == gemm.scalar_type() ? bias->contiguous()
                                                  : bias->to(at::kFloat).contiguous();
    require(b.numel() == n, op, ": bias must have N entries");
  }
  auto y = at::empty({rows, n}, gemm.options());
  launch_scale_bias_epilogue(gemm.data_ptr(), y.data_ptr(), rows, n,
                             s.defined() ? s.data_ptr<float>() : nullptr,
                             b.defined() ? b.data_ptr() : nullptr,
                             b.defined() && b.scalar_type() == at::kFloat,
                             gemm.scalar_type() == at::kBFloat16,
                             at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

// cuSPARSELt's own compression of a pruned dense M_padded x K matrix (x's memory) as the
// structured operand of the given orientation: the reference our layout is checked against.
at::Tensor compress_reference(const at::Tensor& pruned, bool sparse_b) {
  const bool fp8 = pruned.scalar_type() == at::kFloat8_e4m3fn;
  require(pruned.is_cuda() && pruned.dim() == 2 && pruned.is_contiguous() &&
              (fp8 || is_supported_dtype(pruned.scalar_type())) &&
              pruned.size(0) % kRowPad == 0 && pruned.size(1) % 64 == 0,
          "compress_reference: needs a contiguous bf16/fp16/e4m3 CUDA matrix, rows % 64 == 0, "
          "cols % 64 == 0");
  const c10::cuda::CUDAGuard guard(pruned.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const PlanKey key{pruned.get_device(), pruned.size(0), pruned.size(1), fp8 ? 64 : 16,
                    fp8 || pruned.scalar_type() == at::kBFloat16, sparse_b, fp8};
  auto plan = new_plan(key);
  const cusparseLtMatDescriptor_t* sparse = sparse_b ? &plan->mat_b : &plan->mat_a;
  size_t compressed_bytes = 0, buffer_bytes = 0;
  RT_LYNX_CSLT_CHECK(
      cusparseLtSpMMACompressedSize2(plan->handle, sparse, &compressed_bytes, &buffer_bytes));
  auto out = at::zeros({static_cast<int64_t>(compressed_bytes)},
                       pruned.options().dtype(at::kByte));
  auto buffer = at::empty({static_cast<int64_t>(std::max<size_t>(buffer_bytes, 1))},
                          pruned.options().dtype(at::kByte));
  RT_LYNX_CSLT_CHECK(cusparseLtSpMMACompress2(
      plan->handle, sparse, sparse_b ? 0 : 1, CUSPARSE_OPERATION_NON_TRANSPOSE,
      pruned.data_ptr(), out.data_ptr(), buffer.data_ptr(), stream));
  return out;
}


// ---- fp8 e4m3 path (separate ops; the 16-bit path above is unchanged) ----

// Orientation of the fp8 GEMM, set by the fp8 self-test (kernels/fp8.py).
std::atomic<bool>& fp8_sparse_b_mode() {
  static std::atomic<bool> mode{false};
  return mode;
}

std::tuple<at::Tensor, at::Tensor> sparsify_fp8_op(const at::Tensor& x_in, int64_t padded_rows,
                                                   bool compensate, int64_t split) {
  const char* op = "rt_lynx::sparsify_fp8";
  const auto x = checked_activation(x_in, op);
  const c10::cuda::CUDAGuard guard(x.device());
  require(padded_rows >= x.size(0) && padded_rows % kRowPad == 0, op,
          ": m_padded must be a multiple of 64 and >= M, got ", padded_rows, " for M=",
          x.size(0));
  require(split >= 0 && split <= 8 && (split & (split - 1)) == 0, op,
          ": split must be 0 (auto), 1, 2, 4 or 8");
  auto compressed = at::empty({fp8_compressed_bytes(padded_rows, x.size(1))},
                              x.options().dtype(at::kByte));
  auto scale = at::empty({padded_rows}, x.options().dtype(at::kFloat));
  launch_sparsify_fp8(x.data_ptr(), x.size(0), padded_rows, x.size(1), x.stride(0),
                      x.scalar_type() == at::kBFloat16, compensate, compressed.data_ptr(),
                      scale.data_ptr<float>(), at::cuda::getCurrentCUDAStream(),
                      static_cast<int>(split));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {compressed, scale};
}


// Dense e4m3 rows for the fp8 dense linear (kernels/fp8_dense.py): q (M x K) and a (M x 1, the
// row-wise scale shape torch._scaled_mm takes). With gelu_tail the rows quantised are
// [x row, gelu_tanh(gelu_tail row)] (FLUX's single-block linear2 input), K = both widths.
std::tuple<at::Tensor, at::Tensor> quantize_rows_fp8_op(const at::Tensor& x_in,
                                                        const std::optional<at::Tensor>& gelu_tail_in) {
  const char* op = "rt_lynx::quantize_rows_fp8";
  require(x_in.is_cuda() && x_in.dim() == 2 && is_supported_dtype(x_in.scalar_type()) && x_in.size(0) >= 1, op,
          ": x must be a 2-D bfloat16/float16 CUDA tensor with at least one row");
  const bool has_tail = gelu_tail_in.has_value() && gelu_tail_in->defined();
  if (has_tail) {
    require(gelu_tail_in->device() == x_in.device() && gelu_tail_in->scalar_type() == x_in.scalar_type() &&
                gelu_tail_in->dim() == 2 && gelu_tail_in->size(0) == x_in.size(0) && gelu_tail_in->size(1) >= 16 &&
                gelu_tail_in->size(1) % 16 == 0,
            op, ": gelu_tail must be a 2-D tensor of x's rows, dtype and device, its width a multiple of 16");
  }
  const int64_t k = x_in.size(1) + (has_tail ? gelu_tail_in->size(1) : 0);
  require(x_in.size(1) >= 16 && x_in.size(1) % 16 == 0 && k <= kQuantizeMaxCols, op,
          ": in_features must be a multiple of 16 up to ", kQuantizeMaxCols, " in all, got x's ", x_in.size(1),
          " (", k, " in all)");
  const auto x = with_aligned_rows(x_in);
  const auto tail = has_tail ? with_aligned_rows(*gelu_tail_in) : at::Tensor();
  const c10::cuda::CUDAGuard guard(x.device());
  auto q = at::empty({x.size(0), k}, x.options().dtype(at::kFloat8_e4m3fn));
  auto scale = at::empty({x.size(0), 1}, x.options().dtype(at::kFloat));
  launch_quantize_rows_fp8(x.data_ptr(), x.size(0), x.size(1), x.stride(0), x.scalar_type() == at::kBFloat16,
                           q.data_ptr(), scale.data_ptr<float>(), at::cuda::getCurrentCUDAStream(),
                           has_tail ? tail.data_ptr() : nullptr, has_tail ? tail.size(1) : 0,
                           has_tail ? tail.stride(0) : 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, scale};
}

// y = x @ (wq * w_scale)^T + bias for the few rows of a per-image linear (kernels/fp8_dense.py): the
// weight read in e4m3, x kept in 16 bits.
at::Tensor linear_e4m3_weight_op(const at::Tensor& x_in, const at::Tensor& wq, const at::Tensor& w_scale,
                                 const std::optional<at::Tensor>& bias_in) {
  const char* op = "rt_lynx::linear_e4m3_weight";
  require(x_in.is_cuda() && x_in.dim() == 2 && is_supported_dtype(x_in.scalar_type()) && x_in.size(0) >= 1 &&
              x_in.size(0) <= kGemvMaxRows,
          op, ": x must be a 2-D bfloat16/float16 CUDA tensor of 1 to ", kGemvMaxRows, " rows");
  const int64_t k = x_in.size(1), n = wq.size(0);
  require(wq.device() == x_in.device() && wq.scalar_type() == at::kFloat8_e4m3fn && wq.dim() == 2 &&
              wq.size(1) == k && wq.is_contiguous() && n >= 1 && reinterpret_cast<uintptr_t>(wq.data_ptr()) % 16 == 0,
          op, ": wq must be a contiguous, 16-byte aligned e4m3 (out_features, ", k, ") tensor on x's device");
  require(k >= 16 && k % 16 == 0 && x_in.size(0) * k * 2 <= kGemvMaxSharedBytes, op,
          ": in_features must be a multiple of 16 with rows * in_features <= ", kGemvMaxSharedBytes / 2, ", got ",
          x_in.size(0), " x ", k);
  require(w_scale.device() == x_in.device() && w_scale.scalar_type() == at::kFloat && w_scale.numel() == n &&
              w_scale.is_contiguous(),
          op, ": w_scale must be a contiguous fp32 tensor of one value per output channel");
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  if (has_bias) {
    require(bias_in->device() == x_in.device() && bias_in->scalar_type() == x_in.scalar_type() &&
                bias_in->numel() == n && bias_in->is_contiguous(),
            op, ": bias must be a contiguous tensor of out_features values in x's dtype, on its device");
  }
  const auto x = with_aligned_rows(x_in);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({x.size(0), n}, x.options());
  launch_e4m3_weight_gemv(x.data_ptr(), x.size(0), x.stride(0), x.scalar_type() == at::kBFloat16, wq.data_ptr(),
                          k, n, w_scale.data_ptr<float>(), has_bias ? bias_in->data_ptr() : nullptr, y.data_ptr(),
                          y.stride(0), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

// cat((a, gelu_tanh(b)), -1) for 2-D 16-bit a, b of the same rows (kernels/block_ops.py).
at::Tensor cat_gelu_tanh_op(const at::Tensor& a_in, const at::Tensor& b_in) {
  const char* op = "rt_lynx::cat_gelu_tanh";
  require(a_in.is_cuda() && a_in.dim() == 2 && is_supported_dtype(a_in.scalar_type()), op,
          ": a must be a 2-D bfloat16/float16 CUDA tensor");
  require(b_in.device() == a_in.device() && b_in.scalar_type() == a_in.scalar_type() && b_in.dim() == 2 &&
              b_in.size(0) == a_in.size(0),
          op, ": b must be a 2-D tensor of a's rows, dtype and device");
  require(a_in.size(1) % 8 == 0 && a_in.size(1) >= 8 && b_in.size(1) % 8 == 0 && b_in.size(1) >= 8, op,
          ": both widths must be positive multiples of 8, got ", a_in.size(1), " and ", b_in.size(1));
  const auto a = with_aligned_rows(a_in);
  const auto b = with_aligned_rows(b_in);
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({a.size(0), a.size(1) + b.size(1)}, a.options());
  launch_cat_gelu_tanh(a.data_ptr(), a.stride(0), a.size(1), b.data_ptr(), b.stride(0), b.size(1), a.size(0),
                       a.scalar_type() == at::kBFloat16, out.data_ptr(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

GemmPlan& fp8_plan(const at::Tensor& like, int64_t padded_rows, int64_t k, int64_t n,
                   cudaStream_t stream) {
  return plan_for(PlanKey{like.get_device(), padded_rows, k, n, true,
                          fp8_sparse_b_mode().load(), true},
                  stream);
}

at::Tensor sparse_mm_fp8_op(const at::Tensor& compressed, const at::Tensor& wq,
                            int64_t padded_rows) {
  const char* op = "rt_lynx::sparse_mm_fp8";
  require(compressed.is_cuda() && compressed.dim() == 1 && compressed.is_contiguous() &&
              compressed.scalar_type() == at::kByte,
          op, ": compressed must be the 1-D uint8 CUDA tensor of sparsify_fp8");
  require(padded_rows > 0 && padded_rows % kRowPad == 0, op,
          ": m_padded must be a positive multiple of 64");
  require(wq.dim() == 2 && wq.size(1) % 64 == 0, op, ": wq must be 2-D, in_features % 64 == 0");
  const int64_t k = wq.size(1), n = wq.size(0);
  require(compressed.numel() == fp8_compressed_bytes(padded_rows, k), op, ": compressed has ",
          compressed.numel(), " bytes, expected ", fp8_compressed_bytes(padded_rows, k));
  const auto scale_stub = at::empty({n}, compressed.options().dtype(at::kFloat));
  check_fp8_weight(wq, scale_stub, k, compressed.device(), op);
  const c10::cuda::CUDAGuard guard(compressed.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto& plan = fp8_plan(compressed, padded_rows, k, n, stream);
  auto out = at::empty({padded_rows, n}, compressed.options().dtype(at::kBFloat16));
  plan.run(compressed.data_ptr(), wq.data_ptr(), out.data_ptr(), stream, out.device());
  return out;
}

at::Tensor sparse_linear_fp8_op(const at::Tensor& x_in, const at::Tensor& wq,
                                const at::Tensor& w_scale,
                                const c10::optional<at::Tensor>& bias_in, bool compensate) {
  const char* op = "rt_lynx::sparse_linear_fp8";
  const auto x = checked_activation(x_in, op);
  check_fp8_weight(wq, w_scale, x.size(1), x.device(), op);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), k = x.size(1), n = wq.size(0);
  const int64_t padded_rows = round_up_rows(rows);
  const bool is_bf16 = x.scalar_type() == at::kBFloat16;
  const at::Tensor bias = checked_bias(bias_in, x, n, op);
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto compressed = at::empty({fp8_compressed_bytes(padded_rows, k)}, x.options().dtype(at::kByte));
  auto token_scale = at::empty({padded_rows}, x.options().dtype(at::kFloat));
  launch_sparsify_fp8(x.data_ptr(), rows, padded_rows, k, x.stride(0), is_bf16, compensate,
                      compressed.data_ptr(), token_scale.data_ptr<float>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto& plan = fp8_plan(x, padded_rows, k, n, stream);
  auto d = at::empty({padded_rows, n}, x.options().dtype(at::kBFloat16));
  plan.run(compressed.data_ptr(), wq.data_ptr(), d.data_ptr(), stream, x.device());
  // Scales and bias in place over the first M rows (bf16 D -> x's dtype, same element size).
  launch_fp8_epilogue(d.data_ptr(), d.data_ptr(), rows, n, token_scale.data_ptr<float>(),
                      w_scale.data_ptr<float>(), bias.defined() ? bias.data_ptr() : nullptr,
                      bias.defined() && bias.scalar_type() == at::kFloat, is_bf16, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto y = is_bf16 ? d : d.view(at::kHalf);
  return padded_rows == rows ? y : y.narrow(0, 0, rows);
}

at::Tensor fp8_epilogue_op(const at::Tensor& d, const at::Tensor& token_scale,
                           const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias_in,
                           int64_t rows, at::ScalarType out_dtype) {
  const char* op = "rt_lynx::fp8_epilogue";
  require(d.is_cuda() && d.dim() == 2 && d.is_contiguous() && d.scalar_type() == at::kBFloat16 &&
              d.size(1) % 8 == 0,
          op, ": d must be a contiguous 2-D bf16 CUDA tensor with N % 8 == 0");
  require(is_supported_dtype(out_dtype), op, ": out_dtype must be bfloat16 or float16");
  require(rows >= 0 && rows <= d.size(0), op, ": rows out of range");
  const int64_t n = d.size(1);
  const c10::cuda::CUDAGuard guard(d.device());
  const auto a = token_scale.to(at::kFloat).contiguous();
  const auto ws = w_scale.to(at::kFloat).contiguous();
  require(a.numel() >= rows && ws.numel() == n, op, ": scale sizes do not match d");
  at::Tensor b;
  if (bias_in.has_value() && bias_in->defined()) {
    b = bias_in->scalar_type() == out_dtype ? bias_in->contiguous()
                                            : bias_in->to(at::kFloat).contiguous();
    require(b.numel() == n, op, ": bias must have N entries");
  }
  auto y = at::empty({rows, n}, d.options().dtype(out_dtype));
  launch_fp8_epilogue(d.data_ptr(), y.data_ptr(), rows, n, a.data_ptr<float>(),
                      ws.data_ptr<float>(), b.defined() ? b.data_ptr() : nullptr,
                      b.defined() && b.scalar_type() == at::kFloat,
                      out_dtype == at::kBFloat16, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

void set_fp8_sparse_b(bool on) { fp8_sparse_b_mode().store(on); }
bool get_fp8_sparse_b() { return fp8_sparse_b_mode().load(); }

void set_sparse_b(bool on) { sparse_b_mode().store(on); }
bool get_sparse_b() { return sparse_b_mode().load(); }

std::vector<int64_t> cusparselt_versions() {
  int major = 0, minor = 0, patch = 0;
  RT_LYNX_CSLT_CHECK(cusparseLtGetProperty(MAJOR_VERSION, &major));
  RT_LYNX_CSLT_CHECK(cusparseLtGetProperty(MINOR_VERSION, &minor));
  RT_LYNX_CSLT_CHECK(cusparseLtGetProperty(PATCH_LEVEL, &patch));
  return {major, minor, patch, CUSPARSELT_VER_MAJOR, CUSPARSELT_VER_MINOR, CUSPARSELT_VER_PATCH};
}

std::vector<std::tuple<int64_t, int64_t, int64_t, bool, int64_t, int64_t, int64_t, int64_t,
                       std::string>>
plan_info() {
  std::lock_guard<std::mutex> lock(plan_mutex());
  std::vector<std::tuple<int64_t, int64_t, int64_t, bool, int64_t, int64_t, int64_t, int64_t,
                         std::string>>
      rows;
  for (const auto& entry : plan_cache()) {
    const auto& p = *entry.second;
    rows.emplace_back(p.key.padded_rows, p.key.k, p.key.n, p.key.bf16, p.alg_id, p.split_k,
                      p.split_k_mode, static_cast<int64_t>(p.workspace_bytes),
                      std::string(p.key.fp8 ? "e4m3, " : "") +
                          (p.key.sparse_b ? "sparse B, " : "sparse A, ") + p.chosen_by);
  }
  return rows;
}

void clear_plans() {
  std::lock_guard<std::mutex> lock(plan_mutex());
  plan_cache().clear();
}

}  // namespace
}  // namespace rt_lynx

TORCH_LIBRARY_IMPL(rt_lynx, CUDA, m) {
  m.impl("sparsify_compress", &rt_lynx::sparsify_compress_op);
  m.impl("sparsify_compress_scaled", &rt_lynx::sparsify_compress_scaled_op);
  m.impl("sparse_mm", &rt_lynx::sparse_mm_op);
  m.impl("sparse_linear", &rt_lynx::sparse_linear_op);
  m.impl("scale_bias_epilogue", &rt_lynx::scale_bias_epilogue_op);
  m.impl("sparsify_fp8", &rt_lynx::sparsify_fp8_op);
  m.impl("sparse_mm_fp8", &rt_lynx::sparse_mm_fp8_op);
  m.impl("sparse_linear_fp8", &rt_lynx::sparse_linear_fp8_op);
  m.impl("fp8_epilogue", &rt_lynx::fp8_epilogue_op);
  m.impl("quantize_rows_fp8", &rt_lynx::quantize_rows_fp8_op);
  m.impl("linear_e4m3_weight", &rt_lynx::linear_e4m3_weight_op);
  m.impl("cat_gelu_tanh", &rt_lynx::cat_gelu_tanh_op);
}

void register_sm90_functions(pybind11::module& m);  // sm90_ops.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_sm90_functions(m);
  m.def("cusparselt_versions", &rt_lynx::cusparselt_versions,
        "(runtime major, minor, patch, header major, minor, patch) of cuSPARSELt");
  m.def("plan_info", &rt_lynx::plan_info,
        "cached plans: (M_padded, K, N, bf16, alg_id, split_k, split_k_mode, workspace, chosen_by)");
  m.def("clear_plans", &rt_lynx::clear_plans, "drop every cached cuSPARSELt plan");
  m.def("compress_reference", &rt_lynx::compress_reference,
        "cuSPARSELt's compression of a pruned M_padded x K matrix (bytes) as operand B or A");
  m.def("set_sparse_b", &rt_lynx::set_sparse_b,
        "True: activations are the structured B operand; False: operand A (default)");
  m.def("sparse_b", &rt_lynx::get_sparse_b, "the orientation in use");
  m.def("sparsify_split_for", &rt_lynx::sparsify_split_for,
        "warps per row pair the sparsify kernel uses for (m_padded, K)");
  m.def("sparsify_fp8_split_for", &rt_lynx::sparsify_fp8_split_for,
        "warps per row pair the fp8 sparsify kernel uses for (m_padded, K)");
  m.def("set_fp8_sparse_b", &rt_lynx::set_fp8_sparse_b,
        "fp8 GEMM orientation: True = activations are the structured B operand");
  m.def("fp8_sparse_b", &rt_lynx::get_fp8_sparse_b, "the fp8 orientation in use");
}
