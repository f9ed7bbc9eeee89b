// CUTLASS's sm90 sparse consumer with one k-tile of wgmma.sp kept in flight while the next is
// issued, as CUTLASS's dense consumer does (K_PIPE_MMAS = 1).
//
// CUTLASS's sparse consumer waits for every MMA of a k-tile to finish (K_PIPE_MMAS = 0) before it
// issues the next: wgmma.sp reads the metadata from registers, and the next k-tile's metadata goes
// into the same registers. So the tensor pipe drains at every k-tile while the warps load the
// next metadata from shared memory. Here the metadata has two register buffers, k-tiles use them
// in turn, and a buffer is reloaded only after wgmma.wait_group<1> has retired the MMAs that read
// it. Both buffers stay live (fenced) until then, so the register allocator cannot fold them.
//
// partition_E / make_tiled_copy_E are CUTLASS's (private there), unchanged:
// cutlass/gemm/collective/sm90_sparse_mma_tma_gmma_ss_warpspecialized.hpp, BSD-3-Clause,
// Copyright (c) 2024 - 2025 NVIDIA CORPORATION & AFFILIATES.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>

namespace rt_lynx::sm90 {

template <class Base>
struct OverlappedSparseMma : Base {
  using typename Base::TiledMma;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::SmemLayoutE;
  using typename Base::SmemCopyAtomE;
  using typename Base::ElementEMma;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::Params;

  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum,
                          int k_tile_count, int thread_idx, TensorStorage& shared_tensors, Params const&) {
    using namespace cute;
    static_assert(is_rmem<FrgTensorC>::value, "C tensor must be rmem resident.");
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.begin()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.begin()), SmemLayoutB{});
    Tensor sE = as_position_independent_swizzle_tensor(
        make_tensor(make_smem_ptr(shared_tensors.smem_E.begin()), SmemLayoutE{}));

    constexpr int kMmaWarpGroups = size(TiledMma{}) / cutlass::NumThreadsPerWarpGroup;
    Layout warp_group_thread_layout = make_layout(Int<kMmaWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
    const int warp_group_idx = __shfl_sync(0xFFFFFFFF, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
    TiledMma tiled_mma;
    auto thread_mma = tiled_mma.get_thread_slice(warp_group_thread_layout(warp_group_idx));
    Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));  // (MMA,MMA_M,MMA_K,PIPE)
    Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));  // (MMA,MMA_N,MMA_K,PIPE)

    Tensor tCsE = partition_E(thread_mma, sE(_, _, Int<0>{}));
    Tensor tCrE0 = make_fragment_like<ElementEMma>(tCsE);
    Tensor tCrE1 = make_fragment_like<ElementEMma>(tCsE);
    auto smem_tiled_copy_E = make_tiled_copy_E(Copy_Atom<SmemCopyAtomE, uint32_t>{}, tiled_mma);
    auto smem_thr_copy_E = smem_tiled_copy_E.get_thread_slice(thread_idx);
    Tensor tEsE = smem_thr_copy_E.partition_S(sE);  // (ECPY,ECPY_M,ECPY_K,PIPE)
    Tensor tErE0 = smem_thr_copy_E.retile_D(tCrE0);
    Tensor tErE1 = smem_thr_copy_E.retile_D(tCrE1);

    PipelineState smem_pipe_release = smem_pipe_read;
    tiled_mma.accumulate_ = cute::GMMA::ScaleOut::Zero;

    // Waits for a k-tile's stage, loads its metadata into tErE and issues its MMAs (not waited).
    auto issue = [&](auto& tErE) {
      auto barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, barrier_token);
      const int read_stage = smem_pipe_read.index();
      copy(smem_tiled_copy_E, tEsE(_, _, _, read_stage), tErE);
      warpgroup_fence_operand(accum);
      warpgroup_arrive();
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < size<2>(tCrA); ++k_block) {
        cute::gemm(tiled_mma, make_zip_tensor(tCrA(_, _, k_block, read_stage), tErE(_, _, k_block)),
                   tCrB(_, _, k_block, read_stage), accum);
        tiled_mma.accumulate_ = cute::GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      ++smem_pipe_read;
    };
    // Retires the k-tile before the one just issued: its metadata registers and its stage are free.
    auto retire_previous = [&](auto& tCrE_previous) {
      warpgroup_wait<1>();
      warpgroup_fence_operand(accum);
      warpgroup_fence_operand(tCrE_previous);
      pipeline.consumer_release(smem_pipe_release);
      ++smem_pipe_release;
    };

    warpgroup_fence_operand(accum);
    issue(tErE0);
    for (--k_tile_count; k_tile_count >= 2; k_tile_count -= 2) {
      issue(tErE1);
      retire_previous(tCrE0);
      issue(tErE0);
      retire_previous(tCrE1);
    }
    if (k_tile_count == 1) {
      issue(tErE1);
      retire_previous(tCrE0);
    }
    // The last k-tile's MMAs finish here, while both metadata buffers are still live.
    warpgroup_wait<0>();
    warpgroup_fence_operand(accum);
    warpgroup_fence_operand(tCrE0);
    warpgroup_fence_operand(tCrE1);
  }

  // Releases the stage of the last k-tile, which mma() left unreleased (its MMAs are done).
  CUTLASS_DEVICE void mma_tail(MainloopPipeline pipeline, PipelineState smem_pipe_release, int k_tile_count) {
    if (k_tile_count < 1) return;
    smem_pipe_release.advance(k_tile_count - 1);
    pipeline.consumer_release(smem_pipe_release);
  }

 private:
  template <class MMA_Atom, class AtomLayoutMNK, class PermutationMNK, class ETensor>
  CUTE_HOST_DEVICE static constexpr auto thrfrg_E(cute::TiledMMA<MMA_Atom, AtomLayoutMNK, PermutationMNK> const& mma,
                                                  ETensor&& etensor) {
    using namespace cute;
    using Mma = TiledMMA<MMA_Atom, AtomLayoutMNK, PermutationMNK>;
    CUTE_STATIC_ASSERT_V(rank(etensor) >= Int<2>{});
    auto t_tile = make_tile(get<0>(PermutationMNK{}), get<2>(PermutationMNK{}));
    auto t_tensor = logical_divide(etensor, t_tile);  // (PermM,PermK)
    auto e_tile = make_tile(make_layout(size<0>(typename Mma::AtomShape_MNK{})),
                            make_layout(size<2>(typename Mma::AtomShape_MNK{})));
    auto e_tensor = zipped_divide(t_tensor, e_tile);  // ((AtomM,AtomK),(RestM,RestK))
    using AtomLayoutE_TV = typename Mma::Atom::Traits::ELayout;
    auto tv_tensor = e_tensor.compose(AtomLayoutE_TV{}, _);  // ((ThrV,FrgV),(RestM,RestK))
    auto thr_tile = make_tile(_, make_tile(make_layout(size<1>(mma.thr_layout_vmnk_)),
                                           make_layout(size<3>(mma.thr_layout_vmnk_))));
    return zipped_divide(tv_tensor, thr_tile);  // ((ThrV,(ThrM,ThrK)),(FrgV,(RestM,RestK)))
  }

  template <class... MArgs>
  CUTE_HOST_DEVICE static constexpr auto get_layoutE_TV(cute::TiledMMA<MArgs...> const& mma) {
    using namespace cute;
    auto ref_E = make_layout(make_shape(tile_size<0>(mma), tile_size<2>(mma)));  // (M,K) -> (M,K)
    auto layoutE_TV = thrfrg_E(mma, ref_E);                                     // (ethrid,val) -> (M,K)
    auto etile = make_tile(_, make_tile(make_layout(make_shape(size<1>(mma.thr_layout_vmnk_),
                                                               size<2>(mma.thr_layout_vmnk_)),
                                                    make_stride(Int<1>{}, Int<0>{})),
                                        _));
    auto thridx_2_thrid = right_inverse(mma.thr_layout_vmnk_);
    return layoutE_TV.compose(etile, _).compose(thridx_2_thrid, _);  // (thr_idx,val) -> (M,K)
  }

  template <class... MArgs, class ETensor>
  CUTE_HOST_DEVICE static constexpr auto partition_E(cute::ThrMMA<MArgs...> const& thr_mma, ETensor&& etensor) {
    using namespace cute;
    auto thr_tensor = make_tensor(static_cast<ETensor&&>(etensor).data(), thrfrg_E(thr_mma, etensor.layout()));
    auto thr_vmk = make_coord(get<0>(thr_mma.thr_vmnk_), make_coord(get<1>(thr_mma.thr_vmnk_),
                                                                   get<3>(thr_mma.thr_vmnk_)));
    return thr_tensor(thr_vmk, make_coord(_, repeat<rank<1, 1>(thr_tensor)>(_)));
  }

  template <class... CArgs, class... MArgs>
  CUTE_HOST_DEVICE static constexpr auto make_tiled_copy_E(cute::Copy_Atom<CArgs...> const& copy_atom,
                                                           cute::TiledMMA<MArgs...> const& mma) {
    using namespace cute;
    return make_tiled_copy_impl(copy_atom, get_layoutE_TV(mma), make_shape(tile_size<0>(mma), tile_size<2>(mma)));
  }
};

}  // namespace rt_lynx::sm90
