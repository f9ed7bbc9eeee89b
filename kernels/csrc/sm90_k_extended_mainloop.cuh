// CUTLASS's sm90 sparse mainloop (TMA + warp-specialised wgmma.sp) with a K extension: the GEMM
// runs over K = k_main + k_ext logical columns of A, and the B tile of every k-tile past k_main
// comes from a second operand, b_ext (N x k_ext), instead of the weight:
//
//   acc[m, n] = sum_{k < k_main} A[m, k] W[n, k]  +  sum_{j < k_ext} A[m, k_main + j] b_ext[n, j]
//
// This is how the Lynx LoRA branch enters the sparse GEMM without a copy of W: the sparsify pass
// writes u = down(x) (divided by the epilogue's token scale) into the extra columns of A as 2:4
// groups [u0 u1 0 0], and b_ext holds the up factor interleaved the same way. The extra cost is
// k_ext / k_main more MMA work: one k-tile (k_ext = the tile K, 64 or 128 columns) for ranks up
// to tile K / 2. b_ext may store fewer than k_ext columns (b_ext_cols): TMA reads the columns past
// them as zeros, so a rank-16 branch keeps 32 columns per output channel.
//
// Only the producer changes (which TMA descriptor a k-tile's B comes from); the consumer warps,
// the pipeline and the shared memory are CUTLASS's. k_ext = 0 is the plain sparse GEMM (the
// second descriptor then describes W and is never used).
#pragma once

#include <limits>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>

namespace rt_lynx::sm90 {

template <class Base>
struct KExtendedSparseMainloop : Base {
  using ClusterShape = typename Base::DispatchPolicy::ClusterShape;
  using typename Base::TileShape;
  using typename Base::TmaInternalElementB;
  using typename Base::GmemTiledCopyB;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::SmemLayoutE;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::ElementB;
  using typename Base::StrideB;
  using CutlassArguments = typename Base::Arguments;
  static constexpr int kTileK = cute::size<2>(TileShape{});

  struct Arguments : CutlassArguments {
    ElementB const* ptr_B_ext{};  // N x b_ext_cols, stride dB_ext; nullptr when K == k_main
    StrideB dB_ext{};
    int b_ext_cols = 0;           // stored columns of b_ext (<= K - k_main; the rest read as 0)
    int k_main = 0;               // logical columns of A that multiply the weight
  };

  struct Params : Base::Params {
    typename Base::Params::TMA_B tma_load_b_ext;
    int k_tiles_main;
    int k_ext;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args, void* workspace) {
    auto [M, N, K, L] = cute::append<4>(problem_shape, 1);
    const int k_ext = K - args.k_main;
    // The weight's descriptor spans k_main columns only: its rows are k_main long in memory.
    const typename Base::Params base =
        Base::to_underlying_arguments(cute::make_shape(M, N, args.k_main, L), args, workspace);
    const bool extended = k_ext > 0;
    auto ptr = cute::recast_ptr<TmaInternalElementB>(extended ? args.ptr_B_ext : args.ptr_B);
    auto tensor = cute::make_tensor(
        ptr, cute::make_layout(cute::make_shape(N, extended ? args.b_ext_cols : int(args.k_main), L),
                               extended ? args.dB_ext : args.dB));
    auto tma_ext = cute::make_tma_copy_B_sm90<TmaInternalElementB>(
        GmemTiledCopyB{}, tensor, SmemLayoutB{}(cute::_, cute::_, cute::Int<0>{}), TileShape{}, ClusterShape{});
    // Without an extension every k-tile, a partial last one included, reads the weight.
    const int k_tiles_main = extended ? args.k_main / kTileK : std::numeric_limits<int>::max();
    return {base, tma_ext, k_tiles_main, k_ext};
  }

  template <class ProblemShape>
  CUTLASS_HOST_DEVICE static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K, L] = cute::append<4>(problem_shape, 1);
    const int k_ext = K - args.k_main;
    // The switch to b_ext happens at a k-tile boundary; without an extension K may end mid-tile.
    const bool split_ok = args.k_main > 0 && k_ext >= 0 &&
                          (k_ext == 0 || (args.k_main % kTileK == 0 && k_ext % kTileK == 0 &&
                                          args.ptr_B_ext != nullptr && args.b_ext_cols > 0 &&
                                          args.b_ext_cols <= k_ext));
    return split_ok && Base::can_implement(problem_shape, args);
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    Base::prefetch_tma_descriptors(params);
    cute::prefetch_tma_descriptor(params.tma_load_b_ext.get_tma_descriptor());
  }

  // (gA, gB, gE) as CUTLASS's, plus gB_ext: the tiled b_ext over all k_ext columns, (BLK_N, BLK_K,
  // n, k, l); tiles past b_ext_cols fall outside the descriptor and load zeros.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
    using X = cute::Underscore;
    auto [gA_mkl, gB_nkl, gE_mkl] = Base::load_init(problem_shape_MNKL, params);
    auto [M, N, K, L] = problem_shape_MNKL;
    auto mB_ext = params.tma_load_b_ext.get_tma_tensor(
        cute::make_shape(N, params.k_ext > 0 ? params.k_ext : int(kTileK), L));
    auto gB_ext = cute::local_tile(mB_ext, TileShape{}, cute::make_coord(cute::_, cute::_, cute::_),
                                   cute::Step<X, cute::_1, cute::_1>{});
    return cute::make_tuple(gA_mkl, gB_nkl, gE_mkl, gB_ext);
  }

  // CUTLASS's producer loop; a k-tile at or past k_tiles_main takes its B tile from b_ext.
  template <class TensorA, class TensorB, class TensorE, class TensorBExt, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB, TensorE, TensorBExt> const& load_inputs,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count, int thread_idx,
                           uint32_t block_rank_in_cluster, TensorStorage& shared_tensors) {
    using namespace cute;
    if (!elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.begin()), SmemLayoutA{});
    Tensor sE = make_tensor(make_smem_ptr(shared_tensors.smem_E.begin()), SmemLayoutE{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.begin()), SmemLayoutB{});
    auto [gA_mkl, gB_nkl, gE_mkl, gBext_nkl] = load_inputs;

    Layout cta_layout_mnk = make_layout(ClusterShape{});
    auto cta_coord_mnk = cta_layout_mnk.get_flat_coord(block_rank_in_cluster);
    const uint16_t mcast_mask_a = create_tma_multicast_mask<1>(cta_layout_mnk, cta_coord_mnk);
    const uint16_t mcast_mask_e = create_tma_multicast_mask<1>(cta_layout_mnk, cta_coord_mnk);
    const uint16_t mcast_mask_b = create_tma_multicast_mask<0>(cta_layout_mnk, cta_coord_mnk);
    auto block_tma_a = params.tma_load_a.get_slice(get<1>(cta_coord_mnk));
    auto block_tma_e = params.tma_load_e.get_slice(get<1>(cta_coord_mnk));
    auto block_tma_b = params.tma_load_b.get_slice(get<0>(cta_coord_mnk));
    auto block_tma_b_ext = params.tma_load_b_ext.get_slice(get<0>(cta_coord_mnk));

    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    Tensor tAgA = block_tma_a.partition_S(gA_mkl(_, _, m_coord, _, l_coord));
    Tensor tAsA = block_tma_a.partition_D(sA);
    Tensor tEgE = block_tma_e.partition_S(gE_mkl(_, _, m_coord, _, l_coord));
    Tensor tEsE = block_tma_e.partition_D(sE);
    Tensor tBgB = block_tma_b.partition_S(gB_nkl(_, _, n_coord, _, l_coord));
    Tensor tBgBext = block_tma_b_ext.partition_S(gBext_nkl(_, _, n_coord, _, l_coord));
    Tensor tBsB = block_tma_b.partition_D(sB);

    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);
      using BarrierType = typename MainloopPipeline::ProducerBarrierType;
      BarrierType* tma_barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int write_stage = smem_pipe_write.index();
      const int k_tile = *k_tile_iter;
      copy(params.tma_load_a.with(*tma_barrier, mcast_mask_a), tAgA(_, _, _, k_tile), tAsA(_, _, _, write_stage));
      copy(params.tma_load_e.with(*tma_barrier, mcast_mask_e), tEgE(_, _, _, k_tile), tEsE(_, _, _, write_stage));
      if (k_tile < params.k_tiles_main) {
        copy(params.tma_load_b.with(*tma_barrier, mcast_mask_b), tBgB(_, _, _, k_tile), tBsB(_, _, _, write_stage));
      } else {
        copy(params.tma_load_b_ext.with(*tma_barrier, mcast_mask_b), tBgBext(_, _, _, k_tile - params.k_tiles_main),
             tBsB(_, _, _, write_stage));
      }
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }
};

}  // namespace rt_lynx::sm90
