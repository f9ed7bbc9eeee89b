"""GPU tests of the Lynx LoRA branch inside the sm90 sparse GEMM (the K extension,
csrc/sm90_k_extended_mainloop.cuh): against fp32 math of the sparse product plus the branch on
the dense input, on fresh random and heavy-tailed inputs, odd rows and ranks, poisoned outputs,
every GEMM config, the dispatch from lynx_linear, torch.compile and CUDA graphs.
"""
import pytest
import torch

from rt_lynx_pack.kernels import LowRankOperands, low_rank_reference, prepare_low_rank, sparse_linear

from kernel_helpers import (DTYPES, FLUX_SHAPES, INPUT_KINDS, check_zero_tokens_give_the_bias, fp32_lynx,
                            make_input, padded, poison_allocator, relative_error, require_fast_path)

TOLERANCE = 1e-2
ODD_ROWS = [1, 7, 63, 65, 100, 4097]


@pytest.fixture(scope="module")
def sm90():
    return require_fast_path("sm90")


def _problem(generator, rows, k, n, rank, dtype, kind="randn"):
    x = make_input(kind, rows, k, dtype, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    bias = torch.randn(n, generator=generator, device="cuda").to(dtype)
    down = (torch.randn(rank, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    up = torch.randn(n, rank, generator=generator, device="cuda").to(dtype)
    return x, weight, bias, down, up


def _want(x, weight, bias, down, up, scale, compensate):
    branch = LowRankOperands(down.float(), up.float(), scale)
    return fp32_lynx(x, weight, bias, compensate) + low_rank_reference(x.float(), branch)


def _fused(sm90, x, weight, bias, down, up, scale, compensate):
    rows, n = x.shape[0], weight.shape[0]
    poison_allocator((padded(rows) * (x.shape[1] + 256) * 9 // 8 + 2 * padded(rows) * n) * 2)
    y = sm90.sparse_linear_lora_sm90(x, weight, bias, compensate, down, sm90.k_extension_up(up, scale))
    assert y.shape == (rows, n) and y.dtype == x.dtype and y.stride() == (n, 1)
    assert not y.isnan().any(), "output not fully written (poisoned NaN left)"
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ODD_ROWS)
@pytest.mark.parametrize("rank", [1, 5, 32, 64, 100])
@pytest.mark.parametrize("compensate", [True, False])
def test_branch_in_the_gemm_matches_fp32_math(sm90, generator, dtype, rows, rank, compensate):
    x, weight, bias, down, up = _problem(generator, rows, 3072, 1024, rank, dtype)
    # The scale makes the branch as large as the sparse product (a rank-1 branch on one token can
    # be small by chance): leaving it out, or adding it twice, is far outside the tolerance.
    lynx = fp32_lynx(x, weight, bias, compensate)
    unscaled = low_rank_reference(x.float(), LowRankOperands(down.float(), up.float(), 1.0))
    scale = (lynx.norm() / unscaled.norm()).item()
    y = _fused(sm90, x, weight, bias, down, up, scale, compensate)
    want = _want(x, weight, bias, down, up, scale, compensate)
    branch_share = relative_error(lynx, want)
    assert branch_share > 0.1, "test setup: the branch must matter"
    assert relative_error(y, want) < TOLERANCE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("fusion,staged", [(True, True), (False, True), (False, False)])
def test_input_families_and_zero_tokens(sm90, generator, dtype, kind, fusion, staged):
    # Without fusion the plain sparsify pass writes cuBLAS's u into the K extension: both passes.
    x, weight, bias, down, up = _problem(generator, 300, 3072, 2048, 32, dtype, kind)
    with sm90.low_rank_fusion(fusion), sm90.staged_sparsify(staged):
        y = _fused(sm90, x, weight, bias, down, up, 0.25, True)
    assert relative_error(y, _want(x, weight, bias, down, up, 0.25, True)) < TOLERANCE
    check_zero_tokens_give_the_bias(y, x, bias)   # u = 0 for a zero token


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ODD_ROWS)
@pytest.mark.parametrize("k", [384, 1152, 3072])   # the pass's last 256-column tile partly full; one or more tiles a K slice
@pytest.mark.parametrize("rank", [1, 8, 16, 17, 31, 32])
def test_down_projection_inside_the_sparsify_pass(sm90, generator, dtype, rows, k, rank):
    _check_fused_down_projection(sm90, generator, dtype, rows, k, rank)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [7, 100])
@pytest.mark.parametrize("k", [4608, 12288])
def test_fused_down_projection_over_many_k_slices(sm90, generator, dtype, rows, k):
    # One or two row blocks: a slice a 256-column tile, 18 or 48 slices, so the slice sum loads
    # them in several rounds (12 at a time), the last one partly full at 4608.
    _check_fused_down_projection(sm90, generator, dtype, rows, k, 32)


def _check_fused_down_projection(sm90, generator, dtype, rows, k, rank):
    x, weight, bias, down, up = _problem(generator, rows, k, 512, rank, dtype, "student_t")
    want = _want(x, weight, bias, down, up, 0.5, True)
    assert sm90.low_rank_fused(rank), "the default for ranks up to 32: down(x) in the sparsify pass"
    fused = _fused(sm90, x, weight, bias, down, up, 0.5, True)
    again = _fused(sm90, x, weight, bias, down, up, 0.5, True)
    with sm90.low_rank_fusion(False):
        cublas = _fused(sm90, x, weight, bias, down, up, 0.5, True)
    assert relative_error(fused, want) < TOLERANCE
    assert relative_error(cublas, want) < TOLERANCE
    # u's rounding differs (fp32 u / s rounded once, against cuBLAS's rounded u divided), and s
    # in its last bit (the norms are summed in another order). An empirical bound: on one
    # heavy-tailed row these roundings do not average out (5.2e-3 seen once; three 16-bit roundings
    # could reach 3 x 2^-8 of the branch), still far under a lost or doubled K slice.
    assert relative_error(fused, cublas) < 7e-3
    assert torch.equal(fused, again), "the fused pass adds its K slices' partial sums in a fixed order"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [65, 4097])
def test_fused_down_projection_without_compensation(sm90, generator, dtype, rows):
    x, weight, bias, down, up = _problem(generator, rows, 3072, 1024, 32, dtype, "cubed")
    with sm90.low_rank_fusion(True):
        y = _fused(sm90, x, weight, bias, down, up, 0.5, False)
    assert relative_error(y, _want(x, weight, bias, down, up, 0.5, False)) < TOLERANCE


def test_which_path_computes_down(sm90, generator):
    assert sm90.low_rank_fused(32) and sm90.low_rank_fused(1), "the default: down(x) in the sparsify pass"
    assert not sm90.low_rank_fused(33), "ranks over 32: cuBLAS"
    with sm90.low_rank_fusion(False):
        assert not sm90.low_rank_fused(32)
        with sm90.low_rank_fusion(True):
            assert sm90.low_rank_fused(32)
        assert not sm90.low_rank_fused(32), "the previous setting comes back on leaving a block"
    # A rank over 32 runs the cuBLAS path, end to end.
    x, weight, bias, down, up = _problem(generator, 300, 1152, 512, 40, torch.bfloat16)
    y = _fused(sm90, x, weight, bias, down, up, 0.5, True)
    assert relative_error(y, _want(x, weight, bias, down, up, 0.5, True)) < TOLERANCE
    assert sm90.low_rank_fused(32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [16, 32])   # both instantiations of the fused pass
def test_fused_pass_agrees_for_every_config(sm90, generator, dtype, rank):
    # Every config's metadata layout (atoms of 64 and 128 columns) gets the fused pass's output;
    # the tuner drops a config that disagrees with the first, so a finite time for each is the check.
    x, weight, bias, down, up = _problem(generator, 4096, 3072, 3072, rank, dtype, "student_t")
    sm90.clear_plans()
    with sm90.low_rank_fusion(True):
        y = _fused(sm90, x, weight, bias, down, up, 0.5, True)
    assert relative_error(y, _want(x, weight, bias, down, up, 0.5, True)) < TOLERANCE
    element = "bf16" if dtype == torch.bfloat16 else "fp16"
    plans = [p for p in sm90.plan_info() if p[:4] == (4096, 3072, 3072, element) and p[6] > 0]
    assert plans and all(t != float("inf") for t in plans[0][5]), f"a config failed or disagreed: {plans}"


@pytest.mark.parametrize("fusion", [False, True])
@pytest.mark.parametrize("rows,k,n", sorted(set(FLUX_SHAPES)))
def test_model_shapes_and_every_config_agrees(sm90, generator, rows, k, n, fusion):
    x, weight, bias, down, up = _problem(generator, rows, k, n, 32, torch.bfloat16, "student_t")
    with sm90.low_rank_fusion(fusion):
        y = _fused(sm90, x, weight, bias, down, up, 0.5, True)
    assert relative_error(y, _want(x, weight, bias, down, up, 0.5, True)) < TOLERANCE
    plans = [p for p in sm90.plan_info() if p[:4] == (rows, k, n, "bf16") and p[6] > 0]
    assert plans, "no plan with a low-rank branch"
    chosen_tile_k = sm90.config_info(torch.bfloat16)[plans[0][4]][2]
    assert plans[0][6] == chosen_tile_k, f"a rank-32 branch adds one k-tile of the chosen config: {plans}"
    times = plans[0][5]
    assert all(t != float("inf") for t in times), f"a config failed or disagreed with the first: {times}"


def test_lynx_linear_runs_the_branch_in_the_gemm(sm90, generator):
    from rt_lynx_pack.lynx import LowRankBranch, LynxConfig, lynx_linear
    x, weight, bias, down, up = _problem(generator, 2 * 300, 3072, 1024, 16, torch.bfloat16)
    branch = LowRankBranch(down.float().cpu(), up.float().cpu(), scale=0.5)
    branch.prepare(x.device, x.dtype)
    assert branch.operands_for(x).up_k_extension is not None, "sm90 available: the branch goes into the GEMM"
    y = lynx_linear(x.view(2, 300, 3072), weight, bias, LynxConfig(), lora=branch)
    assert y.shape == (2, 300, 1024)
    assert relative_error(y.view(600, 1024), _want(x, weight, bias, down, up, 0.5, True)) < TOLERANCE
    added_after = sparse_linear(x, weight, bias, True, low_rank=LowRankOperands(down, up, 0.5))
    assert relative_error(y.view(600, 1024), added_after) < TOLERANCE


def test_compiled_lynx_linear_with_a_branch_matches_eager(sm90, generator):
    from rt_lynx_pack.lynx import LowRankBranch, LynxConfig, lynx_linear
    x, weight, bias, down, up = _problem(generator, 256, 3072, 1024, 32, torch.bfloat16)
    branch = LowRankBranch(down.float().cpu(), up.float().cpu(), scale=0.5)
    branch.prepare(x.device, x.dtype)   # as the ComfyUI glue does, outside the compiled region
    x3 = x.view(1, 256, 3072)
    eager = lynx_linear(x3, weight, bias, LynxConfig(), lora=branch)
    compiled = torch.compile(lambda a: lynx_linear(a, weight, bias, LynxConfig(), lora=branch), fullgraph=True)
    assert torch.equal(compiled(x3), eager)


def test_fp16_branch_and_no_extension_for_fp8(sm90, generator):
    operands = prepare_low_rank(torch.randn(8, 256), torch.randn(64, 8), 1.0, torch.device("cuda"), torch.float16)
    assert operands.up_k_extension is not None and operands.up_k_extension.shape == (64, 16)
    operands32 = prepare_low_rank(torch.randn(8, 256), torch.randn(64, 8), 1.0, torch.device("cuda"), torch.float32)
    assert operands32.up_k_extension is None, "fp32 has no sparse GEMM: the branch is added after"


@pytest.mark.parametrize("fusion", [False, True])
def test_under_torch_compile_and_cuda_graphs(sm90, generator, fusion):
    x, weight, bias, down, up = _problem(generator, 300, 3072, 1024, 32, torch.bfloat16)
    up_ext = sm90.k_extension_up(up, 0.5)
    with sm90.low_rank_fusion(fusion):
        eager = sm90.sparse_linear_lora_sm90(x, weight, bias, True, down, up_ext)
        compiled = torch.compile(
            lambda a: torch.ops.rt_lynx.sparse_linear_lora_sm90(a, weight, bias, True, down, up_ext) * 2,
            fullgraph=True)
        assert torch.equal(compiled(x), eager * 2)
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = sm90.sparse_linear_lora_sm90(static_x, weight, bias, True, down, up_ext)
        for kind in ("cubed", "student_t"):  # replayed twice on other data: no state carries over between replays
            fresh = make_input(kind, 300, 3072, torch.bfloat16, generator)
            static_x.copy_(fresh)
            graph.replay()
            torch.testing.assert_close(static_y, sm90.sparse_linear_lora_sm90(fresh, weight, bias, True, down, up_ext),
                                       rtol=0, atol=0)


def test_bad_branch_operands_are_refused(sm90, generator):
    x, weight, bias, down, up = _problem(generator, 64, 256, 64, 8, torch.bfloat16)
    up_ext = sm90.k_extension_up(up, 1.0)
    with pytest.raises(RuntimeError, match="down must be"):
        sm90.sparse_linear_lora_sm90(x, weight, bias, True, down[:, :128], up_ext)
    with pytest.raises(RuntimeError, match="up_ext must"):
        sm90.sparse_linear_lora_sm90(x, weight, bias, True, down, up_ext[:32])
    with pytest.raises(RuntimeError, match="at least 2 \\* rank"):
        sm90.sparse_linear_lora_sm90(x, weight, bias, True, down, up_ext[:, :8].contiguous())
