"""GPU tests of the fp8 e4m3 path (kernels/fp8.py + csrc): layout, quantisation, GEMM, linear.

Tolerances:
- Against the fp8 reference (fp32 math on the SAME quantised q, a, wq, w_scale): the only
  roundings left are cuSPARSELt's bf16 D (relative 2^-9 per element at most) and the output
  dtype (2^-9 bf16, 2^-11 fp16), RMS about 1.6e-3 together: 5e-3 relative (Frobenius).
- Against the bf16 Lynx path / fp32 math on the unquantised sparsified input: e4m3 keeps 3
  mantissa bits (rounding error up to 2^-4, RMS about 2.5% per value) on both x and W, so
  about 3.5% on a product: 8e-2 (more than 2x the expected value).
Skipped without CUDA or on a non-Hopper GPU; on Hopper the fp8 path must be available.
"""
import pytest
import torch
import torch.nn.functional as F

from rt_lynx_pack.kernels.reference import (quantize_weight_fp8, sparse_linear_fp8_reference,
                                            sparsify_quantize_fp8)

from kernel_helpers import padded
from kernel_helpers import (FLUX_SHAPES, fp8_linear_case, fp32_lynx, make_input, poison_allocator,
                            relative_error, require_fast_path)

EXACT_Q_TOLERANCE = 5e-3
VS_16BIT_TOLERANCE = 8e-2
DTYPES = [torch.bfloat16, torch.float16]
ODD_ROWS = [1, 7, 63, 65, 4097]


@pytest.fixture(scope="module")
def fp8():
    return require_fast_path("fp8")



def fp8_metadata_index(rows_padded, cols, device):
    """(byte index, nibble shift) of every (row, group of 4) in the e4m3 compressed metadata
    (FINDINGS: b = column/8, low nibble group 2b, high nibble group 2b+1)."""
    r = torch.arange(rows_padded, device=device)[:, None]
    g = torch.arange(cols // 4, device=device)[None, :]
    b = g // 2
    index = ((r // 64) * 8 * cols + (b // 8) * 512 + ((r % 64) // 16) * 128 + (r % 8) * 16
             + 4 * (b % 4) + 2 * ((b % 8) // 4) + (r % 16) // 8)
    shift = (g % 2) * 4
    return index, shift.expand_as(index)


def decode_fp8(compressed, rows, rows_padded, cols):
    """The dense e4m3 matrix (rows x cols, zeros where pruned) our buffer describes, as bytes,
    and whether every code has two distinct ascending positions."""
    meta = compressed[rows_padded * cols // 2: rows_padded * cols * 5 // 8]
    index, shift = fp8_metadata_index(rows_padded, cols, compressed.device)
    codes = (meta[index].to(torch.int32) >> shift) & 0xF
    low, high = codes & 3, codes >> 2
    values = compressed[: rows_padded * cols // 2].view(rows_padded, cols // 4, 2)
    dense = torch.zeros(rows_padded, cols // 4, 4, dtype=torch.uint8, device=compressed.device)
    dense.scatter_(-1, low[..., None].long(), values[..., :1])
    dense.scatter_(-1, high[..., None].long(), values[..., 1:])
    return dense.view(rows_padded, cols)[:rows], bool((low < high)[:rows].all())


def test_availability_names_the_operand(fp8):
    available, reason = fp8.availability_fp8(torch.device("cuda"))
    assert available and f"structured operand {fp8.fp8_operand()}" in reason, reason


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["randn", "tied"])
@pytest.mark.parametrize("rows,cols", [(64, 64), (128, 3072), (4096, 3072), (192, 15360)])
def test_e4m3_layout_is_byte_exact_vs_cusparselt(fp8, generator, dtype, kind, rows, cols):
    x = make_input(kind, rows, cols, dtype, generator, no_zeros=True)
    poison_allocator(rows * cols * 2)
    compressed, _ = torch.ops.rt_lynx.sparsify_fp8(x, rows, True, 0)
    q, _ = sparsify_quantize_fp8(x, True)
    assert compressed.numel() == rows * cols * 5 // 8
    torch_bytes = torch._cslt_compress(q).reshape(-1).view(torch.uint8)
    assert torch.equal(compressed, torch_bytes[: compressed.numel()])
    own = fp8._cusparselt.extension().compress_reference(q, fp8.fp8_operand() == "B")
    assert torch.equal(compressed, own[: compressed.numel()])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["randn", "cubed", "student_t", "tied", "zero_rows"])
@pytest.mark.parametrize("rows", ODD_ROWS + [512])
@pytest.mark.parametrize("compensate", [True, False])
def test_quantised_values_and_scales_equal_the_reference(fp8, generator, dtype, kind, rows,
                                                         compensate):
    cols = 3072
    x = make_input(kind, rows, cols, dtype, generator)
    mp = padded(rows)
    poison_allocator(mp * cols * 2)
    compressed, scale = torch.ops.rt_lynx.sparsify_fp8(x, mp, compensate, 0)
    q, a = sparsify_quantize_fp8(x, compensate)
    dense, ascending = decode_fp8(compressed, rows, mp, cols)
    assert ascending
    # The kept positions are sparsify_nm's (ties to the lower index), so bytes must match.
    assert torch.equal(dense, q.view(torch.uint8))
    want = a.reshape(-1)
    assert torch.allclose(scale[:rows], want, rtol=1e-5, atol=0), (scale[:rows] - want).abs().max()
    # Padded rows: zero values and zero scale.
    assert not scale[rows:].any()
    assert not compressed[rows * cols // 2: mp * cols // 2].any()


@pytest.mark.parametrize("rows,cols", [(512, 3072), (4096, 12288), (64, 15360)])
def test_every_split_gives_the_same_bytes(fp8, generator, rows, cols):
    x = make_input("cubed", rows, cols, torch.bfloat16, generator)
    first = None
    for split in (1, 2, 4, 8):
        out = torch.ops.rt_lynx.sparsify_fp8(x, rows, True, split)
        if first is None:
            first = out
        else:
            # Values and metadata exactly (q does not depend on the norms); the scale's norm
            # sums run in another order per split, so it may move by a few fp32 ulps.
            assert torch.equal(out[0], first[0]), split
            assert torch.allclose(out[1], first[1], rtol=1e-6, atol=0), split


def test_quantize_weight_fp8_is_per_channel(fp8, generator):
    w = torch.randn(96, 256, generator=generator, device="cuda").to(torch.bfloat16) * 3
    w[5] = 0
    wq, w_scale = quantize_weight_fp8(w)
    assert wq.dtype == torch.float8_e4m3fn and w_scale.dtype == torch.float32
    amax = w.float().abs().amax(1)
    assert torch.equal(w_scale, amax / torch.full_like(amax, 448.0))
    assert torch.equal(wq.float().abs().amax(1)[torch.arange(96, device="cuda") != 5],
                       torch.full((95,), 448.0, device="cuda"))
    assert not wq[5].float().any() and w_scale[5] == 0
    back = wq.float() * w_scale[:, None]
    # e4m3 round to nearest: relative error <= 2^-4 for normal values.
    big = w.float().abs() > w_scale[:, None] * 2 ** -6 * 2
    assert ((back - w.float()).abs()[big] <= w.float().abs()[big] * 2 ** -4 * 1.001).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_mm_fp8_alone_matches_fp32_product(fp8, generator, dtype):
    rows, k, n = 4096, 3072, 9216
    x = make_input("randn", rows, k, dtype, generator)
    wq, _ = quantize_weight_fp8(torch.randn(n, k, generator=generator, device="cuda"))
    compressed, _ = torch.ops.rt_lynx.sparsify_fp8(x, rows, True, 0)
    poison_allocator(rows * n * 2)
    d = torch.ops.rt_lynx.sparse_mm_fp8(compressed, wq, rows)
    q, _ = sparsify_quantize_fp8(x, True)
    want = q.float() @ wq.float().t()
    assert d.dtype == torch.bfloat16 and not d.isnan().any()
    assert relative_error(d, want) < EXACT_Q_TOLERANCE


def _check_linear(fp8, x, w, b, wq, w_scale, compensate=True):
    rows, n = x.shape[0], wq.shape[0]
    poison_allocator((padded(rows) * x.shape[1] + 2 * padded(rows) * n) * 2)
    y = fp8.sparse_linear_fp8(x, wq, w_scale, b, compensate)
    assert y.shape == (rows, n) and y.dtype == x.dtype
    assert not y.isnan().any(), "output not fully written (poisoned NaN left)"
    want = sparse_linear_fp8_reference(x.float(), wq, w_scale, None if b is None else b.float(),
                                       compensate)
    error = relative_error(y, want)
    assert error < EXACT_Q_TOLERANCE, f"vs fp8 reference {error:.2e}"
    return y


@pytest.mark.parametrize("rows,k,n", FLUX_SHAPES)
def test_sparse_linear_fp8_flux_shapes(fp8, generator, rows, k, n):
    x, w, b, wq, w_scale = fp8_linear_case(torch.bfloat16, "randn", rows, k, n, generator)
    y = _check_linear(fp8, x, w, b, wq, w_scale)
    # Against the 16-bit Lynx path and its fp32 math (same sparsified input, no quantisation).
    y16 = torch.ops.rt_lynx.sparse_linear(x, w, b, True)
    error16 = relative_error(y, y16)
    error32 = relative_error(y, fp32_lynx(x, w, b, True))
    print(f"{rows}x{k}x{n}: fp8 vs bf16 Lynx {error16:.2e}, vs fp32 {error32:.2e}")
    assert error16 < VS_16BIT_TOLERANCE and error32 < VS_16BIT_TOLERANCE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["randn", "cubed", "student_t", "tied", "zero_rows"])
@pytest.mark.parametrize("rows", ODD_ROWS)
def test_sparse_linear_fp8_odd_rows_and_heavy_tails(fp8, generator, dtype, kind, rows):
    x, w, b, wq, w_scale = fp8_linear_case(dtype, kind, rows, 1024, 512, generator)
    y = _check_linear(fp8, x, w, b, wq, w_scale)
    error32 = relative_error(y, fp32_lynx(x, w, b, True))
    print(f"{kind} M={rows} {dtype}: fp8 vs fp32 Lynx {error32:.2e}")
    assert error32 < VS_16BIT_TOLERANCE


@pytest.mark.parametrize("compensate", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_fp8_bias_and_compensation_flags(fp8, generator, compensate, bias):
    x, w, b, wq, w_scale = fp8_linear_case(torch.float16, "cubed", 333, 3072, 3072, generator, bias)
    _check_linear(fp8, x, w, b, wq, w_scale, compensate)


def test_fp8_bias_in_fp32_is_added_per_feature(fp8, generator):
    x, w, _, wq, w_scale = fp8_linear_case(torch.bfloat16, "randn", 256, 1024, 256, generator)
    b = torch.arange(256, device="cuda", dtype=torch.float32) * 0.01  # a per-feature ramp
    _check_linear(fp8, x, w, b, wq, w_scale)
    # A bias on the token axis (cuSPARSELt's own) would leave a different column mean.
    y = fp8.sparse_linear_fp8(x, wq, w_scale, b, True)
    y0 = fp8.sparse_linear_fp8(x, wq, w_scale, None, True)
    assert torch.allclose((y.float() - y0.float()).mean(0), b, rtol=0, atol=0.01)


def test_fp8_epilogue_op_matches_fp32_math(fp8, generator):
    d = torch.randn(128, 256, generator=generator, device="cuda").to(torch.bfloat16) * 1000
    a = torch.rand(128, generator=generator, device="cuda")
    ws = torch.rand(256, generator=generator, device="cuda")
    b = torch.randn(256, generator=generator, device="cuda").to(torch.float16)
    y = torch.ops.rt_lynx.fp8_epilogue(d, a, ws, b, 100, torch.float16)
    want = d[:100].float() * a[:100, None] * ws + b.float()
    assert y.dtype == torch.float16 and y.shape == (100, 256)
    assert relative_error(y, want) < 1e-3


def test_torch_compile_fullgraph(fp8, generator):
    x, w, b, wq, w_scale = fp8_linear_case(torch.bfloat16, "randn", 300, 3072, 3072, generator)

    def block(t):
        return F.gelu(fp8.sparse_linear_fp8(t, wq, w_scale, b, True)) * 2

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)(x)
    assert relative_error(compiled, block(x)) < 1e-3


def test_cuda_graph_replay_matches_eager(fp8, generator):
    x, w, b, wq, w_scale = fp8_linear_case(torch.bfloat16, "randn", 512, 3072, 3072, generator)
    first = fp8.sparse_linear_fp8(x, wq, w_scale, b, True)  # plan searched outside capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fp8.sparse_linear_fp8(x, wq, w_scale, b, True)
        with torch.cuda.graph(graph, stream=stream):
            out = fp8.sparse_linear_fp8(x, wq, w_scale, b, True)
    torch.cuda.current_stream().wait_stream(stream)
    x.copy_(make_input("randn", 512, 3072, torch.bfloat16, generator))
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(out, fp8.sparse_linear_fp8(x, wq, w_scale, b, True)) < 1e-3
    assert relative_error(out, first) > 1e-1  # the replay really read the new input


def test_bad_inputs_give_clear_errors(fp8, generator):
    x, w, b, wq, w_scale = fp8_linear_case(torch.bfloat16, "randn", 64, 256, 64, generator)
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        torch.ops.rt_lynx.sparse_linear_fp8(x, w, w_scale, b, True)
    with pytest.raises(RuntimeError, match="w_scale"):
        torch.ops.rt_lynx.sparse_linear_fp8(x, wq, w_scale[:10], b, True)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.rt_lynx.sparse_linear_fp8(x, wq[:48].contiguous(), w_scale[:48].contiguous(), None, True)
    assert fp8.supports_fp8(x, wq) == (True, "ok")
    assert not fp8.supports_fp8(x, w)[0]
    assert not fp8.supports_fp8(x[:, :192], wq[:, :192])[0]
    assert not fp8.supports_fp8(x, wq[:48])[0]
