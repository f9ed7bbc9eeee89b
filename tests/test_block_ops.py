"""The fused block ops without a GPU: the reference's math (checked against an independent
formulation), the dispatch's fallback, the fake kernel torch.compile traces, and which blocks the
fused FLUX forwards take, and how they hand a LayerNorm + modulation, and the single block's
linear2 input, to their linears."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from rt_lynx_pack.kernels import cat_gelu_tanh, qk_norm_rope, qk_norm_rope_reference
from rt_lynx_pack.lynx import LynxConfig, LynxLinearForward, LynxRuntime
from rt_lynx_pack.lynx.fused_blocks import _linear_of_cat_activation, _modulated_linears, fused_block_kind, fusable_call


def flux_pe(tokens, head_dim, generator):
    """The table FLUX's EmbedND builds: per position and pair, [[cos, -sin], [sin, cos]] (fp32)."""
    angles = torch.rand(1, 1, tokens, head_dim // 2, generator=generator, dtype=torch.float64) * 100
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.stack([cos, -sin, sin, cos], dim=-1).reshape(1, 1, tokens, head_dim // 2, 2, 2), angles


def test_reference_is_rms_norm_then_a_rotation_of_each_pair():
    generator = torch.Generator().manual_seed(0)
    batch, heads, head_dim, tokens_a, tokens_b = 2, 3, 8, 4, 5
    width = 3 * heads * head_dim
    a = torch.randn(batch, tokens_a, width, generator=generator, dtype=torch.float64)
    b = torch.randn(batch, tokens_b, width, generator=generator, dtype=torch.float64)
    w = [torch.randn(head_dim, generator=generator, dtype=torch.float64) for _ in range(4)]
    pe, angles = flux_pe(tokens_a + tokens_b, head_dim, generator)
    q, k, v = qk_norm_rope_reference(a, w[0], w[1], b, w[2], w[3], pe, heads, 1e-6)

    # Independently: heads of the concatenated streams, RMS-normalised, then (x0 + i x1) * e^(i angle).
    both = torch.cat([a, b], dim=1).reshape(batch, tokens_a + tokens_b, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    part_of_token = torch.arange(tokens_a + tokens_b) >= tokens_a
    rotation = torch.polar(torch.ones_like(angles), angles)[0, 0]   # (tokens, head_dim / 2)
    for got, x, (w_a, w_b) in ((q, both[0], (w[0], w[2])), (k, both[1], (w[1], w[3]))):
        weight = torch.where(part_of_token[:, None], w_b, w_a)      # (tokens, head_dim)
        normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
        pairs = torch.view_as_complex(normed.reshape(*normed.shape[:-1], -1, 2).contiguous())
        expected = torch.view_as_real(pairs * rotation).reshape(normed.shape)
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(v, both[2])
    assert q.shape == (batch, heads, tokens_a + tokens_b, head_dim) and v.is_contiguous()


def test_dispatch_on_the_cpu_is_the_reference_in_the_qkv_dtype():
    generator = torch.Generator().manual_seed(1)
    heads, head_dim = 2, 128
    qkv = torch.randn(1, 6, 3 * heads * head_dim, generator=generator).bfloat16()
    w = [torch.randn(head_dim, generator=generator) for _ in range(2)]   # fp32 weights, cast like ComfyUI does
    pe = flux_pe(6, head_dim, generator)[0].float()
    got = qk_norm_rope(qkv, w[0], w[1], None, None, None, pe, heads, 1e-6)
    want = qk_norm_rope_reference(qkv, w[0].bfloat16(), w[1].bfloat16(), None, None, None, pe, heads, 1e-6)
    for g, e in zip(got, want):
        assert g.dtype == torch.bfloat16 and torch.equal(g, e)


@pytest.mark.parametrize("tokens_b", [None, 4096])
def test_qk_norm_rope_fake_kernel_gives_the_shapes_the_cuda_op_returns(tokens_b):
    with FakeTensorMode():
        a = torch.empty(2, 512, 9216, dtype=torch.bfloat16, device="cuda")
        b = None if tokens_b is None else torch.empty(2, tokens_b, 9216, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(128, dtype=torch.bfloat16, device="cuda")
        pe = torch.empty(1, 1, 512 + (tokens_b or 0), 64, 2, 2, device="cuda")
        outputs = torch.ops.rt_lynx.qk_norm_rope(a, w, w, b, w if b is not None else None,
                                                 w if b is not None else None, pe, 24, 1e-6)
        if b is None:
            outputs += torch.ops.rt_lynx.qk_norm_rope_qk(a, w, w, pe, 24, 1e-6)
    assert len(outputs) == (5 if b is None else 3)
    for out in outputs:
        assert out.shape == (2, 24, 512 + (tokens_b or 0), 128) and out.dtype == torch.bfloat16


class DoubleStreamBlock(nn.Module):   # the class name of ComfyUI's, with a forward of another signature
    def forward(self, img, txt, vec, pe, attn_mask=None, new_option=None, transformer_options={}):
        return img, txt


def test_blocks_other_than_comfyui_flux_blocks_keep_their_own_forward():
    kind, why_not = fused_block_kind(nn.Linear(4, 4))
    assert kind is None and "not a FLUX or Qwen-Image transformer block" in why_not
    kind, why_not = fused_block_kind(DoubleStreamBlock())
    assert kind is None and "new_option" in why_not


def test_calls_without_a_rope_table_of_a_known_dtype_for_their_tokens_take_the_original_block():
    block = nn.Identity()
    hidden = torch.zeros(1, 4, 8, dtype=torch.bfloat16)
    assert fusable_call(block, torch.zeros(1, 1, 4, 4, 2, 2), hidden, 4)
    assert fusable_call(block, torch.zeros(1, 4, 1, 4, 2, 2, dtype=torch.bfloat16), hidden, 4)
    assert not fusable_call(block, None, hidden, 4)
    assert not fusable_call(block, torch.zeros(1, 1, 4, 4, 2, 2, dtype=torch.float16), hidden, 4)
    # A table for more tokens than attention runs over (a later ComfyUI's cached reference tokens).
    assert not fusable_call(block, torch.zeros(1, 1, 6, 4, 2, 2), hidden, 4)


def test_a_gpu_other_than_hopper_gets_the_reference_path_without_a_build(monkeypatch):
    # The extension holds sm_90a code only: building it for an sm_89 GPU would take a minute for nothing.
    from rt_lynx_pack.kernels import block_ops, cusparselt

    def no_build():
        raise AssertionError("the extension was built")

    monkeypatch.setattr(cusparselt, "extension", no_build)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA GeForce RTX 4090")
    available, why_not = block_ops._check_device(0)
    assert not available and "sm_89" in why_not and "Hopper" in why_not


class CountingLayerNorm(torch.nn.LayerNorm):
    calls = 0

    def forward(self, x):
        CountingLayerNorm.calls += 1
        return super().forward(x)


def test_linears_of_one_modulated_input_share_it_where_it_must_be_written():
    # On the reference backend no layer takes the norm into its sparsify pass: the three Lynx
    # layers (and a plain one) must share one LayerNorm + modulation, as the block computes it.
    g = torch.Generator().manual_seed(2)
    norm = CountingLayerNorm(64, elementwise_affine=False, eps=1e-6)
    linears = [torch.nn.Linear(64, 32) for _ in range(4)]
    runtime = LynxRuntime()
    for index, linear in enumerate(linears[:3]):
        layer = LynxLinearForward(linear, f"l{index}", LynxConfig(backend="reference", min_tokens=1), runtime)
        linear.forward = layer.bound_to(linear)
    x = torch.randn(2, 40, 64, generator=g)
    shift, scale = torch.randn(2, 1, 64, generator=g), torch.randn(2, 1, 64, generator=g) / 4
    CountingLayerNorm.calls = 0
    outputs = _modulated_linears(tuple(linears), norm, x, shift, scale)
    assert CountingLayerNorm.calls == 1
    modulated = torch.addcmul(shift, F.layer_norm(x, (64,), eps=1e-6), 1 + scale)
    for linear, got in zip(linears, outputs):
        torch.testing.assert_close(got, linear(modulated), rtol=0, atol=0)


def test_cat_gelu_tanh_on_the_cpu_is_the_reference_and_its_fake_kernel_has_the_cuda_shape():
    g = torch.Generator().manual_seed(3)
    projected = torch.randn(2, 5, 96, generator=g).bfloat16()
    attn = torch.randn(2, 5, 16, generator=g).bfloat16()
    got = cat_gelu_tanh(attn, projected[..., 48:])
    assert torch.equal(got, torch.cat((attn, F.gelu(projected[..., 48:], approximate="tanh")), -1))
    with FakeTensorMode():
        a = torch.empty(4608, 3072, dtype=torch.bfloat16, device="cuda")
        b = torch.empty_strided((4608, 12288), (21504, 1), dtype=torch.bfloat16, device="cuda")   # a split
        out = torch.ops.rt_lynx.cat_gelu_tanh(a, b)
        q, scale = torch.ops.rt_lynx.quantize_rows_fp8(a, b)
    assert out.shape == (4608, 3072 + 12288) and out.dtype == torch.bfloat16
    assert q.shape == (4608, 3072 + 12288) and q.dtype == torch.float8_e4m3fn and scale.shape == (4608, 1)


def test_single_block_linear2_input_goes_to_a_lynx_layer_as_its_two_parts():
    g = torch.Generator().manual_seed(4)
    attn, mlp = torch.randn(2, 40, 16, generator=g), torch.randn(2, 40, 48, generator=g)
    residual, gate = torch.randn(2, 40, 32, generator=g), torch.randn(2, 1, 32, generator=g)
    linear = torch.nn.Linear(64, 32)
    want = torch.addcmul(residual, gate, linear(torch.cat((attn, F.gelu(mlp, approximate="tanh")), -1)))
    torch.testing.assert_close(_linear_of_cat_activation(linear, attn, mlp, nn.GELU(approximate="tanh"), residual,
                                                         gate), want, rtol=0, atol=0)
    parts = []
    forward = LynxLinearForward(linear, "linear2", LynxConfig(backend="reference", min_tokens=1), LynxRuntime())
    linear.forward = forward.bound_to(linear)
    forward.after_cat_gelu = lambda *args, module: parts.append(args) or want
    assert _linear_of_cat_activation(linear, attn, mlp, nn.GELU(approximate="tanh"), residual, gate) is want
    assert len(parts) == 1 and all(a is b for a, b in zip(parts[0], (attn, mlp, residual, gate), strict=True))
    # Any other activation: the block's own concatenation, through the layer's plain forward.
    got = _linear_of_cat_activation(linear, attn, mlp, nn.GELU(), residual, gate)
    torch.testing.assert_close(got, torch.addcmul(residual, gate, linear(torch.cat((attn, F.gelu(mlp)), -1))),
                               rtol=0, atol=0)
    assert len(parts) == 1


def test_qk_norm_parameters_are_each_norms_weight_and_the_eps_it_computes_with():
    from rt_lynx_pack.lynx.fused_blocks import _qk_norm_problem, qk_norm_parameters
    norm = nn.RMSNorm(8)   # eps None: torch's default, the fp32 epsilon for 16-bit and fp32 inputs
    weight, eps = qk_norm_parameters(norm)
    assert weight is norm.weight and eps == torch.finfo(torch.float32).eps
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.full((2, 8), 1e-3, dtype=dtype)   # small enough that eps shows
        want = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        got = torch.nn.functional.rms_norm(x, (8,), norm.weight.to(dtype), norm.eps)   # as ComfyUI casts it
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert qk_norm_parameters(nn.RMSNorm(8, eps=1e-5))[1] == 1e-5

    class RMSNorm(nn.Module):   # ComfyUI 0.3.x's FLUX norm: weight `scale`, eps 1e-6 in its forward
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(8))
    RMSNorm.__module__ = "comfy.ldm.flux.layers"
    old = RMSNorm()
    assert _qk_norm_problem(old, 8) == "" and qk_norm_parameters(old) == (old.scale, 1e-6)
    assert _qk_norm_problem(nn.RMSNorm(16), 8) and _qk_norm_problem(nn.LayerNorm(8), 8)
