"""Fused elementwise work of DiT blocks around their linears, as torch ops.

  torch.ops.rt_lynx.qk_norm_rope(qkv_a, q_weight_a, k_weight_a, qkv_b, q_weight_b, k_weight_b, pe, heads, eps)
      -> (q, k, v)   one pass over the qkv projections: per-head RMSNorm of q and k, RoPE, and q, k, v
                     written in the (batch, heads, tokens, head_dim) layout attention takes

It computes `reference.qk_norm_rope_reference`. In ComfyUI's eager FLUX this work is a dozen
passes, several of them in fp32 (QKNorm, the RoPE of flux.math.attention, the concatenation of
the two streams); here it reads the projections once and writes the attention inputs once.
"""
import torch

from . import cusparselt as _cusparselt
from .reference import qk_norm_rope_reference

HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)


def _define_ops():
    try:
        torch.ops.rt_lynx.qk_norm_rope.default
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("rt_lynx", "FRAGMENT")
    lib.define("qk_norm_rope(Tensor qkv_a, Tensor q_weight_a, Tensor k_weight_a, Tensor? qkv_b, Tensor? q_weight_b, "
               "Tensor? k_weight_b, Tensor pe, int heads, float eps) -> (Tensor, Tensor, Tensor)")

    @torch.library.register_fake("rt_lynx::qk_norm_rope", lib=lib)
    def _(qkv_a, q_weight_a, k_weight_a, qkv_b, q_weight_b, k_weight_b, pe, heads, eps):
        tokens = qkv_a.shape[1] + (0 if qkv_b is None else qkv_b.shape[1])
        shape = (qkv_a.shape[0], heads, tokens, qkv_a.shape[2] // (3 * heads))
        return tuple(qkv_a.new_empty(shape) for _ in range(3))

    _define_ops.library = lib


_define_ops()


def availability_block_ops(device: torch.device) -> tuple[bool, str]:
    """(True, info) when the fused block kernels run on `device` and match the reference. Cached;
    never raises."""
    return _availability(device)


def _check_device(index: int) -> tuple[bool, str]:
    try:
        _cusparselt.extension()
        with torch.cuda.device(index):
            problem = self_test_block_ops(torch.device("cuda", index))
    except Exception as exc:
        problem = _cusparselt.self_test_error(exc)
    if problem:
        return False, f"fused block kernels unavailable: {problem}"
    return True, "fused block kernels, self-test passed"


_availability = _cusparselt.PerDeviceCheck(_check_device)


def self_test_block_ops(device: torch.device) -> str:
    """'' when qk_norm_rope matches the reference (two parts, a strided part, batch 2, both
    16-bit dtypes); else the first problem, one line."""
    generator = torch.Generator(device=device).manual_seed(2468)
    batch, heads, head_dim, tokens_a, tokens_b = 2, 3, 128, 5, 7

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    for dtype in SUPPORTED_DTYPES:
        width = 3 * heads * head_dim
        qkv_a = randn(batch, tokens_a, width + 64, dtype=dtype)[..., :width]   # strided rows, as a split
        qkv_b = randn(batch, tokens_b, width, dtype=dtype)
        weights = [randn(head_dim, dtype=dtype) for _ in range(4)]
        pe = randn(1, 1, tokens_a + tokens_b, head_dim // 2, 2, 2)
        args = (qkv_a, weights[0], weights[1], qkv_b, weights[2], weights[3], pe, heads, 1e-6)
        got = torch.ops.rt_lynx.qk_norm_rope(*args)
        want = qk_norm_rope_reference(*args)
        for name, g, w in zip("qkv", got, want):
            if g.shape != w.shape or g.dtype != w.dtype:
                return f"{name}: {tuple(g.shape)} {g.dtype}, expected {tuple(w.shape)} {w.dtype}"
            if not torch.allclose(g.float(), w.float(), rtol=2e-2, atol=2e-2):
                return f"{name} differs from the reference ({dtype}): max {(g.float() - w.float()).abs().max():.3g}"
    torch.cuda.synchronize(device)
    return ""


def supports_qk_norm_rope(qkv: torch.Tensor, heads: int, pe: torch.Tensor) -> tuple[bool, str]:
    """Whether the fused kernel takes these operands (the op checks the rest and says why)."""
    if qkv.dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {qkv.dtype} (bfloat16/float16 only)"
    if qkv.dim() != 3 or qkv.shape[2] % (3 * heads) or qkv.shape[2] // (3 * heads) not in HEAD_DIMS:
        return False, f"qkv of shape {tuple(qkv.shape)} with {heads} heads: head_dim must be one of {HEAD_DIMS}"
    if pe.dtype != torch.float32 or pe.dim() != 6:
        return False, f"pe {pe.dtype} of {pe.dim()} dims (fp32, 6 dims expected)"
    return True, ""
