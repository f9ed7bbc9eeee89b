"""Fused elementwise work of DiT blocks around their linears, as torch ops.

  torch.ops.rt_lynx.qk_norm_rope(qkv_a, q_weight_a, k_weight_a, qkv_b, q_weight_b, k_weight_b, pe, heads, eps)
      -> (q, k, v)   FLUX: one pass over the qkv projections of one or two token streams: per-head
                     RMSNorm of q and k, RoPE, and q, k, v written as (batch, heads, tokens, head_dim)
  torch.ops.rt_lynx.qk_norm_rope_qk(qkv, q_weight, k_weight, pe, heads, eps) -> (q, k)
                     FLUX, one stream (single blocks): q and k as above; v stays in the projection,
                     which attention reads as a heads-major view (`heads_major_v`) as fast as a copy
  torch.ops.rt_lynx.qk_norm_rope_split(q_a, k_a, v_a, q_weight_a, k_weight_a, q_b, k_b, v_b, q_weight_b,
                                       k_weight_b, pe, heads, eps) -> (q, k, v)
                     Qwen-Image: the same from separate q, k, v projections, written token-major
                     (batch, tokens, heads * head_dim)
  torch.ops.rt_lynx.cat_gelu_tanh(a, b) -> cat((a, gelu_tanh(b)), -1)
                     FLUX's single-block linear2 input (2-D a, b of the same rows; b may be a
                     strided split of linear1's output): one pass instead of the GELU and the
                     concatenation

They compute `reference.qk_norm_rope_reference` / `qk_norm_rope_split_reference` (RoPE rounded as
in the table's dtype) and `cat_gelu_tanh_reference` (the GELU as torch's CUDA kernel rounds it).
In ComfyUI's eager models the attention inputs take a dozen passes (QKNorm, RoPE on broadcast
pair tensors, the concatenation of the two streams); here one pass reads the projections once and
writes the attention inputs once.
"""
import torch

from . import cusparselt as _cusparselt
from .reference import cat_gelu_tanh_reference, qk_norm_rope_reference, qk_norm_rope_split_reference

HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)


def _define_ops():
    if _cusparselt.op_defined("qk_norm_rope"):
        return
    lib = torch.library.Library("rt_lynx", "FRAGMENT")
    lib.define("qk_norm_rope(Tensor qkv_a, Tensor q_weight_a, Tensor k_weight_a, Tensor? qkv_b, Tensor? q_weight_b, "
               "Tensor? k_weight_b, Tensor pe, int heads, float eps) -> (Tensor, Tensor, Tensor)")

    lib.define("qk_norm_rope_qk(Tensor qkv, Tensor q_weight, Tensor k_weight, Tensor pe, int heads, float eps) "
               "-> (Tensor, Tensor)")

    lib.define("qk_norm_rope_split(Tensor q_a, Tensor k_a, Tensor v_a, Tensor q_weight_a, Tensor k_weight_a, "
               "Tensor? q_b, Tensor? k_b, Tensor? v_b, Tensor? q_weight_b, Tensor? k_weight_b, Tensor pe, int heads, "
               "float eps) -> (Tensor, Tensor, Tensor)")

    lib.define("cat_gelu_tanh(Tensor a, Tensor b) -> Tensor")

    @torch.library.register_fake("rt_lynx::qk_norm_rope", lib=lib)
    def _(qkv_a, q_weight_a, k_weight_a, qkv_b, q_weight_b, k_weight_b, pe, heads, eps):
        tokens = qkv_a.shape[1] + (0 if qkv_b is None else qkv_b.shape[1])
        shape = (qkv_a.shape[0], heads, tokens, qkv_a.shape[2] // (3 * heads))
        return tuple(qkv_a.new_empty(shape) for _ in range(3))

    @torch.library.register_fake("rt_lynx::qk_norm_rope_qk", lib=lib)
    def _(qkv, q_weight, k_weight, pe, heads, eps):
        shape = (qkv.shape[0], heads, qkv.shape[1], qkv.shape[2] // (3 * heads))
        return qkv.new_empty(shape), qkv.new_empty(shape)

    @torch.library.register_fake("rt_lynx::qk_norm_rope_split", lib=lib)
    def _(q_a, k_a, v_a, q_weight_a, k_weight_a, q_b, k_b, v_b, q_weight_b, k_weight_b, pe, heads, eps):
        shape = (q_a.shape[0], q_a.shape[1] + (0 if q_b is None else q_b.shape[1]), q_a.shape[2])
        return tuple(q_a.new_empty(shape) for _ in range(3))

    @torch.library.register_fake("rt_lynx::cat_gelu_tanh", lib=lib)
    def _(a, b):
        return a.new_empty((a.shape[0], a.shape[1] + b.shape[1]))

    _define_ops.library = lib


_define_ops()


def heads_major_v(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """v of a FLUX qkv projection (batch, tokens, 3 * heads * head_dim) as (batch, heads, tokens,
    head_dim), a view: what ComfyUI's own FLUX blocks hand attention."""
    width = qkv.shape[-1] // 3
    return qkv[..., 2 * width:].unflatten(-1, (heads, width // heads)).transpose(1, 2)


def availability_block_ops(device: torch.device) -> tuple[bool, str]:
    """(True, info) when the fused block kernels run on `device` and match the reference. Cached;
    never raises."""
    return _availability(device)


def _check_device(index: int) -> tuple[bool, str]:
    capability = torch.cuda.get_device_capability(index)
    if capability != (9, 0):   # checked before building: the extension holds sm_90a code only
        return False, (f"{torch.cuda.get_device_name(index)} is sm_{capability[0]}{capability[1]}; the fused block "
                       f"kernels are built for Hopper (sm_90a)")
    return _cusparselt.checked_on_device(index, self_test_block_ops, "fused block kernels unavailable",
                                         "fused block kernels, self-test passed")


_availability = _cusparselt.PerDeviceCheck(_check_device)


def self_test_block_ops(device: torch.device) -> str:
    """'' when the ops match the reference (two streams, a strided one, batch 2, an fp32 and a
    16-bit RoPE table, both 16-bit dtypes; q and k alone of the strided stream; cat_gelu_tanh with a
    strided b); else the first problem, one line."""
    _cusparselt.extension()   # builds it first time; a build error is the problem reported
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
        fused = (qkv_a, weights[0], weights[1], qkv_b, weights[2], weights[3], pe, heads, 1e-6)
        split = (*qkv_a.chunk(3, dim=-1), weights[0], weights[1], *qkv_b.chunk(3, dim=-1), weights[2], weights[3],
                 pe.transpose(1, 2).to(dtype), heads, 1e-6)
        one_stream = (qkv_a, weights[0], weights[1], pe[:, :, :tokens_a], heads, 1e-6)
        q, k = torch.ops.rt_lynx.qk_norm_rope_qk(*one_stream)
        problem = _compare((q, k, heads_major_v(qkv_a, heads)),
                           qk_norm_rope_reference(qkv_a, weights[0], weights[1], None, None, None, *one_stream[3:]))
        if problem:
            return f"qk_norm_rope_qk ({dtype}): {problem}"
        for name, op, reference, args in (("qk_norm_rope", torch.ops.rt_lynx.qk_norm_rope, qk_norm_rope_reference,
                                           fused),
                                          ("qk_norm_rope_split", torch.ops.rt_lynx.qk_norm_rope_split,
                                           qk_norm_rope_split_reference, split)):
            problem = _compare(op(*args), reference(*args))
            if problem:
                return f"{name} ({dtype}): {problem}"
        joined = torch.ops.rt_lynx.cat_gelu_tanh(qkv_b[0, :tokens_a], qkv_a[0])   # b strided
        problem = _compare((joined,), (cat_gelu_tanh_reference(qkv_b[0, :tokens_a], qkv_a[0]),))
        if problem:
            return f"cat_gelu_tanh ({dtype}): {problem}"
    torch.cuda.synchronize(device)
    return ""


def _compare(got, want) -> str:
    for name, g, w in zip(("q", "k", "v") if len(got) == 3 else ("out",), got, want):
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"{name}: {tuple(g.shape)} {g.dtype}, expected {tuple(w.shape)} {w.dtype}"
        if not torch.allclose(g.float(), w.float(), rtol=2e-2, atol=2e-2):
            return f"{name} differs from the reference: max {(g.float() - w.float()).abs().max():.3g}"
    return ""


def supports_cat_gelu_tanh(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, str]:
    """Whether cat_gelu_tanh takes (a, b), 2-D with the same rows (the op copies misaligned rows)."""
    if a.dtype not in SUPPORTED_DTYPES or b.dtype != a.dtype:
        return False, f"dtypes {a.dtype}, {b.dtype} (one of bfloat16/float16)"
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        return False, "a and b must be 2-D with the same rows"
    if a.shape[1] % 8 or b.shape[1] % 8 or not (a.shape[1] and b.shape[1]):
        return False, f"widths {a.shape[1]}, {b.shape[1]} (positive multiples of 8)"
    return True, ""


def supports_qk_norm_rope(projection: torch.Tensor, head_dim: int, pe: torch.Tensor) -> tuple[bool, str]:
    """Whether the fused kernels take a projection (its dtype) with this head size and RoPE table
    (the ops check the rest and say why)."""
    if projection.dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {projection.dtype} (bfloat16/float16 only)"
    if head_dim not in HEAD_DIMS:
        return False, f"head_dim {head_dim} (one of {HEAD_DIMS})"
    if pe.dtype not in (torch.float32, projection.dtype) or pe.dim() != 6:
        return False, f"pe {pe.dtype} of {pe.dim()} dims (fp32 or the projection's dtype, 6 dims expected)"
    return True, ""
