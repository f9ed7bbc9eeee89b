"""GPU tests of the fast path (kernels/cusparselt.py + csrc): every op against the reference.

Skipped without CUDA or on a non-Hopper GPU; on Hopper the fast path must be available.
"""
import pytest
import torch

from rt_lynx_pack.kernels.reference import keep_mask_nm, norm_compensation_scale, sparsify_nm

from kernel_helpers import (DTYPES, FLUX_SHAPES, INPUT_KINDS, QWEN_SHAPES, check_lynx_linear,
                            check_zero_tokens_give_the_bias, decode_compressed, make_input, padded,
                            poison_allocator, relative_error, require_fast_path)

TOLERANCE = 1e-2
ODD_ROWS = [1, 7, 63, 65, 4097]


@pytest.fixture(scope="module")
def fast():
    return require_fast_path()


@pytest.fixture(params=["B", "A"])
def operand(request, fast):
    """Run a test with the activations as cuSPARSELt's structured operand A (the default) and
    as operand B."""
    previous = fast.sparse_operand()
    fast.set_sparse_operand(request.param)
    yield request.param
    fast.set_sparse_operand(previous)



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["randn", "cubed", "student_t", "tied"])
@pytest.mark.parametrize("rows,cols", [(64, 64), (128, 3072), (4096, 3072), (192, 15360)])
def test_compressed_buffer_is_byte_exact_vs_cslt_compress(fast, generator, dtype, kind, rows, cols):
    x = make_input(kind, rows, cols, dtype, generator, no_zeros=True)
    poison_allocator(rows * cols * 2)
    compressed, _ = torch.ops.rt_lynx.sparsify_compress(x, rows)
    expected = torch._cslt_compress(sparsify_nm(x)).reshape(-1)
    assert compressed.numel() == expected.numel()
    assert torch.equal(compressed.view(torch.uint8), expected.view(torch.uint8))


def test_self_test_chose_the_default_operand(fast):
    import os
    want = "B" if os.environ.get("RT_LYNX_SPARSE_OPERAND", "").upper() == "B" else "A"
    available, reason = fast.availability(torch.device("cuda"))
    assert available and f"structured operand {want}" in reason, reason
    assert fast.sparse_operand() == want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("as_b", [True, False])
@pytest.mark.parametrize("rows,cols", [(64, 64), (128, 3072), (4096, 3072), (192, 15360)])
def test_layout_equals_cusparselt_own_compression_per_operand(fast, generator, dtype, as_b, rows,
                                                              cols):
    x = make_input("cubed", rows, cols, dtype, generator, no_zeros=True)
    compressed, _ = torch.ops.rt_lynx.sparsify_compress(x, rows)
    own = fast.extension().compress_reference(sparsify_nm(x), as_b)
    assert own.numel() >= compressed.numel() * 2
    assert torch.equal(compressed.view(torch.uint8), own[: compressed.numel() * 2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("rows", ODD_ROWS + [512, 4096])
def test_scaled_values_are_rounded_scale_times_kept(fast, generator, dtype, kind, rows):
    cols = 3072
    x = make_input(kind, rows, cols, dtype, generator)
    rows_padded = padded(rows)
    poison_allocator(rows_padded * cols * 2)
    compressed, scale = torch.ops.rt_lynx.sparsify_compress_scaled(x, rows_padded)
    plain, plain_scale = torch.ops.rt_lynx.sparsify_compress(x, rows_padded)
    half = rows_padded * cols  # bytes of values
    # Same kept positions (metadata byte-exact) and the same scale as the unscaled mode.
    assert torch.equal(compressed.view(torch.uint8)[half:], plain.view(torch.uint8)[half:])
    torch.testing.assert_close(scale, plain_scale, rtol=1e-6, atol=0)
    kept, values, ordered = decode_compressed(compressed, rows, rows_padded, cols)
    assert bool(ordered.all())
    want_mask = keep_mask_nm(x)
    assert torch.equal(kept, want_mask)
    want_scale = norm_compensation_scale(x, sparsify_nm(x)).squeeze(-1)
    torch.testing.assert_close(scale[:rows], want_scale, rtol=1e-5, atol=0)
    # One fp32 multiply by the kernel's own scale, one rounding: bit-exact.
    want_values = (x[want_mask].view(rows, cols // 2).float() * scale[:rows, None]).to(dtype)
    assert torch.equal(values.view(torch.int16), want_values.view(torch.int16))
    padding = compressed[: rows_padded * cols // 2].view(rows_padded, cols // 2)[rows:]
    assert torch.all(padding == 0), "padding rows must be zero"
    assert torch.all(scale[rows:] == 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(7, 3072), (512, 3072), (512, 12288), (4096, 3072),
                                       (4608, 15360)])
def test_every_split_of_the_sparsify_kernel_gives_the_same_result(fast, generator, dtype, rows,
                                                                   cols):
    x = make_input("student_t", rows, cols, dtype, generator)
    rows_padded = padded(rows)
    half = rows_padded * cols  # bytes of values
    want_mask = keep_mask_nm(x)
    kept_values = x[want_mask].view(rows, cols // 2).float()
    first = None
    for split in (1, 2, 4, 8, 0):
        poison_allocator(rows_padded * cols * 2)
        compressed, scale = torch.ops.rt_lynx.sparsify_compress_scaled(x, rows_padded, split)
        kept, values, _ = decode_compressed(compressed, rows, rows_padded, cols)
        assert torch.equal(kept, want_mask), f"split {split}"
        # The norms are summed in another order per split: the scale may move by an ulp, and
        # the values are then round(x_kept * that scale).
        want_values = (kept_values * scale[:rows, None]).to(dtype)
        assert torch.equal(values.view(torch.int16), want_values.view(torch.int16)), f"split {split}"
        if first is None:
            first = (compressed, scale)
            continue
        assert torch.equal(compressed.view(torch.uint8)[half:], first[0].view(torch.uint8)[half:])
        torch.testing.assert_close(scale, first[1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("rows", ODD_ROWS + [4096])
def test_kept_mask_values_and_scale_match_reference(fast, generator, dtype, kind, rows):
    cols = 3072
    x = make_input(kind, rows, cols, dtype, generator)
    rows_padded = padded(rows)
    poison_allocator(rows_padded * cols * 2)
    compressed, scale = torch.ops.rt_lynx.sparsify_compress(x, rows_padded)
    kept, values, ordered = decode_compressed(compressed, rows, rows_padded, cols)
    assert bool(ordered.all()), "metadata codes must name two distinct positions, lower first"
    want_mask = keep_mask_nm(x)
    assert torch.equal(kept, want_mask)
    want_values = x[want_mask].view(rows, cols // 2)
    assert torch.equal(values.view(torch.int16), want_values.view(torch.int16))
    want_scale = norm_compensation_scale(x, sparsify_nm(x)).squeeze(-1)
    assert not scale.isnan().any(), "scale not fully written"
    torch.testing.assert_close(scale[:rows], want_scale, rtol=1e-5, atol=0)
    assert torch.all(scale[rows:] == 1.0), "padding rows get scale 1"
    zero_rows = (x == 0).all(dim=1)
    assert torch.all(scale[:rows][zero_rows] == 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,k,n", sorted(set(FLUX_SHAPES + QWEN_SHAPES)))
def test_sparse_linear_model_shapes(fast, operand, generator, dtype, rows, k, n):
    x = make_input("randn", rows, k, dtype, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    bias = torch.randn(n, generator=generator, device="cuda").to(dtype)
    check_lynx_linear(fast.sparse_linear, x, weight, bias, True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("rows", ODD_ROWS)
@pytest.mark.parametrize("compensate,bias_kind", [(True, "same"), (False, None), (True, None),
                                                  (False, "fp32")])
def test_sparse_linear_odd_rows_and_input_families(fast, operand, generator, dtype, kind, rows,
                                                   compensate, bias_kind):
    k, n = 3072, 1024
    x = make_input(kind, rows, k, dtype, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    bias = None
    if bias_kind is not None:
        bias = torch.randn(n, generator=generator, device="cuda")
        bias = bias if bias_kind == "fp32" else bias.to(dtype)
    y = check_lynx_linear(fast.sparse_linear, x, weight, bias, compensate)
    check_zero_tokens_give_the_bias(y, x, bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_mm_alone_matches_dense_product(fast, operand, generator, dtype):
    rows, k, n = 4096, 3072, 3072
    x = make_input("cubed", rows, k, dtype, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    compressed, _ = torch.ops.rt_lynx.sparsify_compress(x, rows)
    poison_allocator(rows * n * 2)
    y = torch.ops.rt_lynx.sparse_mm(compressed, weight, rows)
    assert not y.isnan().any()
    want = sparsify_nm(x).float() @ weight.float().t()
    assert relative_error(y, want) < TOLERANCE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [65, 4096])
def test_bias_is_added_per_feature(fast, operand, generator, dtype, rows):
    k, n = 3072, 3072
    x = make_input("randn", rows, k, dtype, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    bias = (torch.randn(n, generator=generator, device="cuda") * 4).to(dtype)
    with_bias = fast.sparse_linear(x, weight, bias, True)
    without = fast.sparse_linear(x, weight, None, True)
    added = with_bias.float() - without.float()
    # Applied per token (the other axis) or not at all, this error would be about 1 or more.
    assert relative_error(added, bias.float().expand(rows, n)) < TOLERANCE


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_bias_tensors_of_one_shape_use_their_own_values(fast, operand, generator, dtype):
    rows, k, n = 256, 3072, 1024
    x = make_input("randn", rows, k, dtype, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    biases = [torch.randn(n, generator=generator, device="cuda").to(dtype) for _ in range(2)]
    for _ in range(2):  # second round: both plans cached
        for bias in biases:
            check_lynx_linear(fast.sparse_linear, x, weight, bias, True)
    bias = biases[0].clone()
    y0 = fast.sparse_linear(x, weight, bias, True)
    old = bias.clone()
    bias.add_(1.0)  # in place: the cached plan must read the new values
    y1 = fast.sparse_linear(x, weight, bias, True)
    want = (bias.float() - old.float()).expand(rows, n)
    assert relative_error(y1.float() - y0.float(), want) < 2e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_epilogue_op_matches_fp32_math(fast, generator, dtype):
    rows, n = 100, 512
    gemm = torch.randn(128, n, generator=generator, device="cuda").to(dtype)
    scale = torch.rand(128, generator=generator, device="cuda") + 0.5
    bias = torch.randn(n, generator=generator, device="cuda")
    y = torch.ops.rt_lynx.scale_bias_epilogue(gemm, scale, bias, rows)
    want = (gemm[:rows].float() * scale[:rows, None] + bias).to(dtype)
    assert torch.equal(y, want)


@pytest.mark.parametrize("rows", [256, 65])
def test_torch_compile_fullgraph_has_no_graph_break(fast, operand, generator, rows):
    k, n = 3072, 3072
    x = make_input("randn", rows, k, torch.bfloat16, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(torch.bfloat16)
    bias = torch.randn(n, generator=generator, device="cuda").to(torch.bfloat16)

    def block(t):
        h = fast.sparse_linear(torch.nn.functional.gelu(t), weight, bias, True)
        return h * 0.5 + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    got = compiled(x)
    want = block(x)
    assert relative_error(got, want) < 1e-3


def test_cuda_graph_replay_matches_eager(fast, operand, generator):
    rows, k, n = 512, 3072, 9216
    x = make_input("randn", rows, k, torch.bfloat16, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(torch.bfloat16)
    bias = torch.randn(n, generator=generator, device="cuda").to(torch.bfloat16)
    want = fast.sparse_linear(x, weight, bias, True)  # builds the plan outside capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fast.sparse_linear(x, weight, bias, True)
        with torch.cuda.graph(graph, stream=stream):
            out = fast.sparse_linear(x, weight, bias, True)
    torch.cuda.current_stream().wait_stream(stream)
    x.copy_(make_input("randn", rows, k, torch.bfloat16, generator))
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(out, fast.sparse_linear(x, weight, bias, True)) < 1e-3
    assert relative_error(out, want) > 1e-1  # the replay really read the new input


def test_bad_inputs_give_clear_errors(fast, generator):
    x = make_input("randn", 16, 96, torch.bfloat16, generator)
    weight = torch.randn(64, 96, device="cuda", dtype=torch.bfloat16)
    ok, reason = fast.supports(x, weight)
    assert not ok and "multiple of 64" in reason
    with pytest.raises(RuntimeError, match="multiple of 64"):
        fast.sparse_linear(x, weight, None, True)
    x = make_input("randn", 16, 128, torch.bfloat16, generator)
    weight = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    ok, reason = fast.supports(x, weight)
    assert not ok and "dtype" in reason
    with pytest.raises(RuntimeError, match="dtype"):
        fast.sparse_linear(x, weight, None, True)
    ok, reason = fast.supports(x, weight.to(torch.bfloat16)[:, :64])
    assert not ok
    ok, reason = fast.supports(x, torch.randn(40, 128, device="cuda", dtype=torch.bfloat16))
    assert not ok and "multiple of 16" in reason
    ok, _ = fast.supports(x, torch.randn(64, 128, device="cuda", dtype=torch.bfloat16))
    assert ok


def test_strided_rows_give_the_same_result(fast, generator):
    base = make_input("randn", 64, 3072 * 2, torch.bfloat16, generator)
    x = base[:, 3072:]  # row stride 6144: the kernel reads it in place
    weight = (torch.randn(512, 3072, generator=generator, device="cuda") / 3072 ** 0.5).to(torch.bfloat16)
    assert not fast.supports(x, weight)[0]
    check_lynx_linear(fast.sparse_linear, x, weight, None, True)
