// RT-Lynx torch ops over the sm90 CUTLASS sparse GEMM library (sm90_sparse_gemm.h).
//
// The library is built apart from this extension (no torch in it: its CUTLASS kernels take
// minutes to compile and do not depend on the torch version) and loaded with dlopen by
// load_sm90_library. One call of sparse_linear_sm90 is: the fused sparsify pass (one read of x;
// values, metadata in CUTLASS's layout, per-token norm scale), then the sparse GEMM with the
// scale and the bias in its epilogue (one write of y). No pass over y afterwards.
//
// The GEMM config (tile, cluster, schedule) is chosen per (M, K, N, dtype) at the first call by
// timing every candidate on the call's own data; each candidate must also agree with the first
// one, so a config that computes garbage for a shape is never chosen.
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "lynx_kernels.h"
#include "op_checks.h"
#include "sm90_sparse_gemm.h"

namespace rt_lynx {
namespace {

struct Sm90Library {
  void* handle = nullptr;
  std::string path;
  decltype(&rt_lynx_sm90_api_version) api_version = nullptr;
  decltype(&rt_lynx_sm90_config_count) config_count = nullptr;
  decltype(&rt_lynx_sm90_config_info) config_info = nullptr;
  decltype(&rt_lynx_sm90_workspace_bytes) workspace_bytes = nullptr;
  decltype(&rt_lynx_sm90_gemm) gemm = nullptr;
  decltype(&rt_lynx_sm90_check_metadata_layout) check_metadata_layout = nullptr;
};

std::mutex& library_mutex() {
  static std::mutex mutex;
  return mutex;
}

Sm90Library& library_slot() {
  static Sm90Library library;
  return library;
}

template <class F>
bool resolve(void* handle, const char* name, F& target, std::string& error) {
  target = reinterpret_cast<F>(dlsym(handle, name));
  if (target == nullptr && error.empty()) error = std::string("symbol ") + name + " missing";
  return target != nullptr;
}

// "" when loaded (or already loaded from the same path), else the reason.
std::string load_sm90_library(const std::string& path) {
  std::lock_guard<std::mutex> lock(library_mutex());
  Sm90Library& library = library_slot();
  if (library.handle != nullptr) {
    return library.path == path ? "" : "another sm90 GEMM library is already loaded: " + library.path;
  }
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* reason = dlerror();
    return std::string("cannot load ") + path + ": " + (reason ? reason : "unknown error");
  }
  Sm90Library loaded;
  std::string error;
  resolve(handle, "rt_lynx_sm90_api_version", loaded.api_version, error);
  resolve(handle, "rt_lynx_sm90_config_count", loaded.config_count, error);
  resolve(handle, "rt_lynx_sm90_config_info", loaded.config_info, error);
  resolve(handle, "rt_lynx_sm90_workspace_bytes", loaded.workspace_bytes, error);
  resolve(handle, "rt_lynx_sm90_gemm", loaded.gemm, error);
  resolve(handle, "rt_lynx_sm90_check_metadata_layout", loaded.check_metadata_layout, error);
  if (error.empty() && loaded.api_version() != RT_LYNX_SM90_API_VERSION) {
    error = "sm90 GEMM library API version " + std::to_string(loaded.api_version()) + ", expected " +
            std::to_string(RT_LYNX_SM90_API_VERSION);
  }
  if (!error.empty()) {
    dlclose(handle);
    return path + ": " + error;
  }
  loaded.handle = handle;
  loaded.path = path;
  library = loaded;
  return "";
}

const Sm90Library& library(const char* op) {
  const Sm90Library& loaded = library_slot();
  require(loaded.handle != nullptr, op, ": the sm90 sparse GEMM library is not loaded");
  return loaded;
}

int element_of(at::ScalarType type) {
  switch (type) {
    case at::kBFloat16: return RT_LYNX_BF16;
    case at::kHalf: return RT_LYNX_FP16;
    case at::kFloat8_e4m3fn: return RT_LYNX_E4M3;
    default: return -1;
  }
}

RtLynxSm90Config config_info(const Sm90Library& lib, int element, int config, const char* op) {
  RtLynxSm90Config info{};
  require(lib.config_info(element, config, &info) == 0, op, ": no sm90 GEMM config ", config);
  return info;
}

int sm_count(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, int> counts;
  std::lock_guard<std::mutex> lock(mutex);
  auto hit = counts.find(device);
  if (hit != counts.end()) return hit->second;
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  counts[device] = count;
  return count;
}

// The compressed activations for one metadata layout: values (rows padded to 64) then metadata,
// over cols logical columns (K, plus the K extension of a low-rank branch).
struct Compressed {
  at::Tensor buffer;  // compressed_numel (x's dtype) or fp8_compressed_bytes (e4m3), op_checks.h
  at::Tensor scale;   // per token: s (16-bit, when compensating) or a (e4m3); undefined = 1
  int64_t padded_rows = 0;
  int64_t cols = 0;

  const void* values() const { return buffer.data_ptr(); }
  const void* metadata(bool e4m3) const {
    const int64_t value_bytes = padded_rows * cols / 2 * (e4m3 ? 1 : 2);
    return static_cast<const uint8_t*>(buffer.data_ptr()) + value_bytes;
  }
};

// The low-rank branch as the sm90 GEMM takes it: u = x down^T goes into k_ext extra columns of
// the compressed activations, up_ext (N x 2 * rank rounded up, kernels/sm90.py builds it) is the
// second B operand. k_ext is the stored columns of up_ext rounded up to the config's metadata
// block, which is its tile K: one k-tile of 64 columns for a rank up to 32 on the 64-wide
// configs, 128 on the others (the GEMM switches to up_ext at a k-tile boundary).
int64_t k_extension_columns(int64_t up_ext_cols, int64_t metadata_block) {
  return up_ext_cols > 0 ? (up_ext_cols + metadata_block - 1) / metadata_block * metadata_block : 0;
}

int64_t stored_columns(const at::Tensor& up_ext) { return up_ext.defined() ? up_ext.size(1) : 0; }

struct LowRankOperands {
  at::Tensor down;    // rank x K, x's dtype
  at::Tensor up_ext;  // undefined: no branch
  bool present() const { return up_ext.defined(); }
  int64_t k_ext(int64_t metadata_block) const { return k_extension_columns(stored_columns(up_ext), metadata_block); }
};

// The producer's work fused into the sparsify pass (SparsifyPrologue): none, a DiT block's
// LayerNorm + modulation (shift and 1 + scale per image), or an MLP's GELU.
struct Prologue {
  int kind = kPrologueNone;
  at::Tensor shift, scale1p;  // LayerNorm + modulation: images x K, x's dtype, contiguous, 16-byte aligned
  int64_t tokens = 1;
  double eps = 0.0;
  bool present() const { return kind != kPrologueNone; }
  SparsifyPrologue launch_args() const {
    if (kind != kPrologueLayerNormModulation) return {kind};
    return {kind, shift.data_ptr(), scale1p.data_ptr(), tokens, static_cast<float>(eps)};
  }
};

// t itself when contiguous and 16-byte aligned (the kernels' vector loads, TMA), else such a copy.
at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

void check_prologue_fits(const at::Tensor& x, const char* op) {
  require(sparsify_prologue_supported(round_up_rows(x.size(0)), x.size(1)), op, ": rows of ", x.size(1),
          " columns are too long for a sparsify pass with a prologue");
}

// The LayerNorm + modulation operands checked against x (rows x K) and made contiguous and aligned.
Prologue checked_modulation(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale1p, int64_t tokens,
                            double eps, const char* op) {
  require(tokens >= 1 && x.size(0) % tokens == 0, op, ": ", x.size(0), " rows are not whole images of ", tokens,
          " tokens");
  const int64_t images = x.size(0) / tokens;
  for (const at::Tensor* t : {&shift, &scale1p}) {
    require(t->dim() == 2 && t->size(0) == images && t->size(1) == x.size(1) && t->scalar_type() == x.scalar_type() &&
                t->device() == x.device(),
            op, ": shift and scale1p must be ", images, " x ", x.size(1), " in x's dtype on x's device");
  }
  require(eps > 0.0, op, ": eps must be positive");
  check_prologue_fits(x, op);
  return {kPrologueLayerNormModulation, contiguous_aligned(shift), contiguous_aligned(scale1p), tokens, eps};
}

Prologue checked_gelu(const at::Tensor& x, const char* op) {
  check_prologue_fits(x, op);
  return {kPrologueGeluTanh};
}

Compressed sparsify(const at::Tensor& x, bool e4m3, bool compensate, int metadata_block,
                    const LowRankOperands& low_rank = {}, const Prologue& prologue = {}) {
  const int64_t rank = low_rank.present() ? low_rank.down.size(0) : 0;
  require(!(prologue.present() && rank > kMaxFusedRank),
          "rt_lynx: a sparsify pass with a prologue takes a low-rank branch only in its fused down projection (rank <= ",
          kMaxFusedRank, ")");
  // With a prologue the fused down pass is the only one there is: the switch does not apply.
  const bool fused_down = rank > 0 && (sparsify_low_rank_fused(rank) || prologue.present());
  Compressed c;
  c.padded_rows = round_up_rows(x.size(0));
  const int64_t k = x.size(1);
  c.cols = k + low_rank.k_ext(metadata_block);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool is_bf16 = x.scalar_type() == at::kBFloat16;
  if (e4m3) {
    require(!low_rank.present(), "rt_lynx: the e4m3 GEMM takes no low-rank extension");
    c.buffer = at::empty({fp8_compressed_bytes(c.padded_rows, k)}, x.options().dtype(at::kByte));
    c.scale = at::empty({c.padded_rows}, x.options().dtype(at::kFloat));
    launch_sparsify_fp8(x.data_ptr(), x.size(0), c.padded_rows, k, x.stride(0), is_bf16, compensate,
                        c.buffer.data_ptr(), c.scale.data_ptr<float>(), stream, 0, metadata_block,
                        prologue.launch_args());
  } else {
    c.buffer = at::empty({compressed_numel(c.padded_rows, c.cols)}, x.options());
    if (compensate) c.scale = at::empty({c.padded_rows}, x.options().dtype(at::kFloat));
    float* scale = compensate ? c.scale.data_ptr<float>() : nullptr;
    if (fused_down) {
      // down(x) on tensor cores in the same pass over x (its tiles are copied 16 bytes at a time).
      const at::Tensor down = contiguous_aligned(low_rank.down);
      const at::Tensor workspace =
          at::empty({sparsify_low_rank_workspace_floats(c.padded_rows, k)}, x.options().dtype(at::kFloat));
      launch_sparsify_low_rank(x.data_ptr(), x.size(0), c.padded_rows, k, x.stride(0), is_bf16, down.data_ptr(),
                               rank, c.buffer.data_ptr(), c.cols, scale, metadata_block,
                               workspace.data_ptr<float>(), stream, prologue.launch_args());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return c;
    }
    // Else u = down(x) first (cuBLAS, rows x rank): the sparsify pass writes it into the extension.
    const at::Tensor u = rank > 0 ? at::mm(x, low_rank.down.t()).contiguous() : at::Tensor();
    launch_sparsify_compress(x.data_ptr(), x.size(0), c.padded_rows, k, x.stride(0), is_bf16, false,
                             c.buffer.data_ptr(), scale, stream, 0,
                             metadata_block, c.cols, u.defined() ? u.data_ptr() : nullptr,
                             u.defined() ? u.size(1) : 0, prologue.launch_args());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c;
}

// What the GEMM's epilogue applies besides the per-token scale: the e4m3 channel scale, the bias
// (x's dtype) and a DiT block's gated residual, y = residual + gate * product (residual rows x N
// and gate N values, both x's dtype, contiguous and 16-byte aligned; undefined: none).
struct Epilogue {
  at::Tensor col_scale, bias, residual, gate;
  bool has_residual() const { return residual.defined(); }
};

// Residual and gate checked against x (rows x K) and a product of n features; copied where
// not contiguous or not 16-byte aligned (TMA reads the residual).
void check_gated_residual(Epilogue& epilogue, const at::Tensor& x, int64_t n, const c10::optional<at::Tensor>& residual,
                          const c10::optional<at::Tensor>& gate, const char* op) {
  const bool has_residual = residual.has_value() && residual->defined();
  const bool has_gate = gate.has_value() && gate->defined();
  require(has_residual || !has_gate, op, ": gate is given only with a residual");
  if (!has_residual) return;
  require(residual->dim() == 2 && residual->size(0) == x.size(0) && residual->size(1) == n &&
              residual->scalar_type() == x.scalar_type() && residual->device() == x.device(),
          op, ": residual must be ", x.size(0), " x ", n, " in x's dtype on x's device");
  epilogue.residual = contiguous_aligned(*residual);
  if (has_gate) {
    require(gate->numel() == n && gate->scalar_type() == x.scalar_type() && gate->device() == x.device(), op,
            ": gate must hold ", n, " values (one image's) in x's dtype on x's device");
    epilogue.gate = contiguous_aligned(gate->reshape({n}));
  }
}

// Runs the GEMM of one config into y (rows x N, out dtype); a.cols - K columns of a multiply up_ext.
void run_gemm(const Sm90Library& lib, int config, const Compressed& a, bool e4m3, const at::Tensor& weight,
              const Epilogue& epilogue, const at::Tensor& y, const char* op, const at::Tensor& up_ext = {}) {
  const int in_element = element_of(weight.scalar_type());
  RtLynxSm90Gemm g{};
  g.in_element = in_element;
  g.out_element = element_of(y.scalar_type());
  g.config = config;
  g.m = y.size(0);
  g.n = weight.size(0);
  g.k = weight.size(1);
  g.k_ext = a.cols - g.k;
  const int64_t block = up_ext.defined() ? config_info(lib, in_element, config, op).metadata_block_k : 0;
  require(g.k_ext == k_extension_columns(stored_columns(up_ext), block), op,
          ": K extension differs from up_ext and the config's tile K");
  g.a_values = a.values();
  g.a_metadata = a.metadata(e4m3);
  g.b = weight.data_ptr();
  g.b_ext = g.k_ext > 0 ? up_ext.data_ptr() : nullptr;
  g.b_ext_cols = g.k_ext > 0 ? up_ext.size(1) : 0;
  g.d = y.data_ptr();
  g.row_scale = a.scale.defined() ? a.scale.data_ptr<float>() : nullptr;
  g.col_scale = epilogue.col_scale.defined() ? epilogue.col_scale.data_ptr<float>() : nullptr;
  g.bias = epilogue.bias.defined() ? epilogue.bias.data_ptr() : nullptr;
  g.residual = epilogue.residual.defined() ? epilogue.residual.data_ptr() : nullptr;
  g.gate = epilogue.gate.defined() ? epilogue.gate.data_ptr() : nullptr;
  g.sm_count = sm_count(y.get_device());
  g.stream = at::cuda::getCurrentCUDAStream();
  g.programmatic_launch = programmatic_launch() ? 1 : 0;
  const size_t workspace_bytes = lib.workspace_bytes(&g);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, y.options().dtype(at::kByte));
    g.workspace = workspace.data_ptr();
  }
  char error[512] = {0};
  const int status = lib.gemm(&g, error, sizeof(error));
  require(status == 0, op, ": sm90 sparse GEMM (config ", config, ", ", g.m, "x", g.k, "x", g.n,
          epilogue.has_residual() ? ", residual" : "", ") failed: ", error);
}

struct PlanKey {
  int device;
  int64_t rows, k, n, up_ext_cols;  // up_ext_cols: stored columns of a low-rank branch's up_ext, 0 for none
  int in_element, out_element;
  bool residual;                     // the residual instance (its own kernels, timed apart)
  bool operator==(const PlanKey& o) const {
    return device == o.device && rows == o.rows && k == o.k && n == o.n && up_ext_cols == o.up_ext_cols &&
           in_element == o.in_element && out_element == o.out_element && residual == o.residual;
  }
};

struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const {
    size_t h = std::hash<int64_t>()(key.rows);
    h = h * 1000003u ^ std::hash<int64_t>()(key.k);
    h = h * 1000003u ^ std::hash<int64_t>()(key.n);
    h = h * 1000003u ^ std::hash<int64_t>()(key.up_ext_cols);
    return h * 1000003u ^ size_t(key.device * 32 + key.in_element * 8 + key.out_element * 2 + key.residual);
  }
};

struct Plan {
  int config = 0;
  std::vector<float> candidate_us;  // per config; +inf for one that failed or disagreed
};

std::mutex& plan_mutex() {
  static std::mutex mutex;
  return mutex;
}

std::unordered_map<PlanKey, Plan, PlanKeyHash>& plans() {
  static std::unordered_map<PlanKey, Plan, PlanKeyHash> cache;
  return cache;
}

// Before any timing: the largest tile that still gives every SM a tile, else the smallest.
int heuristic_config(const Sm90Library& lib, int element, int64_t rows, int64_t n, int device) {
  const int count = lib.config_count(element);
  int best = 0;
  int64_t best_area = -1;
  for (int c = 0; c < count; ++c) {
    const auto info = config_info(lib, element, c, "rt_lynx");
    const int64_t tiles = ((rows + info.tile_m - 1) / info.tile_m) * ((n + info.tile_n - 1) / info.tile_n);
    const int64_t area = int64_t(info.tile_m) * info.tile_n;
    if (tiles >= sm_count(device) && area > best_area) {
      best = c;
      best_area = area;
    }
  }
  if (best_area < 0) {  // small problem: smallest tiles
    int64_t smallest = std::numeric_limits<int64_t>::max();
    for (int c = 0; c < count; ++c) {
      const auto info = config_info(lib, element, c, "rt_lynx");
      if (int64_t(info.tile_m) * info.tile_n < smallest) {
        smallest = int64_t(info.tile_m) * info.tile_n;
        best = c;
      }
    }
  }
  return best;
}

float relative_difference(const at::Tensor& a, const at::Tensor& b) {
  const auto diff = (a.to(at::kFloat) - b.to(at::kFloat)).norm().item<float>();
  const auto ref = b.to(at::kFloat).norm().item<float>();
  return ref > 0.f ? diff / ref : diff;
}

// Times every config on the call's own data. Rounds interleave the configs, so a clock or
// temperature drift during tuning shifts all of them alike; each config's score is the sum over
// rounds of its best time in the round. A measurement is kLaunches back-to-back launches behind
// one untimed launch, so the GPU is busy when the start event is recorded: the host's launch
// time (several us for a CUTLASS launch) stays out of the time of short GEMMs.
Plan tune(const Sm90Library& lib, const at::Tensor& x, bool e4m3, bool compensate, const at::Tensor& weight,
          const Epilogue& epilogue, at::ScalarType out_dtype, const char* op, const LowRankOperands& low_rank) {
  const int element = element_of(weight.scalar_type());
  const int count = lib.config_count(element);
  const auto stream = at::cuda::getCurrentCUDAStream();
  std::unordered_map<int, Compressed> by_block;
  std::vector<bool> usable(count, false);
  at::Tensor first;
  auto y = at::empty({x.size(0), weight.size(0)}, x.options().dtype(out_dtype));
  for (int c = 0; c < count; ++c) {
    const auto info = config_info(lib, element, c, op);
    if (by_block.find(info.metadata_block_k) == by_block.end()) {
      by_block.emplace(info.metadata_block_k, sparsify(x, e4m3, compensate, info.metadata_block_k, low_rank));
    }
    try {
      run_gemm(lib, c, by_block.at(info.metadata_block_k), e4m3, weight, epilogue, y, op, low_rank.up_ext);
    } catch (const std::exception&) {
      continue;  // this config cannot take the shape
    }
    if (!first.defined()) {
      first = y.clone();
    } else if (!(relative_difference(y, first) < 1e-2f)) {
      continue;  // disagrees with the first config: never chosen
    }
    usable[c] = true;
  }
  require(first.defined(), op, ": no sm90 GEMM config runs ", x.size(0), "x", x.size(1), "x", weight.size(0));
  constexpr int kRounds = 3, kRepeats = 2, kLaunches = 3;
  Plan plan;
  plan.candidate_us.assign(count, std::numeric_limits<float>::infinity());
  std::vector<float> score(count, 0.f);
  cudaEvent_t start, stop;
  C10_CUDA_CHECK(cudaEventCreate(&start));
  C10_CUDA_CHECK(cudaEventCreate(&stop));
  for (int round = 0; round < kRounds; ++round) {
    for (int c = 0; c < count; ++c) {
      if (!usable[c]) continue;
      const auto& a = by_block.at(config_info(lib, element, c, op).metadata_block_k);
      float best_ms = std::numeric_limits<float>::infinity();
      for (int r = 0; r < kRepeats; ++r) {
        run_gemm(lib, c, a, e4m3, weight, epilogue, y, op, low_rank.up_ext);
        C10_CUDA_CHECK(cudaEventRecord(start, stream));
        for (int l = 0; l < kLaunches; ++l) {
          run_gemm(lib, c, a, e4m3, weight, epilogue, y, op, low_rank.up_ext);
        }
        C10_CUDA_CHECK(cudaEventRecord(stop, stream));
        C10_CUDA_CHECK(cudaEventSynchronize(stop));
        float ms = 0.f;
        C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
        best_ms = std::min(best_ms, ms / kLaunches);
      }
      score[c] += best_ms;
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  plan.config = -1;
  for (int c = 0; c < count; ++c) {
    if (!usable[c]) continue;
    plan.candidate_us[c] = score[c] / kRounds * 1000.f;
    if (plan.config < 0 || plan.candidate_us[c] < plan.candidate_us[plan.config]) plan.config = c;
  }
  return plan;
}

int config_for(const Sm90Library& lib, const at::Tensor& x, bool e4m3, bool compensate, const at::Tensor& weight,
               const Epilogue& epilogue, at::ScalarType out_dtype, const char* op, const LowRankOperands& low_rank) {
  const PlanKey key{x.get_device(), x.size(0), x.size(1), weight.size(0), stored_columns(low_rank.up_ext),
                    element_of(weight.scalar_type()), element_of(out_dtype), epilogue.has_residual()};
  {
    std::lock_guard<std::mutex> lock(plan_mutex());
    auto hit = plans().find(key);
    if (hit != plans().end()) return hit->second.config;
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    // No timing (it synchronises) inside a CUDA graph capture: a fixed choice, not cached.
    return heuristic_config(lib, key.in_element, key.rows, key.n, key.device);
  }
  Plan plan = tune(lib, x, e4m3, compensate, weight, epilogue, out_dtype, op, low_rank);
  std::lock_guard<std::mutex> lock(plan_mutex());
  return plans().emplace(key, std::move(plan)).first->second.config;
}

// The Lynx linear once x and the weight are checked: sparsify for the chosen config's metadata
// layout (plus the low-rank branch's columns), then the GEMM with scale(s) and bias in its
// epilogue. e4m3 when the weight is.
// With a prologue, the config is chosen on x as it comes (the GEMM's time does not depend on the
// values) and the sparsify pass applies the prologue. With a residual (and gate), y is
// residual + gate * the product, in the GEMM's epilogue.
at::Tensor sparse_linear_checked(const Sm90Library& lib, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& col_scale, const c10::optional<at::Tensor>& bias_in,
                                 bool compensate, const char* op, const LowRankOperands& low_rank = {},
                                 const Prologue& prologue = {}, const c10::optional<at::Tensor>& residual = {},
                                 const c10::optional<at::Tensor>& gate = {}) {
  require(x.size(1) % 128 == 0, op, ": in_features must be a multiple of 128, got ", x.size(1));
  const c10::cuda::CUDAGuard guard(x.device());
  const bool e4m3 = weight.scalar_type() == at::kFloat8_e4m3fn;
  Epilogue epilogue;
  epilogue.col_scale = col_scale;
  epilogue.bias = checked_bias(bias_in, x, weight.size(0), op);
  if (epilogue.bias.defined() && epilogue.bias.scalar_type() != x.scalar_type()) {
    epilogue.bias = epilogue.bias.to(x.scalar_type());
  }
  check_gated_residual(epilogue, x, weight.size(0), residual, gate, op);
  const int config = config_for(lib, x, e4m3, compensate, weight, epilogue, x.scalar_type(), op, low_rank);
  const auto info = config_info(lib, element_of(weight.scalar_type()), config, op);
  const Compressed a = sparsify(x, e4m3, compensate, info.metadata_block_k, low_rank, prologue);
  auto y = at::empty({x.size(0), weight.size(0)}, x.options());
  run_gemm(lib, config, a, e4m3, weight, epilogue, y, op, low_rank.up_ext);
  return y;
}

at::Tensor sparse_linear_sm90_op(const at::Tensor& x_in, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias_in, bool compensate,
                                 const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& gate) {
  const char* op = "rt_lynx::sparse_linear_sm90";
  const auto& lib = library(op);
  const auto x = checked_activation(x_in, op);
  check_weight(weight, x, op);
  return sparse_linear_checked(lib, x, weight, at::Tensor(), bias_in, compensate, op, {}, {}, residual, gate);
}

// The Lynx linear plus its low-rank branch up(down(x)) in one GEMM: down is rank x K, up_ext the
// up factor in the K-extension form (N x 2 * rank rounded up to 8, scale folded in; kernels/sm90.py
// builds it).
LowRankOperands checked_low_rank(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& down,
                                 const at::Tensor& up_ext, const char* op) {
  require(down.dim() == 2 && down.size(1) == x.size(1) && down.size(0) >= 1 && down.scalar_type() == x.scalar_type() &&
              down.device() == x.device(),
          op, ": down must be rank x ", x.size(1), " in x's dtype on x's device");
  require(up_ext.dim() == 2 && up_ext.size(0) == weight.size(0) && up_ext.is_contiguous() &&
              up_ext.scalar_type() == x.scalar_type() && up_ext.device() == x.device(),
          op, ": up_ext must be a contiguous ", weight.size(0), " x k_ext matrix in x's dtype on x's device");
  require(reinterpret_cast<uintptr_t>(up_ext.data_ptr()) % 16 == 0, op, ": up_ext must be 16-byte aligned (TMA)");
  require(up_ext.size(1) % 8 == 0 && up_ext.size(1) >= 2 * down.size(0), op,
          ": up_ext must have a multiple of 8 columns, at least 2 * rank (", 2 * down.size(0), "), got ",
          up_ext.size(1));
  return {down, up_ext};
}

// The optional branch of the prologue ops: both factors or neither; bf16/fp16 products only.
LowRankOperands checked_optional_low_rank(const at::Tensor& x, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& down,
                                          const c10::optional<at::Tensor>& up_ext, const char* op) {
  const bool has_down = down.has_value() && down->defined(), has_up = up_ext.has_value() && up_ext->defined();
  require(has_down == has_up, op, ": give down and up_ext together");
  if (!has_down) return {};
  require(weight.scalar_type() != at::kFloat8_e4m3fn, op, ": the e4m3 GEMM takes no low-rank branch");
  return checked_low_rank(x, weight, *down, *up_ext, op);
}

at::Tensor sparse_linear_lora_sm90_op(const at::Tensor& x_in, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias_in, bool compensate,
                                      const at::Tensor& down, const at::Tensor& up_ext,
                                      const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& gate) {
  const char* op = "rt_lynx::sparse_linear_lora_sm90";
  const auto& lib = library(op);
  const auto x = checked_activation(x_in, op);
  check_weight(weight, x, op);
  return sparse_linear_checked(lib, x, weight, at::Tensor(), bias_in, compensate, op,
                               checked_low_rank(x, weight, down, up_ext, op), {}, residual, gate);
}

at::Tensor sparse_linear_fp8_sm90_op(const at::Tensor& x_in, const at::Tensor& wq, const at::Tensor& w_scale,
                                     const c10::optional<at::Tensor>& bias_in, bool compensate,
                                     const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& gate) {
  const char* op = "rt_lynx::sparse_linear_fp8_sm90";
  const auto& lib = library(op);
  const auto x = checked_activation(x_in, op);
  check_fp8_weight(wq, w_scale, x.size(1), x.device(), op);
  return sparse_linear_checked(lib, x, wq, w_scale, bias_in, compensate, op, {}, {}, residual, gate);
}

// The bf16/fp16 product's weight, or the e4m3 one with its channel scale (returned).
at::Tensor checked_weight_scale(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& w_scale,
                                const char* op) {
  if (weight.scalar_type() != at::kFloat8_e4m3fn) {
    check_weight(weight, x, op);
    require(!w_scale.has_value() || !w_scale->defined(), op, ": w_scale is for an e4m3 weight only");
    return at::Tensor();
  }
  require(w_scale.has_value() && w_scale->defined(), op, ": an e4m3 weight needs w_scale");
  check_fp8_weight(weight, *w_scale, x.size(1), x.device(), op);
  return *w_scale;
}

// The Lynx linear of a DiT block's normalised and modulated input: LayerNorm (no affine, eps) and
// x * scale1p + shift per image of `tokens` rows are computed inside the sparsify pass from x
// itself; the bf16/fp16 product, or e4m3 with w_scale when the weight is e4m3. With down and
// up_ext (bf16/fp16 only), the low-rank branch of the modulated input too, in the fused down pass.
at::Tensor sparse_linear_modulated_sm90_op(const at::Tensor& x_in, const at::Tensor& shift, const at::Tensor& scale1p,
                                           int64_t tokens, double eps, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& w_scale,
                                           const c10::optional<at::Tensor>& bias_in, bool compensate,
                                           const c10::optional<at::Tensor>& down,
                                           const c10::optional<at::Tensor>& up_ext) {
  const char* op = "rt_lynx::sparse_linear_modulated_sm90";
  const auto& lib = library(op);
  const auto x = checked_activation(x_in, op);
  const at::Tensor col_scale = checked_weight_scale(x, weight, w_scale, op);
  const c10::cuda::CUDAGuard guard(x.device());
  return sparse_linear_checked(lib, x, weight, col_scale, bias_in, compensate, op,
                               checked_optional_low_rank(x, weight, down, up_ext, op),
                               checked_modulation(x, shift, scale1p, tokens, eps, op));
}

// The Lynx linear of an MLP's activation gelu(x) (tanh approximation), computed inside the
// sparsify pass from x, the up projection's output; down and up_ext as above; residual and gate
// as in sparse_linear_checked.
at::Tensor sparse_linear_gelu_sm90_op(const at::Tensor& x_in, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& w_scale,
                                      const c10::optional<at::Tensor>& bias_in, bool compensate,
                                      const c10::optional<at::Tensor>& down,
                                      const c10::optional<at::Tensor>& up_ext,
                                      const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& gate) {
  const char* op = "rt_lynx::sparse_linear_gelu_sm90";
  const auto& lib = library(op);
  const auto x = checked_activation(x_in, op);
  const at::Tensor col_scale = checked_weight_scale(x, weight, w_scale, op);
  const c10::cuda::CUDAGuard guard(x.device());
  return sparse_linear_checked(lib, x, weight, col_scale, bias_in, compensate, op,
                               checked_optional_low_rank(x, weight, down, up_ext, op), checked_gelu(x, op), residual,
                               gate);
}

// Pieces for tests and benchmarks: the sparsify pass for one metadata layout (with the optional
// prologue), and the GEMM of one config on its output.
std::tuple<at::Tensor, at::Tensor> sparsify_sm90_op(const at::Tensor& x_in, int64_t metadata_block, bool e4m3,
                                                    bool compensate, const c10::optional<at::Tensor>& shift,
                                                    const c10::optional<at::Tensor>& scale1p, int64_t tokens,
                                                    double eps, bool gelu) {
  const char* op = "rt_lynx::sparsify_sm90";
  const auto x = checked_activation(x_in, op);
  require(metadata_block == 64 || metadata_block == 128, op, ": metadata_block must be 64 or 128");
  require(!e4m3 || metadata_block == 128, op, ": e4m3 uses metadata_block 128");
  require(x.size(1) % 128 == 0, op, ": in_features must be a multiple of 128");
  const bool modulated = shift.has_value() && shift->defined();
  require(modulated == (scale1p.has_value() && scale1p->defined()), op, ": give shift and scale1p together");
  require(!(modulated && gelu), op, ": one prologue at a time");
  const c10::cuda::CUDAGuard guard(x.device());
  const Prologue prologue = modulated ? checked_modulation(x, *shift, *scale1p, tokens, eps, op)
                            : gelu    ? checked_gelu(x, op)
                                      : Prologue{};
  Compressed c = sparsify(x, e4m3, compensate, static_cast<int>(metadata_block), {}, prologue);
  at::Tensor scale = c.scale.defined() ? c.scale : at::ones({c.padded_rows}, x.options().dtype(at::kFloat));
  return {c.buffer, scale};
}

at::Tensor sparse_mm_sm90_op(const at::Tensor& compressed, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& row_scale, const c10::optional<at::Tensor>& col_scale,
                             const c10::optional<at::Tensor>& bias_in, int64_t rows, int64_t config,
                             at::ScalarType out_dtype, const c10::optional<at::Tensor>& residual,
                             const c10::optional<at::Tensor>& gate) {
  const char* op = "rt_lynx::sparse_mm_sm90";
  const auto& lib = library(op);
  const bool e4m3 = weight.scalar_type() == at::kFloat8_e4m3fn;
  const int element = element_of(weight.scalar_type());
  require(element >= 0 && weight.is_cuda() && weight.dim() == 2 && weight.is_contiguous(), op,
          ": weight must be a contiguous 2-D bf16/fp16/e4m3 CUDA tensor");
  require(config >= 0 && config < lib.config_count(element), op, ": config out of range");
  const int64_t k = weight.size(1), n = weight.size(0);
  const int64_t padded = round_up_rows(rows);
  const int64_t expected = e4m3 ? fp8_compressed_bytes(padded, k) : compressed_numel(padded, k);
  require(rows >= 1 && compressed.is_cuda() && compressed.dim() == 1 && compressed.numel() == expected &&
              compressed.device() == weight.device(),
          op, ": compressed must be sparsify_sm90's buffer for ", rows, " rows (", expected, " elements)");
  require(e4m3 || compressed.scalar_type() == weight.scalar_type(), op, ": compressed dtype differs from weight");
  require(out_dtype == at::kBFloat16 || out_dtype == at::kHalf, op, ": out_dtype must be bf16 or fp16");
  const c10::cuda::CUDAGuard guard(weight.device());
  Compressed a;
  a.buffer = compressed;
  a.padded_rows = padded;
  if (row_scale.has_value() && row_scale->defined()) a.scale = row_scale->to(at::kFloat).contiguous();
  Epilogue epilogue;
  if (col_scale.has_value() && col_scale->defined()) epilogue.col_scale = col_scale->to(at::kFloat).contiguous();
  if (bias_in.has_value() && bias_in->defined()) epilogue.bias = bias_in->to(out_dtype).contiguous();
  auto y = at::empty({rows, n}, weight.options().dtype(out_dtype));
  check_gated_residual(epilogue, y, n, residual, gate, op);
  a.cols = k;
  run_gemm(lib, static_cast<int>(config), a, e4m3, weight, epilogue, y, op);
  return y;
}

std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, std::string>> sm90_config_info(int64_t element) {
  const auto& lib = library("rt_lynx.sm90_config_info");
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, std::string>> rows;
  for (int c = 0; c < lib.config_count(static_cast<int>(element)); ++c) {
    const auto info = config_info(lib, static_cast<int>(element), c, "rt_lynx.sm90_config_info");
    const std::string name = std::to_string(info.tile_m) + "x" + std::to_string(info.tile_n) + "x" +
                             std::to_string(info.tile_k) + " cluster " + std::to_string(info.cluster_m) + "x" +
                             std::to_string(info.cluster_n) + (info.pingpong ? " ping-pong" : " cooperative") +
                             (info.overlap ? " overlapped" : "");
    rows.emplace_back(info.tile_m, info.tile_n, info.tile_k, info.metadata_block_k, c, name);
  }
  return rows;
}

std::string sm90_check_metadata_layout(int64_t element, int64_t config, int64_t m, int64_t k) {
  const auto& lib = library("rt_lynx.sm90_check_metadata_layout");
  char error[512] = {0};
  if (lib.check_metadata_layout(static_cast<int>(element), static_cast<int>(config), m, k, error, sizeof(error))) {
    return error[0] ? error : "metadata layout check failed";
  }
  return "";
}

using PlanRow = std::tuple<int64_t, int64_t, int64_t, std::string, int64_t, std::vector<float>, int64_t, bool>;

std::vector<PlanRow> sm90_plan_info() {
  std::lock_guard<std::mutex> lock(plan_mutex());
  std::vector<PlanRow> rows;
  static const char* names[] = {"bf16", "fp16", "e4m3"};
  for (const auto& entry : plans()) {
    const PlanKey& key = entry.first;
    const int64_t k_ext = key.up_ext_cols > 0
        ? k_extension_columns(key.up_ext_cols, config_info(library("rt_lynx.sm90_plan_info"), key.in_element,
                                                           entry.second.config, "rt_lynx.sm90_plan_info").metadata_block_k)
        : 0;
    rows.emplace_back(key.rows, key.k, key.n, names[key.in_element], entry.second.config, entry.second.candidate_us,
                      k_ext, key.residual);
  }
  return rows;
}

void sm90_clear_plans() {
  std::lock_guard<std::mutex> lock(plan_mutex());
  plans().clear();
}

}  // namespace
}  // namespace rt_lynx

TORCH_LIBRARY_IMPL(rt_lynx, CUDA, m) {
  m.impl("sparse_linear_sm90", &rt_lynx::sparse_linear_sm90_op);
  m.impl("sparse_linear_lora_sm90", &rt_lynx::sparse_linear_lora_sm90_op);
  m.impl("sparse_linear_fp8_sm90", &rt_lynx::sparse_linear_fp8_sm90_op);
  m.impl("sparse_linear_modulated_sm90", &rt_lynx::sparse_linear_modulated_sm90_op);
  m.impl("sparse_linear_gelu_sm90", &rt_lynx::sparse_linear_gelu_sm90_op);
  m.impl("sparsify_sm90", &rt_lynx::sparsify_sm90_op);
  m.impl("sparse_mm_sm90", &rt_lynx::sparse_mm_sm90_op);
}

// Python-side helpers of this file, added to the extension module by cusparselt_ext.cpp.
void register_sm90_functions(pybind11::module& m) {
  m.def("load_sm90_library", &rt_lynx::load_sm90_library,
        "dlopen the sm90 sparse GEMM library; '' on success, else the reason");
  m.def("sm90_config_info", &rt_lynx::sm90_config_info,
        "configs of an input element: (tile_m, tile_n, tile_k, metadata_block, index, name)");
  m.def("sm90_check_metadata_layout", &rt_lynx::sm90_check_metadata_layout,
        "'' if the sparsify kernels' metadata layout equals CUTLASS's for (element, config, m, k)");
  m.def("sm90_plan_info", &rt_lynx::sm90_plan_info,
        "chosen configs: (M, K, N, element, config, time per candidate in us, K extension, residual)");
  m.def("sm90_clear_plans", &rt_lynx::sm90_clear_plans, "forget the chosen configs");
  m.def("set_sparsify_low_rank_fusion", &rt_lynx::set_sparsify_low_rank_fusion,
        "compute a LoRA's down(x) inside the sparsify pass (True, the default) or with cuBLAS before it (False)");
  // Process-wide switches, read at each launch: set_<name>(bool) and <name>() -> bool.
  auto def_switch = [&m](const char* name, void (*set)(bool), bool (*get)(), const std::string& what) {
    m.def(("set_" + std::string(name)).c_str(), set, ("on or off: " + what).c_str());
    m.def(name, get, ("whether on: " + what).c_str());
  };
  def_switch("fast_gelu", &rt_lynx::set_fast_gelu, &rt_lynx::fast_gelu,
             "the kernels' GELU as x / (1 + exp(-2u)) on the fast hardware exp2 and division (the default); off: "
             "torch's bit for bit");
  def_switch("packed_e4m3_gelu", &rt_lynx::set_packed_e4m3_gelu, &rt_lynx::packed_e4m3_gelu,
             "the GELU of passes whose output is e4m3 in packed 16-bit math with the packed tanh (off by default; "
             "needs fast_gelu)");
  def_switch("programmatic_launch", &rt_lynx::set_programmatic_launch, &rt_lynx::programmatic_launch,
             "the sm90 GEMM and the sparsify passes launched with programmatic dependent launch (off by default)");
  m.def("sparsify_low_rank_fused", &rt_lynx::sparsify_low_rank_fused,
        "whether the sparsify pass computes down(x) for this rank");
  m.def("set_sparsify_staged_pass", &rt_lynx::set_sparsify_staged_pass,
        "sm90 layouts: the sparsify pass keeps row pairs in registers (True, the default) or loops over chunks");
  m.def("sparsify_prologue_supported", &rt_lynx::sparsify_prologue_supported,
        "whether the sparsify pass can apply a prologue to rows of (padded rows, cols)");
  m.def("sparsify_staged_pass", &rt_lynx::sparsify_staged_pass,
        "whether the sm90 sparsify pass keeps the row pairs in registers for (padded rows, cols)");
}
