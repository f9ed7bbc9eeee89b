"""GPU tests of the producer fusion: the elementwise work that produces a linear's input computed
inside the sm90 sparsify pass, a DiT block's LayerNorm + modulation (rt_lynx::sparse_linear_
modulated_sm90) and an MLP's GELU (rt_lynx::sparse_linear_gelu_sm90), and rt_lynx::sparsify_sm90
with either prologue; and both with a Lynx LoRA branch of the prepared input, in the fused down
pass (its LayerNorm statistics from a row-statistics kernel first).

The pass must select, scale and quantise exactly what the plain pass makes of the reference's
rows (kernels/reference.py: modulated_layer_norm_reference, gelu_tanh_reference), up to the
few outputs that round the other way (the LayerNorm's statistics summed in another order than
torch's, tanh from another library); and the products must match fp32 math on the reference's
input. Inputs: fresh random and heavy-tailed families with a per-token offset and gain (a
residual stream), odd token counts, 1-3 images, rows up to the longest the pass holds, outputs
over NaN-poisoned memory.
"""
import pytest
import torch

from rt_lynx_pack.kernels import dispatch
from rt_lynx_pack.kernels.reference import (LowRankOperands, gelu_tanh_reference, low_rank_reference,
                                            modulated_layer_norm_reference, quantize_weight_fp8,
                                            sparse_linear_fp8_reference, sparse_linear_reference)

from kernel_helpers import (DTYPES, INPUT_KINDS, make_input, negative_tail, poison_allocator, relative_error,
                            require_fast_path)

EPS = 1e-6   # FLUX's and Qwen-Image's LayerNorms
TOLERANCE = 1e-2
# Prologue outputs rounded the other way than torch rounds them change a kept value by one ulp,
# rarely which value is kept.
DIFFERING_BYTES = 1e-3
# A token's scale comes from its largest kept value and its norms: one of those rounded the other way
# moves that token's scale by up to one ulp of the input dtype, and only a few tokens' scales move so
# far (beyond SUMMATION_NOISE: fp32 sums in another order move many scales by a few fp32 ulps).
DIFFERING_SCALES = 2e-2
SUMMATION_NOISE = 1e-5


def assert_scales_match(got_scale, want_scale, dtype):
    assert not got_scale.isnan().any()
    moved = (got_scale - want_scale).abs() / want_scale.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert moved.max().item() <= torch.finfo(dtype).eps + SUMMATION_NOISE, \
        f"a token's scale moved by {moved.max().item():.2e}"
    share = (moved > SUMMATION_NOISE).float().mean().item()
    assert share <= max(DIFFERING_SCALES, 1 / moved.numel()), f"{share:.2e} of the token scales moved"


@pytest.fixture(scope="module")
def sm90():
    return require_fast_path("sm90")


def modulated_case(kind, images, tokens, k, dtype, generator):
    """x (images * tokens) x k as a residual stream (a family's values times a per-token gain plus
    a per-token offset, which the normalisation must remove), shift and 1 + scale per image."""
    rows = images * tokens
    x = make_input(kind, rows, k, dtype, generator).float()
    gain = torch.rand(rows, 1, generator=generator, device="cuda") * 4 + 0.25
    offset = torch.randn(rows, 1, generator=generator, device="cuda") * 2
    x = (x * gain + offset).to(dtype)
    shift = torch.randn(images, k, generator=generator, device="cuda").to(dtype)
    scale1p = (1 + torch.randn(images, k, generator=generator, device="cuda") / 4).to(dtype)
    return x, shift, scale1p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("images,tokens,k", [(1, 77, 3072), (2, 333, 3072), (3, 64, 128), (1, 100, 15360),
                                             (2, 40, 16384)])
@pytest.mark.parametrize("e4m3,block", [(False, 64), (False, 128), (True, 128)])
@pytest.mark.parametrize("prologue", ["modulation", "gelu"])
def test_prologue_pass_writes_what_the_plain_pass_makes_of_the_reference_rows(sm90, generator, dtype, kind, images,
                                                                              tokens, k, e4m3, block, prologue):
    x, shift, scale1p = modulated_case(kind, images, tokens, k, dtype, generator)
    if prologue == "gelu":
        rows, args = gelu_tanh_reference(x), dict(gelu=True)
    else:
        rows, args = modulated_layer_norm_reference(x, shift, scale1p, tokens, EPS), (shift, scale1p, tokens, EPS)
    want, want_scale = torch.ops.rt_lynx.sparsify_sm90(rows, block, e4m3, True)
    poison_allocator(want.numel() * want.element_size() + want_scale.numel() * 4)
    if prologue == "gelu":
        got, got_scale = torch.ops.rt_lynx.sparsify_sm90(x, block, e4m3, True, **args)
    else:
        got, got_scale = torch.ops.rt_lynx.sparsify_sm90(x, block, e4m3, True, *args)
    assert got.shape == want.shape and got_scale.shape == want_scale.shape
    differing = (got.view(torch.uint8) != want.view(torch.uint8)).float().mean().item()
    assert differing < DIFFERING_BYTES, f"{differing:.2e} of the compressed bytes differ"
    assert_scales_match(got_scale, want_scale, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("images,tokens,k,n", [(1, 4096, 3072, 9216), (2, 4096, 3072, 3072), (1, 4608, 3072, 21504),
                                               (3, 77, 3072, 12288), (2, 512, 3072, 3072), (1, 300, 128, 64)])
def test_modulated_linear_matches_fp32_math_on_the_modulated_input(sm90, generator, dtype, precision, images, tokens,
                                                                   k, n):
    x, shift, scale1p = modulated_case("student_t", images, tokens, k, dtype, generator)
    rows = modulated_layer_norm_reference(x, shift, scale1p, tokens, EPS)
    check_prologue_linear(generator, x, rows, dtype, precision, n,
                          lambda w, s, b: sm90.sparse_linear_modulated_sm90(x, shift, scale1p, tokens, EPS, w, s, b, True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("rows,k,n", [(4096, 12288, 3072), (8192, 12288, 3072), (512, 12288, 3072), (77, 3072, 1024),
                                      (4097, 15360, 3072)])
@pytest.mark.parametrize("fast", [False, True])
def test_gelu_linear_matches_fp32_math_on_the_activation(sm90, generator, dtype, precision, rows, k, n, fast):
    x, _, _ = modulated_case("randn", 1, rows, k, dtype, generator)
    with sm90.fast_gelu(fast):
        check_prologue_linear(generator, x, gelu_tanh_reference(x), dtype, precision, n,
                              lambda w, s, b: sm90.sparse_linear_gelu_sm90(x, w, s, b, True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["randn", "cubed", "negative tail"])
@pytest.mark.parametrize("images,tokens,k", [(2, 333, 3072), (1, 100, 15360), (3, 64, 128)])
@pytest.mark.parametrize("e4m3,block", [(False, 64), (False, 128), (True, 128)])
def test_fast_gelu_prologue_pass_writes_what_the_plain_pass_makes_of_the_fast_gelu_rows(sm90, generator, dtype, kind,
                                                                                       images, tokens, k, e4m3, block):
    # The fast GELU (within an ulp of torch's, test_block_ops_gpu) is the one device function both
    # passes use: the prologue pass must select and compress as the plain pass does on its rows.
    if kind == "negative tail":
        x = negative_tail(images * tokens, k, dtype, generator)
    else:
        x, _, _ = modulated_case(kind, images, tokens, k, dtype, generator)
    with sm90.fast_gelu(True):
        rows = torch.ops.rt_lynx.cat_gelu_tanh(x[:, :8], x)[:, 8:].contiguous()
        want, want_scale = torch.ops.rt_lynx.sparsify_sm90(rows, block, e4m3, True)
        poison_allocator(want.numel() * want.element_size() + want_scale.numel() * 4)
        got, got_scale = torch.ops.rt_lynx.sparsify_sm90(x, block, e4m3, True, gelu=True)
    differing = (got.view(torch.uint8) != want.view(torch.uint8)).float().mean().item()
    assert differing < DIFFERING_BYTES, f"{differing:.2e} of the compressed bytes differ"
    assert_scales_match(got_scale, want_scale, dtype)
    if kind == "negative tail":   # where the two GELUs part: the switch reached this pass
        exact, _ = torch.ops.rt_lynx.sparsify_sm90(x, block, e4m3, True, gelu=True)
        parted = (exact.view(torch.uint8) != got.view(torch.uint8)).float().mean().item()
        assert parted > 0.01, f"only {parted:.2e} of the bytes differ from the exact GELU's"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("images,tokens,k,n,rank", [(1, 4096, 12288, 3072, 32), (2, 33, 384, 256, 8)])
def test_fast_gelu_prologue_with_a_low_rank_branch_matches_fp32_math(sm90, generator, dtype, images, tokens, k, n,
                                                                     rank):
    # The fused down pass applies the GELU to its own tiles (prologue_on_tile): the switch reaches it too.
    x, _, _ = modulated_case("randn", images, tokens, k, dtype, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    down, up = branch_case(generator, x.shape[0], weight.shape, rank, dtype)
    rows = gelu_tanh_reference(x).float()
    want = sparse_linear_reference(rows, weight.float(), None, True) + low_rank_reference(
        rows, LowRankOperands(down.float(), up.float(), 0.5))
    up_ext = sm90.k_extension_up(up, 0.5)
    with sm90.fast_gelu(True):
        y = sm90.sparse_linear_gelu_sm90(x, weight, None, None, True, down, up_ext)
    assert not y.isnan().any() and relative_error(y, want) < TOLERANCE
    tail = negative_tail(x.shape[0], k, dtype, generator)   # where the two GELUs part
    with sm90.fast_gelu(True):
        fast = sm90.sparse_linear_gelu_sm90(tail, weight, None, None, True, down, up_ext)
    exact = sm90.sparse_linear_gelu_sm90(tail, weight, None, None, True, down, up_ext)
    assert not torch.equal(fast, exact), "the fused down pass did not get the fast GELU switch"


def check_prologue_linear(generator, x, rows, dtype, precision, n, fused):
    """fused(weight, w_scale, bias) into poisoned memory against fp32 math on the reference rows."""
    k = x.shape[1]
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    bias = torch.randn(n, generator=generator, device="cuda").to(dtype)
    rows = rows.float()
    if precision == "fp8":
        wq, w_scale = quantize_weight_fp8(weight.float())
        want = sparse_linear_fp8_reference(rows, wq, w_scale, bias.float(), True)
    else:
        wq, w_scale = weight, None
        want = sparse_linear_reference(rows, weight.float(), bias.float(), True)
    poison_allocator(x.numel() * 2 + x.shape[0] * n * 2)
    y = fused(wq, w_scale, bias)
    assert y.shape == (x.shape[0], n) and y.dtype == dtype and not y.isnan().any()
    assert relative_error(y, want) < TOLERANCE


def test_dispatch_fuses_strided_inputs_and_falls_back_past_the_longest_row(sm90, generator):
    # Both prologues share the pass; the modulated one has the more arguments to get wrong.
    dtype, images, tokens = torch.bfloat16, 2, 100
    wide, shift, scale1p = modulated_case("cubed", images, tokens, 3072 + 128, dtype, generator)
    x = wide[:, :3072]   # rows 3200 elements apart
    shift, scale1p = shift[:, :3072], scale1p[:, :3072]
    weight = (torch.randn(1024, 3072, generator=generator, device="cuda") / 3072 ** 0.5).to(dtype)
    fused = dispatch.sparse_linear_modulated(x, shift, scale1p, tokens, EPS, weight, None, True)
    unfused = dispatch.sparse_linear(modulated_layer_norm_reference(x, shift, scale1p, tokens, EPS), weight, None, True)
    assert relative_error(fused, unfused) < TOLERANCE

    longest = 16384   # 256 threads x 4 units of 16 columns, the staged pass
    extension = sm90._cusparselt.extension()
    assert extension.sparsify_prologue_supported(64, longest)
    assert not extension.sparsify_prologue_supported(64, longest + 128)
    k = longest + 128
    x, shift, scale1p = modulated_case("randn", 1, 64, k, dtype, generator)
    weight = (torch.randn(256, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    with pytest.raises(RuntimeError, match="too long for a sparsify pass with a prologue"):
        sm90.sparse_linear_modulated_sm90(x, shift, scale1p, 64, EPS, weight, None, None, True)
    with pytest.raises(RuntimeError, match="too long for a sparsify pass with a prologue"):
        sm90.sparse_linear_gelu_sm90(x, weight, None, None, True)
    fallback = dispatch.sparse_linear_modulated(x, shift, scale1p, 64, EPS, weight, None, True)
    want = sparse_linear_reference(modulated_layer_norm_reference(x, shift, scale1p, 64, EPS).float(),
                                   weight.float(), None, True)
    assert relative_error(fallback, want) < TOLERANCE
    gelu_fallback = dispatch.sparse_linear_gelu(x, weight, None, True)
    want = sparse_linear_reference(gelu_tanh_reference(x).float(), weight.float(), None, True)
    assert relative_error(gelu_fallback, want) < TOLERANCE


def test_prologue_linears_compile_without_graph_breaks(sm90, generator):
    dtype, tokens = torch.bfloat16, 300
    x, shift, scale1p = modulated_case("randn", 2, tokens, 3072, dtype, generator)
    weight = (torch.randn(1024, 3072, generator=generator, device="cuda") / 3072 ** 0.5).to(dtype)

    def both(a):
        return (dispatch.sparse_linear_modulated(a, shift, scale1p, tokens, EPS, weight, None, True) * 2,
                dispatch.sparse_linear_gelu(a, weight, None, True) * 2)
    compiled = torch.compile(both, fullgraph=True)(x)
    for got, want in zip(compiled, both(x)):
        assert torch.equal(got, want)


def branch_case(generator, rows, weight_shape, rank, dtype):
    """down (rank x K) and up (N x rank) of a Lynx LoRA branch."""
    n, k = weight_shape
    down = (torch.randn(rank, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    up = torch.randn(n, rank, generator=generator, device="cuda").to(dtype)
    return down, up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["randn", "student_t", "zero_rows"])
@pytest.mark.parametrize("prologue", ["modulation", "gelu"])
@pytest.mark.parametrize("images,tokens,k,n,rank", [(1, 4096, 3072, 9216, 32), (2, 333, 3072, 3072, 5),
                                                    (3, 65, 256, 128, 1), (1, 512, 12288, 3072, 16),
                                                    (1, 7, 3072, 1024, 31), (2, 33, 384, 256, 8)])
@pytest.mark.parametrize("compensate", [True, False])
def test_prologue_with_a_low_rank_branch_matches_fp32_math(sm90, generator, dtype, kind, prologue, images, tokens, k,
                                                           n, rank, compensate):
    x, shift, scale1p = modulated_case(kind, images, tokens, k, dtype, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    bias = torch.randn(n, generator=generator, device="cuda").to(dtype)
    down, up = branch_case(generator, x.shape[0], weight.shape, rank, dtype)
    if prologue == "gelu":
        rows = gelu_tanh_reference(x)
        fused = lambda up_ext: sm90.sparse_linear_gelu_sm90(x, weight, None, bias, compensate, down, up_ext)  # noqa: E731
    else:
        rows = modulated_layer_norm_reference(x, shift, scale1p, tokens, EPS)
        fused = lambda up_ext: sm90.sparse_linear_modulated_sm90(  # noqa: E731
            x, shift, scale1p, tokens, EPS, weight, None, bias, compensate, down, up_ext)
    lynx = sparse_linear_reference(rows.float(), weight.float(), bias.float(), compensate)
    unscaled = low_rank_reference(rows.float(), LowRankOperands(down.float(), up.float(), 1.0))
    scale = (lynx.norm() / unscaled.norm().clamp_min(1e-6)).item()
    want = lynx + low_rank_reference(rows.float(), LowRankOperands(down.float(), up.float(), scale))
    on_raw_x = lynx + low_rank_reference(x.float(), LowRankOperands(down.float(), up.float(), scale))
    # The branch taken of the raw x must fail the check below (heavy-tailed rows through a GELU can
    # bring it within 0.065 of the wanted output: a margin over the tolerance, not a fixed 0.1).
    assert relative_error(on_raw_x, want) > 3 * TOLERANCE, "test setup: the branch of the raw x must differ"
    poison_allocator(x.numel() * 4 + x.shape[0] * n * 2)
    y = fused(sm90.k_extension_up(up, scale))
    assert y.shape == (x.shape[0], n) and y.dtype == dtype and not y.isnan().any()
    assert relative_error(y, want) < TOLERANCE


def test_dispatch_takes_a_branch_into_the_prologue_pass_only_where_the_fused_down_pass_runs(sm90, generator,
                                                                                             monkeypatch):
    dtype, images, tokens, k, n = torch.bfloat16, 2, 300, 3072, 1024
    x, shift, scale1p = modulated_case("cubed", images, tokens, k, dtype, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    rows = modulated_layer_norm_reference(x, shift, scale1p, tokens, EPS)
    calls = []   # which op each product ran on
    for name in ("sparse_linear_modulated_sm90", "sparse_linear_gelu_sm90", "sparse_linear_lora_sm90"):
        op = getattr(sm90, name)
        monkeypatch.setattr(sm90, name, lambda *a, op=op, name=name: calls.append(name) or op(*a))
    for rank, fused_ops in ((32, ["sparse_linear_modulated_sm90", "sparse_linear_gelu_sm90"]),
                            (48, ["sparse_linear_lora_sm90"] * 2)):
        # In the fused down pass; past it the input is written and the branch's down runs on cuBLAS.
        down, up = branch_case(generator, x.shape[0], weight.shape, rank, dtype)
        low_rank = dispatch.prepare_low_rank(down, up, 0.5, x.device, dtype)
        calls.clear()
        fused = dispatch.sparse_linear_modulated(x, shift, scale1p, tokens, EPS, weight, None, True, low_rank=low_rank)
        gelu = dispatch.sparse_linear_gelu(x, weight, None, True, low_rank=low_rank)
        assert calls == fused_ops, rank
        want = dispatch.sparse_linear(rows, weight, None, True, low_rank=low_rank)
        assert relative_error(fused, want) < TOLERANCE, rank
        assert relative_error(gelu, dispatch.sparse_linear(gelu_tanh_reference(x), weight, None, True,
                                                           low_rank=low_rank)) < TOLERANCE, rank
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="only in its fused down projection"):
        sm90.sparse_linear_modulated_sm90(x, shift, scale1p, tokens, EPS, weight, None, None, True, down,
                                          sm90.k_extension_up(up, 0.5))
    with sm90.low_rank_fusion(False):   # the switch is for the plain pass: with a prologue it fuses anyway
        down, up = down[:8], up[:, :8]
        y = sm90.sparse_linear_gelu_sm90(x, weight, None, None, True, down, sm90.k_extension_up(up, 0.5))
    want = (sparse_linear_reference(gelu_tanh_reference(x).float(), weight.float(), None, True)
            + low_rank_reference(gelu_tanh_reference(x).float(), LowRankOperands(down.float(), up.float(), 0.5)))
    assert relative_error(y, want) < TOLERANCE
    wq, w_scale = quantize_weight_fp8(weight.float())
    with pytest.raises(RuntimeError, match="e4m3 GEMM takes no low-rank branch"):
        sm90.sparse_linear_gelu_sm90(x, wq, w_scale, None, True, down[:8], sm90.k_extension_up(up[:, :8], 0.5))
    with pytest.raises(RuntimeError, match="give down and up_ext together"):
        sm90.sparse_linear_gelu_sm90(x, weight, None, None, True, down[:8], None)


def test_prologue_with_a_branch_compiles_without_graph_breaks(sm90, generator):
    dtype, tokens = torch.bfloat16, 300
    x, shift, scale1p = modulated_case("randn", 2, tokens, 3072, dtype, generator)
    weight = (torch.randn(1024, 3072, generator=generator, device="cuda") / 3072 ** 0.5).to(dtype)
    down, up = branch_case(generator, x.shape[0], weight.shape, 16, dtype)
    low_rank = dispatch.prepare_low_rank(down, up, 0.5, x.device, dtype)

    def both(a):
        return (dispatch.sparse_linear_modulated(a, shift, scale1p, tokens, EPS, weight, None, True,
                                                 low_rank=low_rank) * 2,
                dispatch.sparse_linear_gelu(a, weight, None, True, low_rank=low_rank) * 2)
    torch._dynamo.reset()
    compiled = torch.compile(both, fullgraph=True)(x)
    for got, want in zip(compiled, both(x)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("with_lora", [False, True])
@pytest.mark.parametrize("images", [1, 2])   # one image: the gated residuals go into the GEMMs' epilogues
def test_fused_block_parts_with_patched_layers_compile_in_one_graph(sm90, generator, precision, with_lora, images):
    # The block code path itself (fused_blocks' helpers handing Lynx layers their input's work),
    # not just the dispatch: a graph break there splits every block into recompiled pieces.
    from rt_lynx_pack.lynx import LowRankBranch, LynxConfig, LynxLinearForward, LynxRuntime
    from rt_lynx_pack.lynx.fused_blocks import (_gated_residual, _linear_of_cat_activation, _mlp_with_residual,
                                                _modulated_linears, _Modulation)
    dtype, tokens, hidden = torch.bfloat16, 256, 512
    torch.manual_seed(7)
    runtime, config = LynxRuntime(), LynxConfig(precision=precision)

    def patched(module, sparse=True, lora=with_lora):
        module = module.to("cuda", dtype)
        layer = LynxLinearForward(module, "layer", config, runtime, sparse=sparse)
        if lora and sparse:
            branch = LowRankBranch(torch.randn(8, module.in_features) / 30, torch.randn(module.out_features, 8) / 30, 1.0)
            branch.prepare(torch.device("cuda"), dtype, config)   # as ComfyUI's patching does, outside the graph
            layer = layer.with_lora(branch)
        if precision == "fp8":
            layer.prepare_fp8(module.weight)
        module.forward = layer.bound_to(module)
        return module
    qkv = patched(torch.nn.Linear(hidden, 3 * hidden))
    # In fp8 a branch is added after the product: on the MLP's up projection Inductor would fuse
    # that add into the GELU without eager's rounding between them (one ulp, flipped 2:4 choices
    # downstream), so there only the down projection carries one.
    mlp = torch.nn.Sequential(patched(torch.nn.Linear(hidden, 4 * hidden), lora=with_lora and precision == "bf16"),
                              torch.nn.GELU(approximate="tanh"),
                              patched(torch.nn.Linear(4 * hidden, hidden)))
    linear2 = patched(torch.nn.Linear(5 * hidden, hidden), sparse=precision != "fp8")
    # The same for the gated residual after an fp8 layer's branch: Inductor sums branch and residual
    # without eager's rounding between them (1.2e-3 in the 2026-12-06 run), so there it has none.
    proj = patched(torch.nn.Linear(hidden, hidden), lora=with_lora and precision == "bf16")
    norm = torch.nn.LayerNorm(hidden, elementwise_affine=False, eps=EPS)
    # Inputs whose LayerNorm + modulation is exact in bf16: where a layer needs that input written
    # (fp8 with a LoRA), Inductor computes it in fp32 and rounds once where eager rounds each op,
    # and one ulp of difference flips 2:4 choices (a few % of the output), not a fault of the ops.
    # Rows of as many +1 as -1 (mean 0, variance 1); shift and 1 + scale on a 1/64 grid.
    signs = torch.ones(images * tokens, hidden, device="cuda")
    signs[:, hidden // 2:] = -1
    order = torch.rand(images * tokens, hidden, generator=generator, device="cuda").argsort(1)
    x = signs.gather(1, order).view(images, tokens, hidden).to(dtype)
    shift, scale, gate = (torch.randint(-limit, limit + 1, (images, 1, hidden), generator=generator, device="cuda")
                          .to(dtype) / 64 for limit in (32, 16, 48))
    projected = make_input("randn", images * tokens, 3 * hidden + 4 * hidden, dtype, generator).view(images, tokens, -1)
    attention = make_input("randn", images * tokens, hidden, dtype, generator).view(images, tokens, hidden)

    def block(x, projected):
        (a,) = _modulated_linears((qkv,), norm, x, shift, scale)
        b = _mlp_with_residual(mlp, norm, x, _Modulation(shift, scale, gate))
        c = _linear_of_cat_activation(linear2, projected[..., :hidden], projected[..., 3 * hidden:],
                                      torch.nn.GELU(approximate="tanh"), x, gate)
        # A contiguous input: a column slice of `projected` would take the reference path in eager (the
        # kernels want dense rows) and, copied by Inductor, the kernels compiled: another rounding.
        d = _gated_residual(proj, x, gate, attention)
        return a * 2, b * 2, c * 2, d * 2
    torch._dynamo.reset()
    with torch.inference_mode():   # as ComfyUI samples: no autograd graph (fp8's _scaled_mm has no derivative)
        compiled = torch.compile(block, fullgraph=True)(x, projected)
        for name, got, want in zip("abcd", compiled, block(x, projected)):
            assert relative_error(got, want) < 1e-3, name
