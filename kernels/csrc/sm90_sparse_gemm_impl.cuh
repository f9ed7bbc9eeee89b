// The CUTLASS 3 (CuTe) sm90a sparse GEMM behind sm90_sparse_gemm.h, one template per
// (input element, output element, config). Each sm90_sparse_gemm_<input>_<output>.cu instantiates
// the configs of one pair of elements, so the slow CUTLASS compiles run in parallel.
//
// Mainloop: TMA + warp-specialised wgmma.sp (CUTLASS's sm90 sparse collective), A = the 2:4
// activations (the only operand sm90 sparse tensor cores take as sparse), B = the weight as
// stored (N x K, i.e. a K-major "column-major" B). Epilogue (EVT): the per-token scale, the
// per-channel weight scale (e4m3) and the bias are applied to the fp32 accumulators before the
// single write of D. A residual instance (kResidual) also reads C, a DiT block's residual stream,
// and writes D = C + gate[n] * (that product) still in fp32: the block's gated residual without a
// pass of its own. It is a separate instantiation because CUTLASS allocates C's shared-memory
// stages at compile time, which would take mainloop stages from every plain GEMM.
#pragma once

#include <cstdio>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "sm90_k_extended_mainloop.cuh"
#include "sm90_metadata_layout.h"
#include "sm90_overlapped_sparse_mma.cuh"
#include "sm90_sparse_gemm.h"

namespace rt_lynx::sm90 {

struct ConfigSpec {
  int tile_m, tile_n, tile_k, cluster_m, cluster_n, pingpong;
  int overlap;  // 1: the next k-tile's MMAs issue before the last ones finish (sm90_overlapped_sparse_mma.cuh)
};

// Candidates timed per shape at first use (kernels/csrc/sm90_ops.cpp picks the fastest).
// tile_k is logical; the metadata atom is min(tile_k, 128) columns, which the writer follows.
// The 128- and 256-row tiles keep a k-tile of MMAs in flight (overlap): 1-13% faster than
// CUTLASS's consumer on the FLUX/Qwen-Image shapes (H200, bf16 and e4m3); the 64-row ping-pong
// tiles were 0-14% slower with it (bench/results/kernels-2026-12-03-NVIDIA_H200-overlap.md).
inline constexpr ConfigSpec kConfigs16[] = {
    {128, 128, 128, 1, 2, 0, 1},
    {128, 256, 64, 2, 1, 0, 1},
    {256, 128, 64, 1, 2, 0, 1},
    {64, 128, 128, 1, 1, 1, 0},
};
inline constexpr ConfigSpec kConfigs8[] = {
    {128, 128, 256, 1, 2, 1, 1},
    {128, 256, 128, 2, 1, 0, 1},
    {256, 128, 128, 1, 2, 0, 1},
    {64, 128, 256, 1, 1, 1, 0},
};
inline constexpr int kConfigCount16 = sizeof(kConfigs16) / sizeof(kConfigs16[0]);
inline constexpr int kConfigCount8 = sizeof(kConfigs8) / sizeof(kConfigs8[0]);

constexpr int metadata_block_k(const ConfigSpec& spec) { return spec.tile_k < 128 ? spec.tile_k : 128; }

inline void write_error(char* error, size_t size, const char* text) {
  if (error != nullptr && size > 0) std::snprintf(error, size, "%s", text);
}

template <class ElementIn, class ElementOut, int kConfig, bool kResidual>
struct SparseGemm {
  static constexpr bool kE4m3 = std::is_same_v<ElementIn, cutlass::float_e4m3_t>;
  static constexpr ConfigSpec kSpec = kE4m3 ? kConfigs8[kConfig] : kConfigs16[kConfig];

  using TileShape = cute::Shape<cute::Int<kSpec.tile_m>, cute::Int<kSpec.tile_n>, cute::Int<kSpec.tile_k>>;
  using ClusterShape = cute::Shape<cute::Int<kSpec.cluster_m>, cute::Int<kSpec.cluster_n>, cute::_1>;
  using MainloopSchedule = std::conditional_t<
      kE4m3,
      std::conditional_t<kSpec.pingpong, cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum,
                         cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum>,
      std::conditional_t<kSpec.pingpong, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                         cutlass::gemm::KernelTmaWarpSpecializedCooperative>>;
  using EpilogueSchedule = std::conditional_t<kSpec.pingpong, cutlass::epilogue::TmaWarpSpecialized,
                                              cutlass::epilogue::TmaWarpSpecializedCooperative>;

  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  // Per GEMM row (token): a column vector broadcast along N; per output channel: a row vector.
  using TokenScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float,
                                                                 cute::Stride<cute::_1, cute::_0, int64_t>>;
  using ChannelScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float,
                                                                   cute::Stride<cute::_0, cute::_1, int64_t>>;
  using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, ElementOut, float,
                                                           cute::Stride<cute::_0, cute::_1, int64_t>>;
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  using ScaledAcc = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, TokenScale, Acc>;
  // The product, written as Out: 16-bit D = s[m] * acc + b[n]; e4m3 D = w[n] * (a[m] * acc) + b[n].
  template <class Out>
  using Product = std::conditional_t<
      kE4m3,
      cutlass::epilogue::fusion::Sm90EVT<
          cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, Out, float, kRound>,
          ChannelScale, ScaledAcc, Bias>,
      cutlass::epilogue::fusion::Sm90EVT<
          cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, Out, float, kRound>,
          TokenScale, Acc, Bias>>;
  // Residual: D = gate[n] * (the product, kept in fp32) + C[m, n].
  using Gate = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, ElementOut, float,
                                                           cute::Stride<cute::_0, cute::_1, int64_t>>;
  using FusionResidual = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementOut, float, kRound>,
      Gate, Product<float>, cutlass::epilogue::fusion::Sm90SrcFetch<ElementOut>>;
  using Fusion = std::conditional_t<kResidual, FusionResidual, Product<ElementOut>>;
  using ElementC = std::conditional_t<kResidual, ElementOut, void>;

  static constexpr int kAlignIn = 128 / cutlass::sizeof_bits<ElementIn>::value;
  static constexpr int kAlignOut = 128 / cutlass::sizeof_bits<ElementOut>::value;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      ElementC, cutlass::layout::RowMajor, kAlignOut,
      ElementOut, cutlass::layout::RowMajor, kAlignOut,
      EpilogueSchedule, Fusion>::CollectiveOp;

  using CutlassMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      ElementIn, cutlass::layout::RowMajor, kAlignIn,
      ElementIn, cutlass::layout::ColumnMajor, kAlignIn,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;
  using CollectiveMainloop = KExtendedSparseMainloop<
      std::conditional_t<kSpec.overlap, OverlappedSparseMma<CutlassMainloop>, CutlassMainloop>>;

  using ProblemShape = cute::Shape<int, int, int, int>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using SparseConfig = typename CollectiveMainloop::SparseConfig;
  using ElementE = typename CollectiveMainloop::ElementE;
  using StrideB = typename Kernel::StrideB;
  using StrideD = typename Kernel::StrideD;

  static_assert(cute::size<1>(typename SparseConfig::TensorEAtom{}) == metadata_block_k(kSpec),
                "metadata atom differs from the one the sparsify kernels write");

  static typename Gemm::Arguments arguments(const RtLynxSm90Gemm& g) {
    // A spans k + k_ext logical columns; the weight k of them, b_ext the rest.
    const ProblemShape problem{int(g.m), int(g.n), int(g.k + g.k_ext), 1};
    cutlass::KernelHardwareInfo hw_info;
    cudaGetDevice(&hw_info.device_id);
    hw_info.sm_count = g.sm_count > 0 ? g.sm_count
                                      : cutlass::KernelHardwareInfo::query_device_multiprocessor_count(hw_info.device_id);
    const auto stride_b = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(int(g.n), int(g.k), 1));
    const auto stride_b_ext = cutlass::make_cute_packed_stride(
        StrideB{}, cute::make_shape(int(g.n), int(g.k_ext > 0 ? g.b_ext_cols : g.k), 1));
    const auto stride_d = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(int(g.m), int(g.n), 1));
    typename CollectiveMainloop::Arguments mainloop{};
    static_cast<typename CollectiveMainloop::CutlassArguments&>(mainloop) = {
        static_cast<const ElementIn*>(g.a_values), SparseConfig::fill_layoutA(problem),
        static_cast<const ElementIn*>(g.b), stride_b,
        static_cast<const ElementE*>(g.a_metadata), SparseConfig::fill_layoutE(problem)};
    mainloop.ptr_B_ext = static_cast<const ElementIn*>(g.b_ext);
    mainloop.dB_ext = stride_b_ext;
    mainloop.b_ext_cols = int(g.b_ext_cols);
    mainloop.k_main = int(g.k);
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        problem,
        mainloop,
        {{}, static_cast<const ElementOut*>(g.residual), stride_d, static_cast<ElementOut*>(g.d), stride_d},
        hw_info};
    const typename TokenScale::Arguments token{g.row_scale, 1.f, {}};
    const typename Bias::Arguments bias{static_cast<const ElementOut*>(g.bias), ElementOut(0.f), {}};
    if constexpr (kResidual) {
      const typename Gate::Arguments gate{static_cast<const ElementOut*>(g.gate), ElementOut(1.f), {}};
      if constexpr (kE4m3) {
        const typename ChannelScale::Arguments channel{g.col_scale, 1.f, {}};
        args.epilogue.thread = {gate, {channel, {token, {}, {}}, bias, {}}, {}, {}};
      } else {
        args.epilogue.thread = {gate, {token, {}, bias, {}}, {}, {}};
      }
    } else if constexpr (kE4m3) {
      const typename ChannelScale::Arguments channel{g.col_scale, 1.f, {}};
      args.epilogue.thread = {channel, {token, {}, {}}, bias, {}};
    } else {
      args.epilogue.thread = {token, {}, bias, {}};
    }
    return args;
  }

  static size_t workspace_bytes(const RtLynxSm90Gemm& g) { return Gemm::get_workspace_size(arguments(g)); }

  static int run(const RtLynxSm90Gemm& g, char* error, size_t error_size) {
    auto args = arguments(g);
    Gemm gemm;
    cutlass::Status status = gemm.can_implement(args);
    if (status != cutlass::Status::kSuccess) {
      write_error(error, error_size, "CUTLASS cannot run this sparse GEMM shape (can_implement failed)");
      return 1;
    }
    status = gemm.initialize(args, g.workspace, g.stream);
    if (status != cutlass::Status::kSuccess) {
      write_error(error, error_size, cutlassGetStatusString(status));
      return 2;
    }
    status = gemm.run(g.stream, nullptr, g.programmatic_launch != 0);
    const cudaError_t launch = cudaGetLastError();
    if (status != cutlass::Status::kSuccess || launch != cudaSuccess) {
      write_error(error, error_size, launch != cudaSuccess ? cudaGetErrorString(launch)
                                                           : cutlassGetStatusString(status));
      return 3;
    }
    return 0;
  }

  // Our byte formula against CuTe's layout of this config, every group of an m x k matrix.
  static int check_metadata_layout(int64_t m, int64_t k, char* error, size_t error_size) {
    const ProblemShape problem{int(m), 16, int(k), 1};
    const auto layout = SparseConfig::fill_layoutE(problem);
    const int64_t padded_rows = (m + 63) / 64 * 64;
    for (int64_t row = 0; row < m; ++row) {
      for (int64_t col = 0; col < k; col += 4) {
        const int64_t logical = layout(cute::make_coord(int(row), int(col), 0));  // 8 columns a byte
        const int64_t want_byte = logical / 8;
        const int want_nibble = int((logical % 8) / 4);
        const int64_t ours = kE4m3 ? sm90_metadata_byte_8bit(row, col, padded_rows, metadata_block_k(kSpec))
                                   : sm90_metadata_byte_16bit(row, col, padded_rows, metadata_block_k(kSpec));
        if (ours != want_byte || sm90_metadata_nibble(col) != want_nibble) {
          if (error != nullptr && error_size > 0) {
            std::snprintf(error, error_size,
                          "metadata layout differs from CUTLASS's at row %lld, column %lld: byte %lld "
                          "nibble %d, CUTLASS byte %lld nibble %d",
                          (long long)row, (long long)col, (long long)ours, sm90_metadata_nibble(col),
                          (long long)want_byte, want_nibble);
          }
          return 1;
        }
      }
    }
    return 0;
  }
};

// What each sm90_sparse_gemm_<input>_<output>.cu defines for its pair of elements.
struct ElementEntry {
  int (*run)(const RtLynxSm90Gemm&, char*, size_t);
  size_t (*workspace_bytes)(const RtLynxSm90Gemm&);
  int (*check_metadata_layout)(int config, int64_t m, int64_t k, char*, size_t);
};

// Run-time config index -> template instance.
template <class ElementIn, class ElementOut, bool kResidual, int kIndex = 0>
struct Dispatch {
  static constexpr int kCount =
      std::is_same_v<ElementIn, cutlass::float_e4m3_t> ? kConfigCount8 : kConfigCount16;
  using Gemm = SparseGemm<ElementIn, ElementOut, kIndex, kResidual>;
  using Next = Dispatch<ElementIn, ElementOut, kResidual, kIndex + 1>;

  static int run(const RtLynxSm90Gemm& g, char* error, size_t size) {
    if constexpr (kIndex >= kCount) {
      write_error(error, size, "no such sparse GEMM config");
      return 4;
    } else {
      return g.config == kIndex ? Gemm::run(g, error, size) : Next::run(g, error, size);
    }
  }
  static size_t workspace_bytes(const RtLynxSm90Gemm& g) {
    if constexpr (kIndex >= kCount) {
      return 0;
    } else {
      return g.config == kIndex ? Gemm::workspace_bytes(g) : Next::workspace_bytes(g);
    }
  }
  static int check_metadata_layout(int config, int64_t m, int64_t k, char* error, size_t size) {
    if constexpr (kIndex >= kCount) {
      write_error(error, size, "no such sparse GEMM config");
      return 4;
    } else {
      return config == kIndex ? Gemm::check_metadata_layout(m, k, error, size)
                              : Next::check_metadata_layout(config, m, k, error, size);
    }
  }
};

template <class ElementIn, class ElementOut, bool kResidual>
ElementEntry make_entry() {
  using D = Dispatch<ElementIn, ElementOut, kResidual>;
  return {&D::run, &D::workspace_bytes, &D::check_metadata_layout};
}

// 16-bit inputs write their own type; e4m3 inputs write bf16 or fp16. Each pair also in a
// residual instance (its own file: the CUTLASS compiles run in parallel).
ElementEntry entry_bf16_bf16();
ElementEntry entry_fp16_fp16();
ElementEntry entry_e4m3_bf16();
ElementEntry entry_e4m3_fp16();
ElementEntry entry_bf16_bf16_residual();
ElementEntry entry_fp16_fp16_residual();
ElementEntry entry_e4m3_bf16_residual();
ElementEntry entry_e4m3_fp16_residual();

}  // namespace rt_lynx::sm90
