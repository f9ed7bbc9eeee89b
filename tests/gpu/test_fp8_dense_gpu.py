"""GPU tests of the fp8 dense path (kernels/fp8_dense.py, csrc quantize_rows_fp8): the product of
the layers an fp8 model keeps dense.

Tolerances:
- The quantise pass equals the reference bit for bit (the same fp32 division and multiply, and a
  round-to-nearest-even conversion), with a GELU tail too (torch's GELU math in its order).
- The product against the fp8 reference (fp32 math on the SAME q, a, wq, w_scale): torch's
  row-wise scaled GEMM sums in the tensor cores' accumulator (fp8_dense.FAST_ACCUMULATION: fewer
  bits than fp32; 2.7e-3 at most in bench/kernels.py --fp8 on an H100) and rounds once to bf16
  (2^-9), fp16 outputs once more (2^-11): 5e-3 relative (Frobenius).
- Against fp32 math on the unquantised x and W: e4m3 keeps 3 mantissa bits on both, about 3.5%
  on a product: 8e-2.
Skipped without CUDA or on a non-Hopper GPU; on Hopper the path must be available.
"""
import pytest
import torch
import torch.nn.functional as F

from rt_lynx_pack.kernels import dense_linear_fp8
from rt_lynx_pack.kernels.reference import cat_gelu_tanh_reference, dense_linear_fp8_reference, quantize_rows_fp8
from rt_lynx_pack.kernels.sm90 import fast_gelu
from rt_lynx_pack.lynx import LynxConfig
from rt_lynx_pack.lynx.linear import fp8_dense_linear

from kernel_helpers import (INPUT_KINDS, fp8_linear_case, make_input, negative_tail, poison_allocator, relative_error,
                            require_fast_path)

EXACT_Q_TOLERANCE = 5e-3
VS_16BIT_TOLERANCE = 8e-2
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def fp8_dense():
    return require_fast_path("fp8_dense")


def _check_rows(x):
    poison_allocator(x.numel() * 2 + x.shape[0] * 4)
    q, a = torch.ops.rt_lynx.quantize_rows_fp8(x)
    want_q, want_a = quantize_rows_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and a.shape == (x.shape[0], 1)
    # Bytes, not values: a poisoned (unwritten) byte reads as e4m3 NaN, which == would not catch.
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)), "quantised values differ"
    assert torch.equal(a, want_a), "scales differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("rows,cols", [(1, 16), (37, 3072), (4608, 15360), (65, 12288), (3, 32768), (130, 48)])
def test_quantised_rows_equal_the_reference(fp8_dense, generator, dtype, kind, rows, cols):
    _check_rows(make_input(kind, rows, cols, dtype, generator))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_of_subnormals_quantise_like_the_reference(fp8_dense, generator, dtype):
    # 448 / max overflows fp32 for such rows: the scale is capped, no NaN (a zero times inf).
    x = make_input("zero_rows", 40, 3072, dtype, generator)
    x[1] = 0
    x[1, :7] = torch.finfo(dtype).tiny / 4
    _check_rows(x)
    q, _ = torch.ops.rt_lynx.quantize_rows_fp8(x)
    assert not q.float().isnan().any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_misaligned_rows(fp8_dense, generator, dtype):
    wide = make_input("cubed", 50, 3072 + 64, dtype, generator)
    _check_rows(wide[:, :3072])          # row stride past K: read in place
    _check_rows(wide.view(-1)[8:8 + 49 * 3072].view(49, 3072))   # 16-byte aligned, contiguous
    _check_rows(wide.view(-1)[1:1 + 49 * 3072].view(49, 3072))   # misaligned: copied first


def _check_linear(fp8_dense, x, w, b, wq, w_scale):
    poison_allocator(x.numel() * 2 + x.shape[0] * wq.shape[0] * 2)
    y = fp8_dense.dense_linear_fp8(x, wq, w_scale, b)
    assert y.shape == (x.shape[0], wq.shape[0]) and y.dtype == x.dtype
    assert not y.isnan().any(), "output not fully written (poisoned NaN left)"
    b32 = None if b is None else b.float()
    error = relative_error(y, dense_linear_fp8_reference(x.float(), wq, w_scale, b32))
    assert error < EXACT_Q_TOLERANCE, f"vs fp8 reference {error:.2e}"
    error = relative_error(y, F.linear(x.float(), w.float(), b32))
    assert error < VS_16BIT_TOLERANCE, f"vs fp32 on the unquantised operands {error:.2e}"
    return y


@pytest.mark.parametrize("rows,k,n", [(4608, 15360, 3072), (4096, 3072, 9216), (512, 12288, 3072)])
def test_dense_linear_fp8_on_model_shapes(fp8_dense, generator, rows, k, n):
    _check_linear(fp8_dense, *fp8_linear_case(torch.bfloat16, "randn", rows, k, n, generator))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["cubed", "student_t", "zero_rows"])
@pytest.mark.parametrize("rows", [1, 7, 63, 4097])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_linear_fp8_odd_rows_heavy_tails_and_dtypes(fp8_dense, generator, dtype, kind, rows, bias):
    _check_linear(fp8_dense, *fp8_linear_case(dtype, kind, rows, 3072, 3072, generator, bias))


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 33, 63, 64, 65, 100, 257])
@pytest.mark.parametrize("k,n", [(15360, 3072), (16384, 3072), (12288, 3072), (3072, 12288), (3072, 64)])
def test_dense_linear_fp8_runs_every_row_count_on_long_and_wide_layers(fp8_dense, generator, rows, k, n):
    # cuBLASLt's algorithm choice depends on M, K and N: few rows of a long row had none with the fast
    # accumulation; whichever accumulation a shape gets, it must run and be right.
    _check_linear(fp8_dense, *fp8_linear_case(torch.bfloat16, "student_t", rows, k, n, generator))


def test_lynx_layer_compiles_without_graph_break(fp8_dense, generator):
    x, w, b, wq, w_scale = fp8_linear_case(torch.bfloat16, "randn", 300, 3072, 3072, generator)
    config = LynxConfig(precision="fp8", backend="cuda")   # "cuda": the reference would raise

    def block(t):
        return F.gelu(fp8_dense_linear(t.view(2, 150, 3072), w, b, config, fp8_weight=(wq, w_scale))) * 2

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)(x)
    assert relative_error(compiled, block(x)) < 1e-3


def test_unsupported_inputs_fall_back_or_fail_clearly(fp8_dense, generator):
    x, w, b, wq, w_scale = fp8_linear_case(torch.bfloat16, "randn", 40, 40960, 64, generator)
    # A row longer than the quantise pass holds: the reference on "auto", an error on "cuda".
    assert torch.equal(dense_linear_fp8(x, wq, w_scale, b), dense_linear_fp8_reference(x, wq, w_scale, b))
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        dense_linear_fp8(x, wq, w_scale, b, "cuda")
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.rt_lynx.quantize_rows_fp8(torch.randn(4, 40, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bfloat16/float16"):
        torch.ops.rt_lynx.quantize_rows_fp8(torch.randn(4, 64, device="cuda"))


def _tail_case(kind, rows, head, tail, dtype, generator):
    """(x, gelu_tail) as FLUX's single block has them: the attention output and the MLP part of
    linear1's output (a strided view)."""
    x = make_input(kind, rows, head, dtype, generator)
    projected = make_input(kind, rows, 3 * head + tail, dtype, generator)
    return x, projected[:, 3 * head:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("rows,head,tail", [(4608, 3072, 12288), (1, 16, 16), (37, 3072, 64), (65, 48, 16384)])
def test_quantised_rows_with_a_gelu_tail_equal_the_reference(fp8_dense, generator, dtype, kind, rows, head, tail):
    x, gelu_tail = _tail_case(kind, rows, head, tail, dtype, generator)
    for t in (gelu_tail, gelu_tail.contiguous()):
        poison_allocator((head + tail) * rows * 2 + rows * 4)
        q, a = torch.ops.rt_lynx.quantize_rows_fp8(x, t)
        want_q, want_a = quantize_rows_fp8(cat_gelu_tanh_reference(x, t))
        assert q.shape == (rows, head + tail) and a.shape == (rows, 1)
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)), "quantised values differ"
        assert torch.equal(a, want_a), "scales differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["randn", "cubed", "student_t"])
@pytest.mark.parametrize("rows,head,tail", [(4608, 3072, 12288), (37, 3072, 64)])
def test_a_fast_gelu_tail_quantises_what_cat_gelu_tanh_makes_with_it(fp8_dense, generator, dtype, kind, rows, head,
                                                                      tail):
    # One device GELU for both passes: with the fast one (sm90.fast_gelu, within an ulp of torch's,
    # test_block_ops_gpu) the tail is quantised as the written concatenation is.
    x, gelu_tail = _tail_case(kind, rows, head, tail, dtype, generator)
    poison_allocator((head + tail) * rows * 2 + rows * 4)
    with fast_gelu(True):
        q, a = torch.ops.rt_lynx.quantize_rows_fp8(x, gelu_tail)
        want_q, want_a = torch.ops.rt_lynx.quantize_rows_fp8(torch.ops.rt_lynx.cat_gelu_tanh(x, gelu_tail))
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)), "quantised values differ"
    assert torch.equal(a, want_a), "scales differ"


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_quantise_pass_gets_the_fast_gelu_switch(fp8_dense, generator, dtype):
    # A zero head and a tail where the two GELUs part: the rows' scales come from the GELU alone.
    x = torch.zeros(64, 3072, dtype=dtype, device="cuda")
    tail = negative_tail(64, 12288, dtype, generator)
    exact_q, exact_a = torch.ops.rt_lynx.quantize_rows_fp8(x, tail)
    with fast_gelu(True):
        fast_q, fast_a = torch.ops.rt_lynx.quantize_rows_fp8(x, tail)
    assert not torch.equal(fast_a, exact_a) or not torch.equal(fast_q.view(torch.uint8), exact_q.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["randn", "student_t", "zero_rows"])
@pytest.mark.parametrize("rows", [1, 63, 4608])
def test_dense_linear_fp8_of_a_gelu_tail_is_the_linear_of_the_concatenation(fp8_dense, generator, dtype, kind, rows):
    x, gelu_tail = _tail_case(kind, rows, 3072, 12288, dtype, generator)
    joined = cat_gelu_tanh_reference(x, gelu_tail)
    _, w, b, wq, w_scale = fp8_linear_case(dtype, kind, 1, 3072 + 12288, 3072, generator)
    poison_allocator(rows * 3072 * 2)
    got = dense_linear_fp8(x, wq, w_scale, b, "cuda", gelu_tail)
    assert not got.isnan().any(), "output not fully written (poisoned NaN left)"
    # The same q and a as the unfused input's, through the same GEMM: equal.
    assert torch.equal(got, dense_linear_fp8(joined, wq, w_scale, b, "cuda"))
    error = relative_error(got, dense_linear_fp8_reference(joined.float(), wq, w_scale, b.float()))
    assert error < EXACT_Q_TOLERANCE, f"vs fp8 reference {error:.2e}"


def test_lynx_layer_with_a_gelu_tail_compiles_without_graph_break(fp8_dense, generator):
    x, gelu_tail = _tail_case("randn", 300, 512, 2048, torch.bfloat16, generator)
    _, w, b, wq, w_scale = fp8_linear_case(torch.bfloat16, "randn", 1, 512 + 2048, 512, generator)
    config = LynxConfig(precision="fp8", backend="cuda")   # "cuda": the reference would raise

    def block(attn, mlp):
        return fp8_dense_linear(attn.view(2, 150, -1), w, b, config, fp8_weight=(wq, w_scale),
                                gelu_tail=mlp.view(2, 150, -1)) * 2

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)(x, gelu_tail)
    assert torch.equal(compiled, block(x, gelu_tail))
    want = fp8_dense_linear(cat_gelu_tanh_reference(x, gelu_tail).view(2, 150, -1), w, b, config,
                            fp8_weight=(wq, w_scale)) * 2
    assert torch.equal(compiled, want)


def test_a_gelu_tail_the_pass_cannot_take_falls_back_or_fails_clearly(fp8_dense, generator):
    x, gelu_tail = _tail_case("randn", 40, 3072, 32768, torch.bfloat16, generator)   # past the row limit
    _, w, b, wq, w_scale = fp8_linear_case(torch.bfloat16, "randn", 1, 3072 + 32768, 64, generator)
    want = dense_linear_fp8_reference(cat_gelu_tanh_reference(x, gelu_tail), wq, w_scale, b)
    assert torch.equal(dense_linear_fp8(x, wq, w_scale, b, "auto", gelu_tail), want)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        dense_linear_fp8(x, wq, w_scale, b, "cuda", gelu_tail)
    with pytest.raises(RuntimeError, match="gelu_tail must be"):
        torch.ops.rt_lynx.quantize_rows_fp8(x, gelu_tail[:3])
    # A tail with strided columns: written first (cat_gelu_tanh), then the fast product all the same.
    strided = make_input("randn", 40, 2048, torch.bfloat16, generator)[:, ::2]
    _, w, b, wq, w_scale = fp8_linear_case(torch.bfloat16, "randn", 1, 3072 + 1024, 64, generator)
    want = dense_linear_fp8(cat_gelu_tanh_reference(x, strided), wq, w_scale, b, "cuda")
    assert torch.equal(dense_linear_fp8(x, wq, w_scale, b, "cuda", strided), want)


# The modulation product (linear_e4m3_weight): x unquantised times the e4m3 weight. Every product of
# an e4m3 and a 16-bit value is exact in fp32, so kernel and reference differ only in the order of
# the fp32 sum, then round once to the output dtype: one output ulp at most.
OUTPUT_ULP = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _check_modulation(x, w, bias):
    from rt_lynx_pack.kernels import linear_fp8_weight, quantize_weight_fp8
    from rt_lynx_pack.kernels.reference import linear_e4m3_weight_reference
    wq, w_scale = quantize_weight_fp8(w)
    poison_allocator(x.shape[0] * w.shape[0] * 2)
    y = linear_fp8_weight(x, wq, w_scale, bias, "cuda")
    want = linear_e4m3_weight_reference(x.float(), wq, w_scale, None if bias is None else bias.float())
    assert y.shape == want.shape and y.dtype == x.dtype and not y.isnan().any()
    bound = OUTPUT_ULP[x.dtype] * want.abs() + 1e-5 * want.abs().max()
    assert ((y.float() - want).abs() <= bound).all(), f"max excess {((y.float() - want).abs() - bound).max():.3g}"
    if w.shape[0] >= 64:   # a norm over a few outputs only is one heavy-tailed ratio, not an average
        error = relative_error(y, F.linear(x.float(), w.float(), None if bias is None else bias.float()))
        assert error < VS_16BIT_TOLERANCE, f"vs the unquantised weight {error:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 11])   # 11: two launches (8 + 3 rows; 6 + 5 at k = 4096)
@pytest.mark.parametrize("k,n", [(3072, 18432), (3072, 9216), (1024, 9216), (16, 77), (4096, 1), (2064, 333)])
def test_modulation_product_reads_the_e4m3_weight_within_an_ulp_of_the_reference(fp8_dense, generator, dtype, kind,
                                                                                  rows, k, n):
    x = make_input(kind, rows, k, dtype, generator)
    w = make_input("student_t", n, k, torch.float32, generator) * 0.02   # a trained layer's scale: fp16 y stays finite
    bias = make_input("randn", 1, n, dtype, generator)[0] if rows % 2 else None
    _check_modulation(x, w, bias)


def test_modulation_product_takes_strided_rows_and_refuses_what_it_cannot_hold(fp8_dense, generator):
    from rt_lynx_pack.kernels import linear_fp8_weight, quantize_weight_fp8
    from rt_lynx_pack.kernels.reference import linear_e4m3_weight_reference
    wide = make_input("cubed", 3, 3072 + 64, torch.bfloat16, generator)
    w = make_input("randn", 6144, 3072, torch.float32, generator)
    _check_modulation(wide[:, :3072], w, None)                          # rows strided past K: read in place
    _check_modulation(wide.view(-1)[1:1 + 2 * 3072].view(2, 3072), w, None)   # misaligned: copied first
    wq, w_scale = quantize_weight_fp8(w)
    many = make_input("randn", 9, 3072, torch.bfloat16, generator)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):   # the op itself; linear_fp8_weight splits them
        torch.ops.rt_lynx.linear_e4m3_weight(many, wq, w_scale, None)
    # Rows longer than shared memory holds: the reference on "auto", an error on "cuda".
    long_x = make_input("randn", 1, 32768, torch.bfloat16, generator)
    long_wq, long_scale = quantize_weight_fp8(make_input("randn", 64, 32768, torch.float32, generator))
    assert torch.equal(linear_fp8_weight(long_x, long_wq, long_scale, None),
                       linear_e4m3_weight_reference(long_x, long_wq, long_scale, None))
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        linear_fp8_weight(long_x, long_wq, long_scale, None, "cuda")


def test_modulation_linear_compiles_without_graph_break_and_takes_the_kernel(fp8_dense, generator):
    from rt_lynx_pack.kernels import quantize_weight_fp8
    from rt_lynx_pack.lynx.linear import fp8_weight_linear
    vec = make_input("randn", 2, 3072, torch.bfloat16, generator)
    w = make_input("randn", 18432, 3072, torch.float32, generator) * 0.02
    b = make_input("randn", 1, 18432, torch.bfloat16, generator)[0]
    wq, w_scale = quantize_weight_fp8(w)
    config = LynxConfig(precision="fp8", backend="cuda")   # "cuda": the reference would raise

    def modulation(t):
        return fp8_weight_linear(F.silu(t), w, b, config, fp8_weight=(wq, w_scale))[:, None, :].chunk(6, dim=-1)

    torch._dynamo.reset()
    compiled = torch.compile(modulation, fullgraph=True)(vec)
    eager = modulation(vec)
    # Inductor may round the SiLU differently from eager (one bf16 ulp of the input).
    assert all(relative_error(c, e) < 1e-2 for c, e in zip(compiled, eager))


# FLUX's and Qwen-Image's weight shapes, odd row counts, the widest rows the pass holds.
WEIGHT_SHAPES = [(21504, 3072), (3072, 15360), (37, 16), (9, 32768), (18432, 3072)]


@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_quantisation_takes_the_quantise_pass_with_the_reference_bits(fp8_dense, generator, monkeypatch,
                                                                             shape, kind, dtype):
    from rt_lynx_pack.kernels import dispatch, quantize_weight_fp8, reference
    weight = make_input(kind, *shape, dtype, generator) * 0.05
    weight[min(1, shape[0] - 1)] = 0   # an all-zero output channel: scale 0, codes 0
    want_q, want_scale = reference.quantize_weight_fp8(weight)

    def not_the_pass(*args, **kwargs):
        raise AssertionError("the reference ran where the quantise pass should have")
    with monkeypatch.context() as patch:
        patch.setattr(dispatch.reference, "quantize_weight_fp8", not_the_pass)
        poison_allocator(weight.numel() + shape[0] * 4)
        wq, w_scale = quantize_weight_fp8(weight)
    assert wq.dtype == torch.float8_e4m3fn and wq.shape == weight.shape and w_scale.shape == (shape[0],)
    assert torch.equal(wq.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(w_scale, want_scale)


def test_weight_quantisation_falls_back_where_the_pass_cannot_read_the_weight(fp8_dense, generator, monkeypatch):
    from rt_lynx_pack.kernels import dispatch, quantize_weight_fp8, reference
    weight = make_input("randn", 64, 3072, torch.bfloat16, generator)
    storage = torch.empty(64 * 3072 + 1, dtype=torch.bfloat16, device="cuda")
    misaligned = storage[1:].view(64, 3072)   # contiguous, 2 bytes off the pass's 16-byte loads
    misaligned.copy_(weight)
    calls = []
    original = reference.quantize_weight_fp8

    def counted(w):
        calls.append(w)
        return original(w)
    monkeypatch.setattr(dispatch.reference, "quantize_weight_fp8", counted)
    cases = {"fp32": (weight.float(), "auto"), "12 columns": (weight[:, :12].contiguous(), "auto"),
             "8 columns": (weight[:, :8].contiguous(), "auto"),
             "misaligned": (misaligned, "auto"), "reference requested": (weight, "reference")}
    for name, (w, requested) in cases.items():
        before = len(calls)
        wq, w_scale = quantize_weight_fp8(w, requested)
        want_q, want_scale = original(w)
        assert len(calls) == before + 1, name
        assert torch.equal(wq.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(w_scale, want_scale), name
