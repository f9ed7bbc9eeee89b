"""GPU tests of the packed GELU of the passes whose output is e4m3 (sm90.packed_e4m3_gelu): the
fp8 quantise pass's GELU tail and the fp8 sparsify pass's GELU prologue.

Tolerances: the packed GELU is within 2% of the value, and |x| 2^-8 where 1 + tanh(u) cancels
(the negative tail), while e4m3 rounds by up to 6%. So its e4m3 outputs must be about as close to
fp32 math on the exact GELU as the fast GELU's are:
- quantise pass, per row of 1024 GELU columns or more: at most 5% more relative error plus 1e-3
  (the row's 16-bit head, quantised alike, carries most of its error);
- the sparse linear after the GELU prologue, per product: the packed GELU's own error adds in
  quadrature to the fast path's, at most 1% of the product in bf16 (its arithmetic rounds to 8
  bits three times; measured 0.7% on an H100: 1.14e-2 against 0.90e-2) and 0.6% in f16;
- elementwise: within the fast GELU's error plus one e4m3 step (2^-3 of the value), 2^-7 |x| and
  two subnormal half-steps of the row's scale.
Passes whose output is 16-bit never take it, and with the fast GELU off torch's bits win.
"""
import pytest
import torch

from rt_lynx_pack.kernels.reference import (cat_gelu_tanh_reference, gelu_tanh_reference, quantize_rows_fp8,
                                            quantize_weight_fp8, sparse_linear_fp8_reference)

from kernel_helpers import DTYPES, make_input, negative_tail, poison_allocator, relative_error, require_fast_path

ERROR_FACTOR, ERROR_MARGIN = 1.05, 1e-3
PACKED_GELU_ERROR = {torch.bfloat16: 1e-2, torch.float16: 6e-3}   # of a product, added in quadrature


@pytest.fixture(scope="module")
def sm90():
    return require_fast_path("sm90")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["randn", "cubed", "student_t", "negative tail"])
@pytest.mark.parametrize("rows,head,tail", [(4608, 3072, 12288), (37, 3072, 64), (1, 16, 16)])
def test_quantise_pass_with_a_packed_gelu_tail_is_as_close_to_fp32_as_the_fast_one(sm90, generator, dtype, kind,
                                                                                    rows, head, tail):
    x = make_input("randn", rows, head, dtype, generator)
    gelu_tail = negative_tail(rows, tail, dtype, generator) if kind == "negative tail" else \
        make_input(kind, rows, tail, dtype, generator)
    want = torch.cat((x.float(), gelu_tanh_reference(gelu_tail.float())), -1)
    inputs = torch.cat((x.float(), gelu_tail.float()), -1)
    with sm90.fast_gelu(True):
        fast_q, fast_a = torch.ops.rt_lynx.quantize_rows_fp8(x, gelu_tail)
        poison_allocator((head + tail) * rows * 2 + rows * 4)
        with sm90.packed_e4m3_gelu(True):
            q, a = torch.ops.rt_lynx.quantize_rows_fp8(x, gelu_tail)
    packed, fast = q.float() * a, fast_q.float() * fast_a
    assert not packed.isnan().any() and not a.isnan().any()
    bound = ((fast - want).abs() + 2**-3 * want.abs() + 2**-7 * inputs.abs() + 2**-8 * a)
    excess = ((packed - want).abs() - bound).max().item()
    assert excess <= 0, f"an element off by {excess:.3g} more than the bound"
    # Rows whose scale the negative tail alone sets are the exception, and tails of a few values,
    # where one rounding more or less is a large part of the row's error.
    if kind != "negative tail" and tail >= 1024:
        norms = want.norm(dim=-1).clamp_min(1e-30)
        packed_error = (packed - want).norm(dim=-1) / norms
        fast_error = (fast - want).norm(dim=-1) / norms
        worst = (packed_error - (fast_error * ERROR_FACTOR + ERROR_MARGIN)).max().item()
        assert worst <= 0, f"a row {worst:.2e} further from fp32 than the fast GELU's allows"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["randn", "cubed", "student_t"])
@pytest.mark.parametrize("rows,k,n", [(4096, 12288, 3072), (512, 12288, 3072), (77, 3072, 1024), (4097, 15360, 3072)])
def test_fp8_gelu_linear_with_the_packed_gelu_is_as_close_to_fp32_as_the_fast_one(sm90, generator, dtype, kind,
                                                                                  rows, k, n):
    x = make_input(kind, rows, k, dtype, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    bias = torch.randn(n, generator=generator, device="cuda").to(dtype)
    wq, w_scale = quantize_weight_fp8(weight.float())
    want = sparse_linear_fp8_reference(gelu_tanh_reference(x.float()), wq, w_scale, bias.float(), True)
    with sm90.fast_gelu(True):
        fast = sm90.sparse_linear_gelu_sm90(x, wq, w_scale, bias, True)
        poison_allocator(x.numel() * 2 + rows * n * 2)
        with sm90.packed_e4m3_gelu(True):
            packed = sm90.sparse_linear_gelu_sm90(x, wq, w_scale, bias, True)
    assert packed.shape == (rows, n) and packed.dtype == dtype and not packed.isnan().any()
    fast_error, packed_error = relative_error(fast, want), relative_error(packed, want)
    assert packed_error ** 2 <= fast_error ** 2 + PACKED_GELU_ERROR[dtype] ** 2, \
        f"{packed_error:.3e} against {fast_error:.3e}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_switch_reaches_both_e4m3_passes(sm90, generator, dtype):
    x = make_input("randn", 64, 3072, dtype, generator)
    gelu_tail = make_input("randn", 64, 12288, dtype, generator)
    with sm90.fast_gelu(True):
        fast = torch.ops.rt_lynx.quantize_rows_fp8(x, gelu_tail)
        fast_compressed, _ = torch.ops.rt_lynx.sparsify_sm90(gelu_tail, 128, True, True, gelu=True)
        with sm90.packed_e4m3_gelu(True):
            packed = torch.ops.rt_lynx.quantize_rows_fp8(x, gelu_tail)
            packed_compressed, _ = torch.ops.rt_lynx.sparsify_sm90(gelu_tail, 128, True, True, gelu=True)
    assert not torch.equal(fast[0].view(torch.uint8), packed[0].view(torch.uint8)), "quantise pass: no change"
    assert not torch.equal(fast_compressed.view(torch.uint8), packed_compressed.view(torch.uint8)), \
        "sparsify pass: no change"


@pytest.mark.parametrize("dtype", DTYPES)
def test_passes_with_16_bit_outputs_keep_the_fast_gelu(sm90, generator, dtype):
    x = make_input("randn", 333, 3072, dtype, generator)
    up = make_input("randn", 333, 12288, dtype, generator)
    weight = (torch.randn(3072, 12288, generator=generator, device="cuda") / 12288 ** 0.5).to(dtype)

    def outputs():
        return (torch.ops.rt_lynx.cat_gelu_tanh(x, up), torch.ops.rt_lynx.sparsify_sm90(up, 64, False, True, gelu=True)[0],
                sm90.sparse_linear_gelu_sm90(up, weight, None, None, True))
    with sm90.fast_gelu(True):
        fast = outputs()
        with sm90.packed_e4m3_gelu(True):
            packed = outputs()
    for name, f, p in zip(("cat_gelu_tanh", "16-bit sparsify pass", "16-bit GELU linear"), fast, packed):
        assert torch.equal(f, p), f"{name} changed with the packed e4m3 GELU"


@pytest.mark.parametrize("dtype", DTYPES)
def test_torchs_bits_win_over_the_packed_gelu(sm90, generator, dtype):
    x = make_input("randn", 37, 3072, dtype, generator)
    gelu_tail = make_input("cubed", 37, 12288, dtype, generator)
    with sm90.fast_gelu(False), sm90.packed_e4m3_gelu(True):
        q, a = torch.ops.rt_lynx.quantize_rows_fp8(x, gelu_tail)
    want_q, want_a = quantize_rows_fp8(cat_gelu_tanh_reference(x, gelu_tail))
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(a, want_a)
