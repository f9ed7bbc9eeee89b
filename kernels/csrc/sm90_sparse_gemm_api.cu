// The C interface of sm90_sparse_gemm.h over the per-element instances.
#include "sm90_sparse_gemm_impl.cuh"

namespace rt_lynx::sm90 {
namespace {

const ElementEntry* entry_for(int in_element, int out_element, bool residual = false) {
  static const ElementEntry bf16 = entry_bf16_bf16(), fp16 = entry_fp16_fp16();
  static const ElementEntry e4m3_bf16 = entry_e4m3_bf16(), e4m3_fp16 = entry_e4m3_fp16();
  static const ElementEntry bf16_residual = entry_bf16_bf16_residual(), fp16_residual = entry_fp16_fp16_residual();
  static const ElementEntry e4m3_bf16_residual = entry_e4m3_bf16_residual();
  static const ElementEntry e4m3_fp16_residual = entry_e4m3_fp16_residual();
  if (in_element == RT_LYNX_BF16 && out_element == RT_LYNX_BF16) return residual ? &bf16_residual : &bf16;
  if (in_element == RT_LYNX_FP16 && out_element == RT_LYNX_FP16) return residual ? &fp16_residual : &fp16;
  if (in_element == RT_LYNX_E4M3 && out_element == RT_LYNX_BF16) return residual ? &e4m3_bf16_residual : &e4m3_bf16;
  if (in_element == RT_LYNX_E4M3 && out_element == RT_LYNX_FP16) return residual ? &e4m3_fp16_residual : &e4m3_fp16;
  return nullptr;
}

const ElementEntry* entry_for(const RtLynxSm90Gemm* gemm) {
  return gemm == nullptr ? nullptr : entry_for(gemm->in_element, gemm->out_element, gemm->residual != nullptr);
}

// The output element a layout check uses (every output shares its input's layout).
int default_out(int in_element) { return in_element == RT_LYNX_FP16 ? RT_LYNX_FP16 : RT_LYNX_BF16; }

// The shapes every config takes: TMA needs 16-byte rows, the metadata atom 128 columns of K.
const char* shape_problem(const RtLynxSm90Gemm& g) {
  if (g.m < 1 || g.n < 1 || g.k < 1) return "empty sparse GEMM";
  if (g.k % 128) return "K must be a multiple of 128";
  if (g.n % 16) return "N must be a multiple of 16";
  // k_ext: a multiple of the config's tile K too (the mainloop's can_implement checks that).
  if (g.k_ext < 0 || g.k_ext % 64) return "k_ext must be a non-negative multiple of 64";
  if ((g.k_ext > 0) != (g.b_ext != nullptr)) return "b_ext must be given exactly when k_ext > 0";
  if (g.k_ext > 0 && g.in_element == RT_LYNX_E4M3) return "the K extension is for 16-bit inputs";
  if (g.k_ext > 0 && (g.b_ext_cols < 8 || g.b_ext_cols > g.k_ext || g.b_ext_cols % 8)) {
    return "b_ext_cols must be a multiple of 8 in [8, k_ext]";
  }
  if (g.m > 0x7fffffff || g.n > 0x7fffffff || g.k + g.k_ext > 0x7fffffff) return "sparse GEMM extent over 2^31";
  if (g.in_element != RT_LYNX_E4M3 && g.col_scale != nullptr) return "col_scale is for e4m3 inputs only";
  if (g.gate != nullptr && g.residual == nullptr) return "gate is given only with a residual";
  if (reinterpret_cast<uintptr_t>(g.residual) % 16) return "the residual must be 16-byte aligned (TMA)";
  return nullptr;
}

}  // namespace
}  // namespace rt_lynx::sm90

using namespace rt_lynx::sm90;

extern "C" {

int rt_lynx_sm90_api_version(void) { return RT_LYNX_SM90_API_VERSION; }

int rt_lynx_sm90_config_count(int in_element) {
  if (entry_for(in_element, default_out(in_element)) == nullptr) return 0;
  return in_element == RT_LYNX_E4M3 ? kConfigCount8 : kConfigCount16;
}

int rt_lynx_sm90_config_info(int in_element, int config, RtLynxSm90Config* info) {
  if (info == nullptr || config < 0 || config >= rt_lynx_sm90_config_count(in_element)) return 1;
  const ConfigSpec& spec = in_element == RT_LYNX_E4M3 ? kConfigs8[config] : kConfigs16[config];
  *info = {spec.tile_m, spec.tile_n, spec.tile_k, spec.cluster_m, spec.cluster_n, spec.pingpong,
           metadata_block_k(spec), spec.overlap};
  return 0;
}

size_t rt_lynx_sm90_workspace_bytes(const RtLynxSm90Gemm* gemm) {
  const ElementEntry* entry = entry_for(gemm);
  if (entry == nullptr || shape_problem(*gemm) != nullptr) return 0;
  return entry->workspace_bytes(*gemm);
}

int rt_lynx_sm90_gemm(const RtLynxSm90Gemm* gemm, char* error, size_t error_size) {
  const ElementEntry* entry = entry_for(gemm);
  if (entry == nullptr) {
    write_error(error, error_size, "unsupported pair of input and output elements");
    return 5;
  }
  if (const char* problem = shape_problem(*gemm)) {
    write_error(error, error_size, problem);
    return 6;
  }
  return entry->run(*gemm, error, error_size);
}

int rt_lynx_sm90_check_metadata_layout(int in_element, int config, int64_t m, int64_t k, char* error,
                                       size_t error_size) {
  const ElementEntry* entry = entry_for(in_element, default_out(in_element));
  if (entry == nullptr) {
    write_error(error, error_size, "unsupported input element");
    return 5;
  }
  return entry->check_metadata_layout(config, m, k, error, error_size);
}

}  // extern "C"
