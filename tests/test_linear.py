import pytest
import torch
import torch.nn.functional as F

from rt_lynx_pack.kernels import modulated_layer_norm_reference, norm_compensation_scale, sparse_linear, sparsify_nm
from rt_lynx_pack.lynx import LowRankBranch, LynxConfig, LynxLinearForward, LynxRuntime, lynx_linear, patching
from rt_lynx_pack.lynx.linear import (fp8_dense_linear, lynx_linear_after_gelu, lynx_linear_modulated,
                                      modulated_layer_norm)


def make(tokens_shape=(2, 40), k=64, n=48, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens_shape, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x, w, b


def expected(x, w, b, compensate):
    x64 = x.double()
    kept = sparsify_nm(x64)
    y = kept @ w.double().t()
    if compensate:
        y = y * norm_compensation_scale(x64, kept).double()
    return y + b.double()


@pytest.mark.parametrize("compensate", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_lynx_linear_matches_float64_math(compensate, dtype, tol):
    x, w, b = make(dtype=dtype)
    y = lynx_linear(x, w, b, LynxConfig(compensate=compensate, backend="reference"))
    assert y.shape == (2, 40, 48) and y.dtype == dtype
    ref = expected(x, w, b, compensate)
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("shape", [(80,), (3, 5, 7), (1, 2, 3, 11)])
def test_any_leading_dims(shape):
    x, w, b = make(tokens_shape=shape)
    y = lynx_linear(x, w, b, LynxConfig(min_tokens=1))
    torch.testing.assert_close(y.double(), expected(x, w, b, True), rtol=1e-5, atol=1e-5)


def test_fp8_stored_weights_compute_in_the_input_dtype():
    x, w, b = make(dtype=torch.bfloat16)
    w8 = w.float().to(torch.float8_e4m3fn)
    y = lynx_linear(x, w8, b, LynxConfig())
    assert y.dtype == torch.bfloat16
    ref = expected(x, w8.to(torch.bfloat16), b, True)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-2


def test_the_dense_rule_counts_tokens_per_sequence_not_per_batch():
    config = LynxConfig(min_tokens=32)
    x, w, b = make(tokens_shape=(4, 16))          # 64 rows, but 16 tokens per sequence
    assert torch.equal(lynx_linear(x, w, b, config), F.linear(x, w, b))
    x, w, b = make(tokens_shape=(1, 40))
    assert not torch.equal(lynx_linear(x, w, b, config), F.linear(x, w, b))
    assert config.sequence_tokens(torch.zeros(40, 64)) == 40  # 2-D input: rows are the tokens


def test_few_tokens_and_dense_mode_are_exactly_dense():
    x, w, b = make(tokens_shape=(1, 3))
    assert torch.equal(lynx_linear(x, w, b, LynxConfig(min_tokens=4)), F.linear(x, w, b))
    x, w, b = make()
    assert torch.equal(lynx_linear(x, w, b, LynxConfig(), dense=True), F.linear(x, w, b))


def test_lora_branch_runs_on_the_dense_input():
    x, w, b = make()
    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(8, 64, generator=g), torch.randn(48, 8, generator=g)
    branch = LowRankBranch(down, up, scale=0.25)
    y = lynx_linear(x, w, b, LynxConfig(), lora=branch)
    ref = expected(x, w, b, True) + (x.double() @ down.double().t() @ up.double().t()) * 0.25
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


def test_bad_input_is_refused_clearly():
    x, w, b = make()
    with pytest.raises(ValueError, match="weight expects"):
        lynx_linear(x, w[:, :32], b, LynxConfig())
    x6 = torch.randn(64, 6)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        lynx_linear(x6, torch.randn(8, 6), None, LynxConfig())
    with pytest.raises(ValueError, match="backend"):
        LynxConfig(backend="tpu")
    with pytest.raises(ValueError, match="0 < n < m"):
        LynxConfig(n=4, m=4)
    with pytest.raises(ValueError, match="unknown backend"):
        sparse_linear(x.reshape(-1, 64), w, b, True, "fast")
    with pytest.raises(ValueError, match="do not chain"):
        LowRankBranch(torch.randn(8, 64), torch.randn(48, 4), 1.0)


def test_fp8_rows_of_dense_layers_keep_each_token_within_e4m3_rounding():
    from rt_lynx_pack.kernels.reference import quantize_rows_fp8
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(5)) * torch.logspace(-3, 3, 40)[:, None]
    x[7] = 0
    q, a = quantize_rows_fp8(x.to(torch.bfloat16))
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and a.shape == (40, 1) and a.dtype == torch.float32
    nonzero = x.abs().amax(-1) > 0
    assert torch.equal(q.float().abs().amax(-1)[nonzero], torch.full((39,), 448.0))   # the largest |x| -> 448
    assert (q[7].float() == 0).all() and a[7].item() == 0
    xb = x.to(torch.bfloat16).float()
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 relative, 2^-10 * a below the normal range.
    assert ((q.float() * a - xb).abs() <= torch.maximum(xb.abs() * 2 ** -4, a * 2 ** -10) * (1 + 1e-6)).all()


def test_fp8_quantisation_of_a_row_of_subnormals_stays_finite():
    from rt_lynx_pack.kernels.reference import quantize_rows_fp8, quantize_weight_fp8, sparsify_quantize_fp8
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    x[0, :4] = 1e-38   # a 16-bit subnormal max: 448 / max overflows fp32
    x[1, 5] = -3.0
    for q, a in (quantize_rows_fp8(x), sparsify_quantize_fp8(x, True), quantize_weight_fp8(x)):
        assert not q.float().isnan().any() and torch.isfinite(a).all()
    q, a = quantize_rows_fp8(x)
    assert (q[0].float() * a[0]).abs().max() <= 1e-38   # the tiny row stays tiny (its scale is capped)
    assert torch.allclose(q[1].float() * a[1], x[1].float(), rtol=2 ** -4, atol=0)


def test_fp8_dense_linear_computes_the_dense_fp8_reference():
    from rt_lynx_pack.kernels import dense_linear_fp8_reference, quantize_weight_fp8
    from rt_lynx_pack.lynx.linear import fp8_dense_linear
    x, w, b = make(tokens_shape=(3, 50), k=128, n=64, dtype=torch.bfloat16)
    config = LynxConfig(precision="fp8")
    y = fp8_dense_linear(x, w, b, config)
    wq, w_scale = quantize_weight_fp8(w)
    assert torch.equal(y, dense_linear_fp8_reference(x.reshape(-1, 128), wq, w_scale, b).reshape(3, 50, 64))
    assert torch.equal(fp8_dense_linear(x, w, b, config, fp8_weight=(wq, w_scale)), y)
    dense = F.linear(x.double(), w.double(), b.double())
    assert 0 < ((y.double() - dense).norm() / dense.norm()).item() < 5e-2
    # Dense warm-up steps and inputs below min_tokens are the model's own product.
    assert torch.equal(fp8_dense_linear(x, w, b, config, dense=True), F.linear(x, w, b))
    assert torch.equal(fp8_dense_linear(x[:, :8], w, b, config), F.linear(x[:, :8], w, b))


def test_fp8_precision_computes_the_fp8_reference_and_stays_close_to_bf16():
    from rt_lynx_pack.kernels import quantize_weight_fp8, sparse_linear_fp8_reference
    x, w, b = make(tokens_shape=(3, 50), k=128, n=64, dtype=torch.bfloat16)
    config = LynxConfig(precision="fp8")
    y = lynx_linear(x, w, b, config)
    wq, w_scale = quantize_weight_fp8(w)
    assert wq.dtype == torch.float8_e4m3fn and w_scale.shape == (64,)
    assert torch.equal(y, sparse_linear_fp8_reference(x.reshape(-1, 128), wq, w_scale, b, True).reshape(3, 50, 64))
    # The same with the weight quantised ahead of time.
    assert torch.equal(lynx_linear(x, w, b, config, fp8_weight=(wq, w_scale)), y)
    bf16 = expected(x, w, b, True)
    assert ((y.double() - bf16).norm() / bf16.norm()).item() < 8e-2   # e4m3 keeps 3 mantissa bits
    with pytest.raises(ValueError, match="precision"):
        LynxConfig(precision="int4")
    with pytest.raises(ValueError, match="fp8 precision is defined for 2:4 only"):
        LynxConfig(precision="fp8", n=1, m=4)


def modulation(images=2, k=64, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(images, 1, k, generator=g), torch.randn(images, 1, k, generator=g) / 4


def test_modulated_layer_norm_is_the_blocks_layer_norm_then_per_image_modulation():
    x, _, _ = make(tokens_shape=(2, 40))
    x = x * 3 + 1
    shift, scale = modulation()
    want = torch.addcmul(shift, F.layer_norm(x, (64,), eps=1e-6), 1 + scale)
    torch.testing.assert_close(modulated_layer_norm(x, shift, 1 + scale, 1e-6), want, rtol=0, atol=0)
    got = modulated_layer_norm_reference(x.reshape(80, 64), shift[:, 0], 1 + scale[:, 0], 40, 1e-6)
    torch.testing.assert_close(got, want.reshape(80, 64), rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("config", [{}, {"min_tokens": 64}, {"n": 1, "m": 4, "precision": "bf16"}])
def test_lynx_linear_of_a_modulated_input_is_the_linear_of_the_modulated_tensor(precision, config):
    x, w, b = make(tokens_shape=(2, 40), dtype=torch.bfloat16)
    shift, scale = (t.to(torch.bfloat16) for t in modulation())
    config = LynxConfig(**{"precision": precision, **config})
    got = lynx_linear_modulated(x, shift, 1 + scale, 1e-6, w, b, config)
    want = lynx_linear(modulated_layer_norm(x, shift, 1 + scale, 1e-6), w, b, config)
    assert got.shape == (2, 40, 48)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_lynx_linear_after_gelu_is_the_linear_of_the_activation(precision):
    x, w, b = make(tokens_shape=(2, 40), dtype=torch.bfloat16)
    config = LynxConfig(precision=precision)
    want = lynx_linear(F.gelu(x, approximate="tanh"), w, b, config)
    torch.testing.assert_close(lynx_linear_after_gelu(x, w, b, config), want, rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_a_patched_layer_computes_a_prepared_input_as_the_layer_of_that_input(precision, monkeypatch):
    x, w, b = make(tokens_shape=(2, 40))
    shift, scale = modulation()
    layer = torch.nn.Linear(64, 48)
    runtime = LynxRuntime()
    forward = LynxLinearForward(layer, "layer", LynxConfig(precision=precision), runtime)
    branch = LowRankBranch(torch.randn(4, 64), torch.randn(48, 4), 0.5)
    modulated = modulated_layer_norm(x, shift, 1 + scale, 1e-6)
    handed = []   # the products that got the prologue handed to the kernels' dispatch
    for name in ("lynx_linear_modulated", "lynx_linear_after_gelu"):
        original = getattr(patching, name)
        monkeypatch.setattr(patching, name, lambda *a, original=original, **k: handed.append(1) or original(*a, **k))
    for candidate in (forward, forward.with_lora(branch)):
        torch.testing.assert_close(candidate.modulated(x, shift, 1 + scale, 1e-6), candidate(modulated),
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(candidate.after_gelu(x), candidate(F.gelu(x, approximate="tanh")),
                                   rtol=1e-6, atol=1e-6)
    # With a LoRA in fp8 the branch is added after the product, from the input written out.
    assert len(handed) == (4 if precision == "bf16" else 2)
    runtime.dense = True
    torch.testing.assert_close(forward.modulated(x, shift, 1 + scale, 1e-6), F.linear(modulated, layer.weight, layer.bias))
    assert len(handed) == (4 if precision == "bf16" else 2)


@pytest.mark.parametrize("dense_step", [False, True])
def test_fp8_dense_linear_of_a_gelu_tail_is_the_linear_of_the_concatenation(dense_step):
    attn, _, _ = make(tokens_shape=(2, 40), k=32, dtype=torch.bfloat16)
    projected, w, b = make(tokens_shape=(2, 40), k=96, n=48, dtype=torch.bfloat16, seed=1)
    mlp = projected[..., 32:]   # a strided split, as FLUX's single block has it
    config = LynxConfig(precision="fp8")
    joined = torch.cat((attn, F.gelu(mlp, approximate="tanh")), -1)
    got = fp8_dense_linear(attn, w, b, config, dense=dense_step, gelu_tail=mlp)
    torch.testing.assert_close(got, fp8_dense_linear(joined, w, b, config, dense=dense_step), rtol=0, atol=0)
    with pytest.raises(ValueError, match="input has 96 features, weight expects 64"):
        fp8_dense_linear(attn, w[:, :64], b, config, gelu_tail=mlp)


def test_a_patched_layer_takes_the_concatenation_with_a_gelu_as_its_two_parts():
    attn, _, _ = make(tokens_shape=(2, 40), k=16)
    mlp, _, _ = make(tokens_shape=(2, 40), k=48, seed=1)
    joined = torch.cat((attn, F.gelu(mlp, approximate="tanh")), -1)
    layer = torch.nn.Linear(64, 48)
    runtime = LynxRuntime()
    sparse = LynxLinearForward(layer, "layer", LynxConfig(), runtime)
    dense_fp8 = LynxLinearForward(layer, "layer", LynxConfig(precision="fp8"), runtime, sparse=False)
    for forward in (sparse, dense_fp8):
        torch.testing.assert_close(forward.after_cat_gelu(attn, mlp), forward(joined), rtol=0, atol=0)
    runtime.dense = True
    torch.testing.assert_close(dense_fp8.after_cat_gelu(attn, mlp), F.linear(joined, layer.weight, layer.bias))


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_linears_of_a_prepared_input_with_a_lora_are_the_linear_of_that_input_with_it(precision):
    x, w, b = make(tokens_shape=(2, 40), dtype=torch.bfloat16)
    shift, scale = (t.to(torch.bfloat16) for t in modulation())
    config = LynxConfig(precision=precision)
    branch = LowRankBranch(torch.randn(4, 64), torch.randn(48, 4), 0.5)
    modulated = modulated_layer_norm(x, shift, 1 + scale, 1e-6)
    torch.testing.assert_close(lynx_linear_modulated(x, shift, 1 + scale, 1e-6, w, b, config, lora=branch),
                               lynx_linear(modulated, w, b, config, branch), rtol=0, atol=0)
    torch.testing.assert_close(lynx_linear_after_gelu(x, w, b, config, lora=branch),
                               lynx_linear(F.gelu(x, approximate="tanh"), w, b, config, branch), rtol=0, atol=0)
    # The branch is of the prepared input, not of x.
    on_raw_x = lynx_linear(modulated, w, b, config) + branch(x)
    assert not torch.allclose(lynx_linear_modulated(x, shift, 1 + scale, 1e-6, w, b, config, lora=branch),
                              on_raw_x, atol=1e-2)
