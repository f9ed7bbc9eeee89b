"""GPU tests of the producer fusion: a DiT block's LayerNorm + modulation computed inside the sm90
sparsify pass (rt_lynx::sparsify_sm90 with a modulation, rt_lynx::sparse_linear_modulated_sm90).

The pass must select, scale and quantise exactly what the plain pass makes of the reference's
modulated rows (kernels/reference.py: modulated_layer_norm_reference), up to the few outputs
that the LayerNorm's statistics, summed in another order than torch's, round the other way; and
the products must match fp32 math on the reference's modulated input. Inputs: fresh random and
heavy-tailed families with a per-token offset and gain (a residual stream), odd token counts,
1-3 images, rows up to the longest the pass holds, outputs over NaN-poisoned memory.
"""
import pytest
import torch

from rt_lynx_pack.kernels import dispatch
from rt_lynx_pack.kernels.reference import (modulated_layer_norm_reference, quantize_weight_fp8,
                                            sparse_linear_fp8_reference, sparse_linear_reference)

from kernel_helpers import DTYPES, INPUT_KINDS, make_input, poison_allocator, relative_error, require_fast_path

EPS = 1e-6   # FLUX's and Qwen-Image's LayerNorms
TOLERANCE = 1e-2
# LayerNorm outputs rounded the other way than torch rounds them (its statistics are summed in
# another order) change a kept value by one ulp, rarely which value is kept.
DIFFERING_BYTES = 1e-3


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
def test_modulated_pass_writes_what_the_plain_pass_makes_of_the_reference_rows(sm90, generator, dtype, kind, images,
                                                                               tokens, k, e4m3, block):
    x, shift, scale1p = modulated_case(kind, images, tokens, k, dtype, generator)
    rows = modulated_layer_norm_reference(x, shift, scale1p, tokens, EPS)
    want, want_scale = torch.ops.rt_lynx.sparsify_sm90(rows, block, e4m3, True)
    poison_allocator(want.numel() * want.element_size() + want_scale.numel() * 4)
    got, got_scale = torch.ops.rt_lynx.sparsify_sm90(x, block, e4m3, True, shift, scale1p, tokens, EPS)
    assert got.shape == want.shape and got_scale.shape == want_scale.shape
    differing = (got.view(torch.uint8) != want.view(torch.uint8)).float().mean().item()
    assert differing < DIFFERING_BYTES, f"{differing:.2e} of the compressed bytes differ"
    assert not got_scale.isnan().any()
    assert relative_error(got_scale, want_scale) < 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("images,tokens,k,n", [(1, 4096, 3072, 9216), (2, 4096, 3072, 3072), (1, 4608, 3072, 21504),
                                               (3, 77, 3072, 12288), (2, 512, 3072, 3072), (1, 300, 128, 64)])
def test_modulated_linear_matches_fp32_math_on_the_modulated_input(sm90, generator, dtype, precision, images, tokens,
                                                                   k, n):
    x, shift, scale1p = modulated_case("student_t", images, tokens, k, dtype, generator)
    weight = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    bias = torch.randn(n, generator=generator, device="cuda").to(dtype)
    rows = modulated_layer_norm_reference(x, shift, scale1p, tokens, EPS).float()
    if precision == "fp8":
        wq, w_scale = quantize_weight_fp8(weight.float())
        want = sparse_linear_fp8_reference(rows, wq, w_scale, bias.float(), True)
    else:
        wq, w_scale = weight, None
        want = sparse_linear_reference(rows, weight.float(), bias.float(), True)
    poison_allocator(x.numel() * 2 + images * tokens * n * 2)
    y = sm90.sparse_linear_modulated_sm90(x, shift, scale1p, tokens, EPS, wq, w_scale, bias, True)
    assert y.shape == (images * tokens, n) and y.dtype == dtype and not y.isnan().any()
    assert relative_error(y, want) < TOLERANCE


def test_dispatch_fuses_strided_inputs_and_falls_back_past_the_longest_row(sm90, generator):
    dtype, images, tokens = torch.bfloat16, 2, 100
    wide, shift, scale1p = modulated_case("cubed", images, tokens, 3072 + 128, dtype, generator)
    x = wide[:, :3072]   # rows 3200 elements apart
    shift, scale1p = shift[:, :3072], scale1p[:, :3072]
    weight = (torch.randn(1024, 3072, generator=generator, device="cuda") / 3072 ** 0.5).to(dtype)
    fused = dispatch.sparse_linear_modulated(x, shift, scale1p, tokens, EPS, weight, None, True)
    unfused = dispatch.sparse_linear(modulated_layer_norm_reference(x, shift, scale1p, tokens, EPS), weight, None, True)
    assert relative_error(fused, unfused) < TOLERANCE

    extension = sm90._cusparselt.extension()
    assert extension.sparsify_modulation_supported(64, sm90.MODULATED_MAX_COLUMNS)
    assert not extension.sparsify_modulation_supported(64, sm90.MODULATED_MAX_COLUMNS + 128)
    k = sm90.MODULATED_MAX_COLUMNS + 128
    x, shift, scale1p = modulated_case("randn", 1, 64, k, dtype, generator)
    weight = (torch.randn(256, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    with pytest.raises(RuntimeError, match="too long for the modulated sparsify pass"):
        sm90.sparse_linear_modulated_sm90(x, shift, scale1p, 64, EPS, weight, None, None, True)
    fallback = dispatch.sparse_linear_modulated(x, shift, scale1p, 64, EPS, weight, None, True)
    want = sparse_linear_reference(modulated_layer_norm_reference(x, shift, scale1p, 64, EPS).float(),
                                   weight.float(), None, True)
    assert relative_error(fallback, want) < TOLERANCE


def test_modulated_linear_compiles_without_graph_breaks(sm90, generator):
    dtype, tokens = torch.bfloat16, 300
    x, shift, scale1p = modulated_case("randn", 2, tokens, 3072, dtype, generator)
    weight = (torch.randn(1024, 3072, generator=generator, device="cuda") / 3072 ** 0.5).to(dtype)
    eager = dispatch.sparse_linear_modulated(x, shift, scale1p, tokens, EPS, weight, None, True)
    compiled = torch.compile(lambda a: dispatch.sparse_linear_modulated(a, shift, scale1p, tokens, EPS, weight,
                                                                        None, True) * 2, fullgraph=True)
    assert torch.equal(compiled(x), eager * 2)
