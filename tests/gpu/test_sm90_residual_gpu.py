"""GPU tests of the gated residual in the sm90 sparse GEMM's epilogue (out = residual + gate * the
product, csrc/sm90_sparse_gemm_impl.cuh's residual instances): every config against fp32 math on the
same sparsified (and quantised) input, at least as close as the product followed by torch's addcmul,
over poisoned outputs, odd rows, heavy tails, bf16/fp16/e4m3; the ops a block calls (plain, fp8,
GELU prologue, LoRA in the GEMM) at FLUX shapes; the dispatch (one image fused, several added
after, the switch off giving the unfused bits); torch.compile and CUDA graphs; refusals. And the
same for the dense e4m3 GEMM of the layers an fp8 model keeps dense (cuBLASLt with C, FLUX's linear2).
"""
import pytest
import torch

from rt_lynx_pack.kernels import GatedResidual, dispatch
from rt_lynx_pack.kernels.reference import (gelu_tanh_reference, quantize_weight_fp8, sparse_linear_fp8_reference,
                                            sparse_linear_reference)

from kernel_helpers import (DTYPES, fp32_lynx, make_input, padded, poison_allocator, relative_error,
                            require_fast_path)

TOLERANCE = 1e-2
ODD_ROWS = [1, 7, 63, 65, 100, 4097]
E4M3 = torch.float8_e4m3fn
# Rounding once (fused) is at least as close to fp32 math as rounding y, then the sum (unfused).
SLACK = 1.05


@pytest.fixture(scope="module")
def sm90():
    return require_fast_path("sm90")


def _residual_and_gate(generator, rows, n, dtype, scale):
    """A residual as large as the product (scale: its norm per row) and a gate of either sign."""
    residual = (make_input("randn", rows, n, torch.float32, generator) * scale).to(dtype)
    gate = (torch.randn(n, generator=generator, device="cuda") * 0.7).to(dtype)
    return residual, gate


def _check_against_unfused(out, unfused, want, residual, residual_before, name=""):
    assert not out.isnan().any(), f"{name}: output not fully written (poisoned NaN left)"
    assert torch.equal(residual, residual_before), f"{name}: the residual was written"
    error, error_unfused = relative_error(out, want), relative_error(unfused, want)
    assert error < TOLERANCE, f"{name}: {error:.2e} from fp32 math"
    assert error <= error_unfused * SLACK + 1e-4, f"{name}: {error:.2e} against the unfused {error_unfused:.2e}"
    # The product's share of the output must matter, or an epilogue that dropped it would pass.
    assert relative_error(residual, want) > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ODD_ROWS)
@pytest.mark.parametrize("with_gate,with_bias", [(True, True), (False, True), (True, False)])
def test_every_16_bit_residual_config_matches_fp32_math(sm90, generator, dtype, rows, with_gate, with_bias):
    k, n = 1024, 528   # N not a multiple of any tile
    x = make_input("cubed", rows, k, dtype, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    bias = torch.randn(n, generator=generator, device="cuda").to(dtype) if with_bias else None
    product = fp32_lynx(x, weight, bias, True)
    residual, gate = _residual_and_gate(generator, rows, n, dtype, product.norm().item() / (rows * n) ** 0.5)
    gate = gate if with_gate else None
    want = residual.float() + (1.0 if gate is None else gate.float()) * product
    before = residual.clone()
    for _, _, _, block, index, name in sm90.config_info(dtype):
        buffer, scale = torch.ops.rt_lynx.sparsify_sm90(x, block, False, True)
        plain = torch.ops.rt_lynx.sparse_mm_sm90(buffer, weight, scale, None, bias, rows, index, dtype)
        unfused = residual + plain if gate is None else torch.addcmul(residual, gate, plain)
        poison_allocator(rows * n * 2)
        out = torch.ops.rt_lynx.sparse_mm_sm90(buffer, weight, scale, None, bias, rows, index, dtype, residual, gate)
        assert out.shape == (rows, n) and out.dtype == dtype
        _check_against_unfused(out, unfused, want, residual, before, name)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("rows", ODD_ROWS)
@pytest.mark.parametrize("k", [1024, 1152])   # 1152: ends mid-way through the 256-column e4m3 tiles
def test_every_e4m3_residual_config_matches_fp32_math(sm90, generator, out_dtype, rows, k):
    n = 544
    x = make_input("student_t", rows, k, out_dtype, generator)
    weight = torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5
    wq, w_scale = quantize_weight_fp8(weight)
    bias = torch.randn(n, generator=generator, device="cuda").to(out_dtype)
    product = sparse_linear_fp8_reference(x.float(), wq, w_scale, bias.float(), True)
    residual, gate = _residual_and_gate(generator, rows, n, out_dtype, product.norm().item() / (rows * n) ** 0.5)
    want = residual.float() + gate.float() * product
    before = residual.clone()
    for _, _, _, block, index, name in sm90.config_info(E4M3):
        buffer, a = torch.ops.rt_lynx.sparsify_sm90(x, block, True, True)
        plain = torch.ops.rt_lynx.sparse_mm_sm90(buffer, wq, a, w_scale, bias, rows, index, out_dtype)
        poison_allocator(rows * n * 2)
        out = torch.ops.rt_lynx.sparse_mm_sm90(buffer, wq, a, w_scale, bias, rows, index, out_dtype, residual, gate)
        _check_against_unfused(out, torch.addcmul(residual, gate, plain), want, residual, before, name)


FLUX_DOUBLE = [(4096, 3072), (4096, 12288), (512, 3072), (512, 12288)]   # (tokens, K) -> 3072


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("rows,k", FLUX_DOUBLE + [(100, 3072)])
@pytest.mark.parametrize("gelu", [False, True])
def test_block_ops_with_a_residual_match_the_op_then_addcmul(sm90, generator, dtype, precision, rows, k, gelu):
    n = 3072
    x = make_input("randn", rows, k, dtype, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    bias = torch.randn(n, generator=generator, device="cuda").to(dtype)
    prepared = gelu_tanh_reference(x.float()) if gelu else x.float()
    if precision == "fp8":
        wq, w_scale = quantize_weight_fp8(weight)
        args = (wq, w_scale, bias, True)
        op = sm90.sparse_linear_gelu_sm90 if gelu else sm90.sparse_linear_fp8_sm90
        product = sparse_linear_fp8_reference(prepared, wq, w_scale, bias.float(), True)
    else:
        args = (weight, None, bias, True) if gelu else (weight, bias, True)
        op = sm90.sparse_linear_gelu_sm90 if gelu else sm90.sparse_linear_sm90
        product = sparse_linear_reference(prepared, weight.float(), bias.float(), True)
    residual, gate = _residual_and_gate(generator, rows, n, dtype, product.norm().item() / (rows * n) ** 0.5)
    before = residual.clone()
    unfused = torch.addcmul(residual, gate, op(x, *args))
    poison_allocator((padded(rows) * k + rows * n * 2) * 2)
    out = op(x, *args, residual=residual, gate=gate)
    assert out.shape == (rows, n) and out.dtype == dtype and out.stride() == (n, 1)
    # fp8: the GELU's input is quantised after the kernels' GELU, the reference's after torch's.
    want = residual.float() + gate.float() * product
    _check_against_unfused(out, unfused, want, residual, before, f"{precision} gelu={gelu}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 100, 4096])
def test_a_lora_in_the_gemm_and_a_residual_together(sm90, generator, dtype, rows):
    k, n, rank = 3072, 3072, 32
    x = make_input("cubed", rows, k, dtype, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    bias = torch.randn(n, generator=generator, device="cuda").to(dtype)
    down = (torch.randn(rank, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    up = torch.randn(n, rank, generator=generator, device="cuda").to(dtype) * 0.3
    up_ext = sm90.k_extension_up(up, 1.0)
    product = fp32_lynx(x, weight, bias, True) + (x.float() @ down.float().t()) @ up.float().t()
    residual, gate = _residual_and_gate(generator, rows, n, dtype, product.norm().item() / (rows * n) ** 0.5)
    before = residual.clone()
    unfused = torch.addcmul(residual, gate, sm90.sparse_linear_lora_sm90(x, weight, bias, True, down, up_ext))
    out = sm90.sparse_linear_lora_sm90(x, weight, bias, True, down, up_ext, residual=residual, gate=gate)
    _check_against_unfused(out, unfused, residual.float() + gate.float() * product, residual, before)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("images", [1, 2])
def test_dispatch_fuses_one_image_and_adds_several_after(sm90, generator, precision, images):
    dtype, tokens, k, n = torch.bfloat16, 512, 3072, 3072
    x = make_input("randn", images * tokens, k, dtype, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    residual = make_input("randn", images * tokens, n, dtype, generator).reshape(images, tokens, n)
    gate = (torch.randn(images, 1, n, generator=generator, device="cuda") * 0.5).to(dtype)
    gated = GatedResidual(residual, gate)
    if precision == "fp8":
        wq, w_scale = quantize_weight_fp8(weight)
        run = lambda **kw: dispatch.sparse_linear_fp8(x, wq, w_scale, None, True, "cuda", **kw)  # noqa: E731
    else:
        run = lambda **kw: dispatch.sparse_linear(x, weight, None, True, "cuda", **kw)  # noqa: E731
    unfused = torch.addcmul(residual, gate, run().reshape(images, tokens, n)).reshape(-1, n)
    with dispatch.residual_epilogue(False):
        assert torch.equal(run(residual=gated), unfused), "switched off, the residual is the addcmul after"
    out = run(residual=gated)
    if images == 1:
        assert not torch.equal(out, unfused), "one image: the epilogue adds it (one rounding fewer)"
        assert relative_error(out, unfused) < TOLERANCE
    else:
        assert torch.equal(out, unfused), "a gate per image: added after the product"


def test_residual_op_under_torch_compile_and_cuda_graphs(sm90, generator):
    dtype, rows, k, n = torch.bfloat16, 300, 3072, 1024
    x = make_input("randn", rows, k, dtype, generator)
    wq, w_scale = quantize_weight_fp8(torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5)
    residual, gate = _residual_and_gate(generator, rows, n, dtype, 1.0)
    eager = sm90.sparse_linear_fp8_sm90(x, wq, w_scale, None, True, residual, gate)
    compiled = torch.compile(lambda a, r: torch.ops.rt_lynx.sparse_linear_fp8_sm90(a, wq, w_scale, None, True, r,
                                                                                    gate) * 2, fullgraph=True)
    assert torch.equal(compiled(x, residual), eager * 2)
    static_x, static_residual = x.clone(), residual.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = sm90.sparse_linear_fp8_sm90(static_x, wq, w_scale, None, True, static_residual, gate)
    fresh_x = make_input("cubed", rows, k, dtype, generator)
    fresh_residual, _ = _residual_and_gate(generator, rows, n, dtype, 1.0)
    static_x.copy_(fresh_x)
    static_residual.copy_(fresh_residual)
    graph.replay()
    torch.testing.assert_close(static_out, sm90.sparse_linear_fp8_sm90(fresh_x, wq, w_scale, None, True,
                                                                       fresh_residual, gate), rtol=0, atol=0)


def test_bad_residuals_are_refused_with_a_reason(sm90, generator):
    dtype, rows, k, n = torch.bfloat16, 64, 1024, 256
    x = make_input("randn", rows, k, dtype, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    residual, gate = _residual_and_gate(generator, rows, n, dtype, 1.0)
    with pytest.raises(RuntimeError, match="gate is given only with a residual"):
        sm90.sparse_linear_sm90(x, weight, None, True, None, gate)
    with pytest.raises(RuntimeError, match="residual must be 64 x 256"):
        sm90.sparse_linear_sm90(x, weight, None, True, residual[:, :128], gate)
    with pytest.raises(RuntimeError, match="residual must be"):
        sm90.sparse_linear_sm90(x, weight, None, True, residual.half(), gate)
    with pytest.raises(RuntimeError, match="gate must hold 256 values"):
        sm90.sparse_linear_sm90(x, weight, None, True, residual, gate.repeat(2))
    # A strided or misaligned residual is copied first: the same result as a contiguous one.
    wide = torch.zeros(rows, n + 8, dtype=dtype, device="cuda")
    wide[:, 1:n + 1] = residual
    torch.testing.assert_close(sm90.sparse_linear_sm90(x, weight, None, True, wide[:, 1:n + 1], gate),
                               sm90.sparse_linear_sm90(x, weight, None, True, residual, gate), rtol=0, atol=0)


# ---- the dense e4m3 GEMM (layers an fp8 model keeps dense: FLUX's linear2) with a residual ----

@pytest.fixture(scope="module")
def fp8_dense():
    module = require_fast_path("fp8_dense")
    available, reason = module.availability_residual_epilogue(torch.device("cuda"))
    assert available, f"the dense e4m3 GEMM with a residual is unavailable on a Hopper GPU: {reason}"
    return module


@pytest.mark.parametrize("rows", ODD_ROWS + [4608])
@pytest.mark.parametrize("with_tail,with_bias", [(True, True), (False, True), (True, False)])
def test_dense_e4m3_gemm_with_a_residual_matches_fp32_math(fp8_dense, generator, rows, with_tail, with_bias):
    from rt_lynx_pack.kernels.reference import cat_gelu_tanh_reference, dense_linear_fp8_reference
    k_head, k_tail, n, dtype = 3072, 12288, 3072, torch.bfloat16   # FLUX's single-block linear2
    x = make_input("randn", rows, k_head, dtype, generator)
    tail = make_input("cubed", rows, k_tail, dtype, generator) if with_tail else None
    weight = torch.randn(n, k_head + (k_tail if with_tail else 0), generator=generator, device="cuda")
    wq, w_scale = quantize_weight_fp8(weight / weight.shape[1] ** 0.5)
    bias = torch.randn(n, generator=generator, device="cuda").to(dtype) if with_bias else None
    joined = cat_gelu_tanh_reference(x, tail) if with_tail else x
    product = dense_linear_fp8_reference(joined.float(), wq, w_scale, None if bias is None else bias.float())
    residual, gate = _residual_and_gate(generator, rows, n, dtype, product.norm().item() / (rows * n) ** 0.5)
    before = residual.clone()
    unfused = torch.addcmul(residual, gate, fp8_dense.dense_linear_fp8(x, wq, w_scale, bias, tail))
    poison_allocator(rows * n * 2 + (32 << 20))
    out = fp8_dense.dense_linear_fp8(x, wq, w_scale, bias, tail, residual=residual, gate=gate)
    assert out.shape == (rows, n) and out.dtype == dtype
    _check_against_unfused(out, unfused, residual.float() + gate.float() * product, residual, before)


@pytest.mark.parametrize("images", [1, 2])
def test_dense_dispatch_fuses_one_image_and_adds_several_after(fp8_dense, generator, images):
    dtype, tokens, k, n = torch.bfloat16, 300, 3072, 1024
    x = make_input("randn", images * tokens, k, dtype, generator)
    wq, w_scale = quantize_weight_fp8(torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5)
    residual = make_input("randn", images * tokens, n, dtype, generator).reshape(images, tokens, n)
    gate = (torch.randn(images, 1, n, generator=generator, device="cuda") * 0.5).to(dtype)
    run = lambda **kw: dispatch.dense_linear_fp8(x, wq, w_scale, None, "cuda", **kw)  # noqa: E731
    unfused = torch.addcmul(residual, gate, run().reshape(images, tokens, n)).reshape(-1, n)
    with dispatch.residual_epilogue(False):
        assert torch.equal(run(residual=GatedResidual(residual, gate)), unfused)
    out = run(residual=GatedResidual(residual, gate))
    if images == 1:
        assert not torch.equal(out, unfused) and relative_error(out, unfused) < TOLERANCE
    else:
        assert torch.equal(out, unfused)


def test_dense_residual_op_in_a_cuda_graph(fp8_dense, generator):
    dtype, rows, k, n = torch.bfloat16, 4608, 15360, 3072
    x = make_input("randn", rows, k, dtype, generator)
    wq, w_scale = quantize_weight_fp8(torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5)
    residual, gate = _residual_and_gate(generator, rows, n, dtype, 1.0)
    static_x, static_residual = x.clone(), residual.clone()
    fp8_dense.dense_linear_fp8(static_x, wq, w_scale, None, residual=static_residual, gate=gate)   # the algo chosen
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fp8_dense.dense_linear_fp8(static_x, wq, w_scale, None, residual=static_residual, gate=gate)
    fresh_x = make_input("cubed", rows, k, dtype, generator)
    fresh_residual, _ = _residual_and_gate(generator, rows, n, dtype, 1.0)
    static_x.copy_(fresh_x)
    static_residual.copy_(fresh_residual)
    graph.replay()
    torch.testing.assert_close(static_out, fp8_dense.dense_linear_fp8(fresh_x, wq, w_scale, None,
                                                                      residual=fresh_residual, gate=gate),
                               rtol=0, atol=0)
