"""GPU tests of the stage-2 fast path (kernels/sm90.py, csrc/sm90_*): every op against the reference.

The chain of evidence for the compressed layout: the C++ metadata formula equals CuTe's layout
of every GEMM config (host check below), the sparsify kernels' output decoded with the same
formula equals the reference sparsification exactly, and every config's product on fresh random
and heavy-tailed inputs equals fp32 math on the same sparsified input.
Skipped without CUDA or on a non-Hopper GPU; on Hopper the path must be available.
"""
import pytest
import torch

from rt_lynx_pack.kernels.reference import (keep_mask_nm, norm_compensation_scale, quantize_weight_fp8,
                                            sparse_linear_fp8_reference, sparsify_nm, sparsify_quantize_fp8)

from kernel_helpers import (DTYPES, FLUX_SHAPES, INPUT_KINDS, QWEN_SHAPES, check_lynx_linear,
                            check_zero_tokens_give_the_bias, fp32_lynx, make_input, padded, poison_allocator,
                            relative_error, require_fast_path)

TOLERANCE = 1e-2
ODD_ROWS = [1, 7, 63, 65, 100, 4097]
E4M3 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def sm90():
    return require_fast_path("sm90")


def configs(sm90, dtype):
    return sm90.config_info(dtype)


def metadata_index(rows_padded, cols, block, eight_bit, device):
    """(byte, nibble shift) of every (row, group) in CUTLASS's sm90 metadata (sm90_metadata_layout.h)."""
    r = torch.arange(rows_padded, device=device)[:, None]
    k = 4 * torch.arange(cols // 4, device=device)[None, :]
    if eight_bit:
        byte = ((k % block) // 8 + (block // 8) * (r % 64) + 8 * block * (r // 64)
                + rows_padded * (block // 8) * (k // block))
    else:
        nk = block // 32
        byte = ((k % 16) // 8 + 2 * ((r // 8) % 2) + 4 * ((k // 32) % nk) + 4 * nk * (r % 8)
                + 32 * nk * ((k // 16) % 2) + 64 * nk * ((r // 16) % 4) + 256 * nk * (r // 64)
                + rows_padded * 4 * nk * (k // block))
    return byte, ((k % 8) // 4 * 4).expand_as(byte)


def decode(buffer, rows, cols, block, eight_bit):
    """(kept mask rows x cols, values rows x cols/2 as raw bytes/halves, codes ordered) of sparsify_sm90's buffer."""
    rows_padded = padded(rows)
    raw = buffer.view(torch.uint8)
    value_bytes = rows_padded * cols // 2 * (1 if eight_bit else 2)
    meta = raw[value_bytes:]
    byte, shift = metadata_index(rows_padded, cols, block, eight_bit, buffer.device)
    codes = (meta[byte].to(torch.int32) >> shift) & 0xF
    low, high = codes & 3, codes >> 2
    position = torch.arange(4, device=buffer.device)
    kept = ((position == low[..., None]) | (position == high[..., None])).reshape(rows_padded, cols)
    if eight_bit:
        values = raw[:value_bytes].view(rows_padded, cols // 2)
    else:
        values = buffer[: rows_padded * cols // 2].view(rows_padded, cols // 2)
    return kept[:rows], values[:rows], (low < high)[:rows]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, E4M3])
@pytest.mark.parametrize("rows,cols", [(64, 128), (130, 384), (1000, 256)])
def test_metadata_formula_equals_cutlass_layout_for_every_config(sm90, dtype, rows, cols):
    module = sm90._cusparselt.extension()
    for *_, index, name in configs(sm90, dtype):
        assert module.sm90_check_metadata_layout(sm90.ELEMENTS[dtype], index, rows, cols) == "", name


# Both passes (sm90.staged_sparsify): 128 columns leave most threads of a row pair idle, 3072 is
# FLUX's width, 15360 (FLUX linear2) fills the staged pass's last units in part, and 16512 is
# past what it holds (the chunk loop runs even when staged).
PASS_COLUMNS = [128, 3072, 15360, 16512]


def sparsify_sm90(sm90, x, block, e4m3, compensate, staged):
    with sm90.staged_sparsify(staged):
        assert sm90.staged_sparsify_runs(*x.shape) == (staged and x.shape[1] <= 16384)
        return torch.ops.rt_lynx.sparsify_sm90(x, block, e4m3, compensate)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("rows", ODD_ROWS + [512])
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("cols", PASS_COLUMNS)
@pytest.mark.parametrize("staged", [True, False])
def test_sparsify_sm90_writes_reference_mask_values_and_scale(sm90, generator, dtype, kind, rows, block, cols,
                                                              staged):
    x = make_input(kind, rows, cols, dtype, generator)
    poison_allocator(padded(rows) * cols * 2)
    buffer, scale = sparsify_sm90(sm90, x, block, False, True, staged)
    assert buffer.numel() == sm90.compressed_numel(rows, cols, False)
    kept, values, ordered = decode(buffer, rows, cols, block, False)
    assert bool(ordered.all()), "metadata codes must name two distinct positions, lower first"
    want_mask = keep_mask_nm(x)
    assert torch.equal(kept, want_mask)
    assert torch.equal(values.view(torch.int16), x[want_mask].view(rows, cols // 2).view(torch.int16))
    want_scale = norm_compensation_scale(x, sparsify_nm(x)).squeeze(-1)
    assert not scale.isnan().any()
    torch.testing.assert_close(scale[:rows], want_scale, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("rows", ODD_ROWS)
@pytest.mark.parametrize("compensate", [True, False])
@pytest.mark.parametrize("cols", PASS_COLUMNS)
@pytest.mark.parametrize("staged", [True, False])
def test_sparsify_sm90_e4m3_writes_reference_quantised_values(sm90, generator, dtype, kind, rows, compensate, cols,
                                                              staged):
    x = make_input(kind, rows, cols, dtype, generator)
    poison_allocator(padded(rows) * cols)
    buffer, a = sparsify_sm90(sm90, x, 128, True, compensate, staged)
    assert buffer.dtype == torch.uint8 and buffer.numel() == sm90.compressed_numel(rows, cols, True)
    kept, values, ordered = decode(buffer, rows, cols, 128, True)
    q, want_a = sparsify_quantize_fp8(x, compensate)
    mask = keep_mask_nm(x)
    assert torch.equal(kept, mask) and bool(ordered.all())
    assert torch.equal(values, q[mask].view(rows, cols // 2).view(torch.uint8))
    torch.testing.assert_close(a[:rows], want_a.squeeze(-1), rtol=1e-6, atol=0)


def _weights(generator, n, k, dtype):
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    bias = torch.randn(n, generator=generator, device="cuda").to(dtype)
    return weight, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ODD_ROWS)
@pytest.mark.parametrize("compensate,with_bias", [(True, True), (False, False), (True, False)])
def test_every_config_matches_fp32_math(sm90, generator, dtype, rows, compensate, with_bias):
    k, n = 1024, 528   # N not a multiple of any tile
    x = make_input("student_t", rows, k, dtype, generator)
    weight, bias = _weights(generator, n, k, dtype)
    bias = bias if with_bias else None
    want = fp32_lynx(x, weight, bias, compensate)
    for _, _, _, block, index, name in configs(sm90, dtype):
        buffer, scale = torch.ops.rt_lynx.sparsify_sm90(x, block, False, compensate)
        poison_allocator(rows * n * 2)
        y = torch.ops.rt_lynx.sparse_mm_sm90(buffer, weight, scale if compensate else None, None, bias,
                                             rows, index, dtype)
        assert y.shape == (rows, n) and not y.isnan().any(), f"{name}: output not fully written"
        assert relative_error(y, want) < TOLERANCE, name


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("rows", ODD_ROWS)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("k", [1024, 1152])   # 1152: ends mid-way through the 256-column e4m3 tiles
def test_every_e4m3_config_matches_fp8_reference(sm90, generator, out_dtype, rows, with_bias, k):
    n = 544
    x = make_input("cubed", rows, k, out_dtype, generator)
    weight, bias = _weights(generator, n, k, torch.float32)
    wq, w_scale = quantize_weight_fp8(weight)
    bias = bias.to(out_dtype) if with_bias else None
    want = sparse_linear_fp8_reference(x.float(), wq, w_scale, None if bias is None else bias.float(), True)
    for _, _, _, block, index, name in configs(sm90, E4M3):
        buffer, a = torch.ops.rt_lynx.sparsify_sm90(x, block, True, True)
        poison_allocator(rows * n * 2)
        y = torch.ops.rt_lynx.sparse_mm_sm90(buffer, wq, a, w_scale, bias, rows, index, out_dtype)
        assert y.dtype == out_dtype and not y.isnan().any(), name
        assert relative_error(y, want) < TOLERANCE, name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,k,n", sorted(set(FLUX_SHAPES + QWEN_SHAPES)))
def test_sparse_linear_sm90_model_shapes(sm90, generator, dtype, rows, k, n):
    x = make_input("randn", rows, k, dtype, generator)
    weight, bias = _weights(generator, n, k, dtype)
    check_lynx_linear(sm90.sparse_linear_sm90, x, weight, bias, True)
    chosen = [p for p in sm90.plan_info() if p[:3] == (rows, k, n)]
    assert chosen, "the first call must record its tuned config"
    times = chosen[0][5]
    finite = [t for t in times if t != float("inf")]
    assert finite and times[chosen[0][4]] == min(finite), "the fastest agreeing config is chosen"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("rows", ODD_ROWS)
@pytest.mark.parametrize("compensate,bias_kind", [(True, "same"), (False, None), (False, "fp32")])
def test_sparse_linear_sm90_odd_rows_and_input_families(sm90, generator, dtype, kind, rows, compensate,
                                                        bias_kind):
    k, n = 3072, 1024
    x = make_input(kind, rows, k, dtype, generator)
    weight, bias = _weights(generator, n, k, dtype)
    if bias_kind is None:
        bias = None
    elif bias_kind == "fp32":
        bias = bias.float()
    y = check_lynx_linear(sm90.sparse_linear_sm90, x, weight, bias, compensate)
    check_zero_tokens_give_the_bias(y, x, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,k,n", sorted(set(FLUX_SHAPES + QWEN_SHAPES)))
def test_sparse_linear_fp8_sm90_model_shapes(sm90, generator, dtype, rows, k, n):
    x = make_input("student_t", rows, k, dtype, generator)
    weight, bias = _weights(generator, n, k, torch.float32)
    wq, w_scale = quantize_weight_fp8(weight)
    bias = bias.to(dtype)
    poison_allocator((padded(rows) * k + rows * n * 2))
    y = sm90.sparse_linear_fp8_sm90(x, wq, w_scale, bias, True)
    assert y.shape == (rows, n) and y.dtype == dtype and not y.isnan().any()
    want = sparse_linear_fp8_reference(x.float(), wq, w_scale, bias.float(), True)
    assert relative_error(y, want) < TOLERANCE


def test_sparse_linear_sm90_under_torch_compile_and_cuda_graphs(sm90, generator):
    dtype = torch.bfloat16
    x = make_input("randn", 300, 3072, dtype, generator)
    weight, bias = _weights(generator, 1024, 3072, dtype)
    eager = sm90.sparse_linear_sm90(x, weight, bias, True)
    compiled = torch.compile(lambda a: torch.ops.rt_lynx.sparse_linear_sm90(a, weight, bias, True) * 2,
                             fullgraph=True)
    assert torch.equal(compiled(x), eager * 2)
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = sm90.sparse_linear_sm90(static_x, weight, bias, True)
    fresh = make_input("cubed", 300, 3072, dtype, generator)
    static_x.copy_(fresh)
    graph.replay()
    torch.testing.assert_close(static_y, sm90.sparse_linear_sm90(fresh, weight, bias, True), rtol=0, atol=0)


def test_unsupported_shapes_are_refused_with_a_reason(sm90, generator):
    x = make_input("randn", 64, 3008, torch.bfloat16, generator)   # 3008 = 47 * 64, not a multiple of 128
    weight, _ = _weights(generator, 256, 3008, torch.bfloat16)
    supported, why_not = sm90.supports_sm90(x, weight)
    assert not supported and "multiple of 128" in why_not
    with pytest.raises(RuntimeError, match="multiple of 128"):
        sm90.sparse_linear_sm90(x, weight, None, True)
    from rt_lynx_pack.kernels import select_backend
    assert select_backend(x, weight, "auto", 2, 4).name == "cusparselt"   # stage 1 takes K % 64


@pytest.mark.parametrize("attempt", range(3))
def test_self_test_passes_again_over_poisoned_memory(sm90, attempt):
    # The start-up check runs once per process, after whatever ran before it, and a failure keeps
    # the process off this backend: it must not depend on what earlier work left in memory.
    blocks = [torch.full((size // 2,), -1, dtype=torch.int16, device="cuda")
              for size in (4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20) for _ in range(4)]
    del blocks
    sm90.clear_plans()   # the GEMM plans (and their config choice) made again too
    assert sm90.self_test_sm90(torch.device("cuda")) == ""
