"""The numerics of RT-Lynx, written plainly in PyTorch.

This file is the single definition of what the fast kernels compute; every kernel is tested
against it. It runs on any device and dtype and is traceable by torch.compile (no data-dependent
control flow), so on GPUs without a fast kernel Inductor can still fuse the sparsify pass.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def check_nm(n: int, m: int) -> None:
    if not (0 < n < m):
        raise ValueError(f"N:M sparsity needs 0 < n < m, got {n}:{m}")


def keep_mask_nm(x: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Boolean mask keeping, in each group of m consecutive entries of the last dim, the n of
    largest magnitude. Ties go to the lower index, so the mask is deterministic (all-zero groups
    keep their first n entries, which changes nothing numerically).

    Max/compare formulation: an entry is kept when fewer than n entries of its group beat it,
    where j beats i if |x_j| > |x_i|, or |x_j| == |x_i| and j < i. m passes of elementwise
    compares; no topk, sort or scatter.
    """
    check_nm(n, m)
    k = x.shape[-1]
    if k % m:
        raise ValueError(f"last dim {k} is not a multiple of m={m}")
    mag = x.abs().reshape(*x.shape[:-1], k // m, m)
    beaten_by = torch.zeros(mag.shape, dtype=torch.int8, device=x.device)
    position = torch.arange(m, device=x.device)
    for j in range(m):
        other = mag[..., j:j + 1]
        beaten_by += (other > mag) | ((other == mag) & (position > j))
    return (beaten_by < n).reshape(x.shape)


def sparsify_nm(x: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Zero all but the n largest-magnitude entries of each group of m along the last dim."""
    return torch.where(keep_mask_nm(x, n, m), x, torch.zeros((), dtype=x.dtype, device=x.device))


def norm_compensation_scale(x: torch.Tensor, x_kept: torch.Tensor) -> torch.Tensor:
    """Per-token scale s = ||x|| / ||x_kept|| (fp32, shape x.shape[:-1] + (1,)).

    s * x_kept has the dense token's L2 norm. A token whose kept part is all zero (so the whole
    token is zero, since the largest entries are kept) gets s = 1 instead of 0/0.
    """
    dense_sq = x.float().square().sum(-1, keepdim=True)
    kept_sq = x_kept.float().square().sum(-1, keepdim=True)
    safe_kept = torch.where(kept_sq > 0, kept_sq, torch.ones_like(kept_sq))
    return torch.where(kept_sq > 0, torch.sqrt(dense_sq / safe_kept), torch.ones_like(kept_sq))


def sparse_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            compensate: bool, n: int = 2, m: int = 4) -> torch.Tensor:
    """y = s * (sparse(x) @ W^T) + b, the product in x's dtype, scale and bias applied in fp32.

    The scale is applied after the product (it is per token, so it commutes with the GEMM);
    that is also where the fast kernels apply it.
    """
    x_kept = sparsify_nm(x, n, m)
    y = F.linear(x_kept, weight)
    if not compensate and bias is None:
        return y
    y = y.float()
    if compensate:
        y = y * norm_compensation_scale(x, x_kept)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def modulated_layer_norm_reference(x2d: torch.Tensor, shift: torch.Tensor, scale1p: torch.Tensor, tokens: int,
                                   eps: float) -> torch.Tensor:
    """The input a DiT block hands the linear after a LayerNorm: x2d ((images * tokens) x K)
    layer-normalised without affine, in x's dtype as the model's LayerNorm writes it, then
    modulated per image, xn * scale1p + shift (torch.addcmul: one rounding), with shift and
    scale1p (= 1 + scale) images x K. The sm90 backend computes this inside its sparsify pass."""
    k = x2d.shape[-1]
    normed = F.layer_norm(x2d, (k,), eps=eps).reshape(shift.shape[0], tokens, k)
    return torch.addcmul(shift[:, None], normed, scale1p[:, None]).reshape(-1, k)


def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    """The MLP activation of FLUX's and Qwen-Image's blocks before their down projection: GELU with
    the tanh approximation, in x's dtype. The sm90 backend computes it inside the down
    projection's sparsify pass."""
    return F.gelu(x, approximate="tanh")


def cat_gelu_tanh_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cat((a, gelu_tanh(b)), -1): FLUX's single-block linear2 input from its attention output a
    and its MLP's up projection b."""
    return torch.cat((a, gelu_tanh_reference(b)), -1)


@dataclass(frozen=True, eq=False)   # holds tensors: identity, not element-wise ==
class LowRankOperands:
    """The Lynx LoRA branch as the kernels take it, on the compute device and dtype:
    y += up(down(x)) * scale, on the dense x. `up_k_extension` is the sm90 GEMM's form of
    scale * up (sm90.k_extension_up), present where that backend runs the branch inside its GEMM."""
    down: torch.Tensor                           # (rank, in_features)
    up: torch.Tensor                             # (out_features, rank)
    scale: float
    up_k_extension: torch.Tensor | None = None   # (out_features, 2 * rank rounded up to 8)


def low_rank_reference(x: torch.Tensor, low_rank: LowRankOperands) -> torch.Tensor:
    """up(down(x)) * scale: two small products on the dense input."""
    return F.linear(F.linear(x, low_rank.down), low_rank.up) * low_rank.scale


@dataclass(frozen=True, eq=False)   # holds tensors: identity, not element-wise ==
class GatedResidual:
    """A DiT block's gated residual around one of its linears: out = residual + gate * y, as the
    block's addcmul computes it. residual is shaped as y (images, tokens, out_features), gate holds one
    row per image (images, 1, out_features), as FLUX's and Qwen-Image's modulations hold it."""
    residual: torch.Tensor
    gate: torch.Tensor


def gated_residual_reference(y: torch.Tensor, gated: GatedResidual) -> torch.Tensor:
    """residual + gate * y, shaped as y (2-D y: the rows of the residual's images in order)."""
    return torch.addcmul(gated.residual, gated.gate, y.reshape(gated.residual.shape)).reshape(y.shape)


# ---- fp8 e4m3 path (W8A8 with 2:4 activations) ----
E4M3_MAX = 448.0


def quantize_weight_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(wq, w_scale): per-output-channel e4m3 weight, wq[n] = e4m3(W[n] * 448 / max|W[n]|) and
    w_scale[n] = max|W[n]| / 448 (fp32), so W ~ wq * w_scale[:, None]. Run once per weight and
    cache the result (an all-zero row gets scale 0)."""
    wq, amax = _quantize_rows_e4m3(weight)
    amax = amax.reshape(-1)
    return wq.contiguous(), (amax / _e4m3_max_like(amax)).contiguous()


def _e4m3_max_like(t: torch.Tensor) -> torch.Tensor:
    # A tensor, not a Python float: torch computes `float / t` as reciprocal(t) * float and, on
    # CUDA, `t / float` as t * (1 / float) (two roundings each); tensor / tensor rounds once,
    # as the kernels do, so the quantised values match them bit for bit.
    return torch.full_like(t, E4M3_MAX)


def _quantize_rows_e4m3(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, amax): q = e4m3(values * 448 / max|values|) per row, amax = max|values| (fp32, M x 1).
    A zero row gets q = 0."""
    values = values.float()
    amax = values.abs().amax(dim=-1, keepdim=True)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    # Capped at the fp32 maximum: a row whose max is below 448 / that (16-bit subnormals) would
    # get inf, and a zero entry times inf is NaN.
    inv = torch.where(amax > 0, (_e4m3_max_like(amax) / safe).clamp(max=torch.finfo(torch.float32).max),
                      torch.zeros_like(amax))
    return (values * inv).to(torch.float8_e4m3fn), amax


def sparsify_quantize_fp8(x: torch.Tensor, compensate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, a): q = e4m3(x_kept * 448 / max|x_kept|) per token (dense M x K with zeros where
    pruned), a = s * max|x_kept| / 448 (fp32, M x 1), s the norm compensation (1 if off).
    This is e4m3(s * x_kept / a): s cancels in q and lives in a. A zero token gets q = 0, a = 0."""
    x_kept = sparsify_nm(x)
    q, amax = _quantize_rows_e4m3(x_kept)
    s = norm_compensation_scale(x, x_kept) if compensate else torch.ones_like(amax)
    return q, (s * amax) / _e4m3_max_like(amax)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, a) for a layer kept dense in an fp8 model: q = e4m3(x * 448 / max|x|) per token,
    a = max|x| / 448 (fp32, M x 1); x ~ q * a."""
    q, amax = _quantize_rows_e4m3(x)
    return q, amax / _e4m3_max_like(amax)


def sparse_linear_fp8_reference(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                                bias: torch.Tensor | None, compensate: bool) -> torch.Tensor:
    """y = a[m] * w_scale[n] * (q @ wq^T) + b with q, a from `sparsify_quantize_fp8`, all in
    fp32 (the quantised inputs are exact; only the fp32 accumulation rounds); x's dtype out."""
    q, a = sparsify_quantize_fp8(x, compensate)
    return _scaled_product_fp8(q, a, wq, w_scale, bias).to(x.dtype)


def dense_linear_fp8_reference(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                               bias: torch.Tensor | None) -> torch.Tensor:
    """y = a[m] * w_scale[n] * (q @ wq^T) + b with q, a from `quantize_rows_fp8` (no sparsity),
    in fp32; x's dtype out. What the layers an fp8 model keeps dense compute."""
    q, a = quantize_rows_fp8(x)
    return _scaled_product_fp8(q, a, wq, w_scale, bias).to(x.dtype)


# The fp32 copy of an e4m3 weight is made this many elements at a time: a model's modulation linears
# as one weight (FLUX.1: 3.2 G) would otherwise take four times its bytes at once.
E4M3_WEIGHT_CHUNK_ELEMENTS = 1 << 26


def linear_e4m3_weight_reference(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                                 bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ (wq * w_scale[:, None])^T + b in fp32, x's dtype out: an e4m3 weight (from
    `quantize_weight_fp8`), x unquantised. What the per-image linears (modulation) of an fp8 model
    compute."""
    rows = max(1, E4M3_WEIGHT_CHUNK_ELEMENTS // max(wq.shape[1], 1))
    if wq.shape[0] <= rows:
        y = x.float() @ wq.float().t()
    else:
        y = torch.cat([x.float() @ part.float().t() for part in wq.split(rows)], dim=-1)
    y = y * w_scale.float()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def _scaled_product_fp8(q, a, wq, w_scale, bias) -> torch.Tensor:
    # The quantised operands are exact in fp32; only the accumulation rounds.
    y = (q.float() @ wq.float().t()) * a * w_scale.float()
    return y if bias is None else y + bias.float()


def qk_norm_rope_reference(qkv_a: torch.Tensor, q_weight_a: torch.Tensor, k_weight_a: torch.Tensor,
                           qkv_b: torch.Tensor | None, q_weight_b: torch.Tensor | None,
                           k_weight_b: torch.Tensor | None, pe: torch.Tensor, heads: int,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FLUX's attention inputs from its qkv projections (batch, tokens, 3 * heads * head_dim), q, k
    and v side by side: q and k RMS-normalised per head with their stream's weight (stream b's
    tokens follow stream a's), then rotated by pe (batch or 1, 1, tokens, head_dim / 2, 2, 2):
    out[2i + j] = pe[i, j, 0] * x[2i] + pe[i, j, 1] * x[2i + 1], computed in pe's dtype. Returns
    q, k, v as (batch, heads, tokens, head_dim) in the qkv dtype. The same operations, in the same
    order and precision, as ComfyUI's FLUX blocks (QKNorm, then the RoPE of flux.math.attention)."""
    streams = [(qkv_a, q_weight_a, k_weight_a)] + ([] if qkv_b is None else [(qkv_b, q_weight_b, k_weight_b)])
    q, k, v = _normed_heads([(*qkv.chunk(3, dim=-1), q_weight, k_weight) for qkv, q_weight, k_weight in streams],
                            heads, eps)
    table = pe.reshape(pe.shape[0], 1, -1, *pe.shape[3:])
    return tuple(t.transpose(1, 2).contiguous() for t in (_rope_reference(q, table.transpose(1, 2)),
                                                          _rope_reference(k, table.transpose(1, 2)), v))


def qk_norm_rope_split_reference(q_a: torch.Tensor, k_a: torch.Tensor, v_a: torch.Tensor, q_weight_a: torch.Tensor,
                                 k_weight_a: torch.Tensor, q_b: torch.Tensor | None, k_b: torch.Tensor | None,
                                 v_b: torch.Tensor | None, q_weight_b: torch.Tensor | None,
                                 k_weight_b: torch.Tensor | None, pe: torch.Tensor, heads: int,
                                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qk_norm_rope_reference for Qwen-Image's separate q, k, v projections (batch, tokens,
    heads * head_dim each), with pe (batch or 1, tokens, 1, head_dim / 2, 2, 2), returning q, k, v
    in the same token-major layout: ComfyUI's Qwen-Image attention (norm_q / norm_k /
    norm_added_q / norm_added_k, concatenation text first, apply_rotary_emb in pe's dtype)."""
    streams = [(q_a, k_a, v_a, q_weight_a, k_weight_a)]
    if q_b is not None:
        streams.append((q_b, k_b, v_b, q_weight_b, k_weight_b))
    q, k, v = _normed_heads(streams, heads, eps)
    table = pe.reshape(pe.shape[0], -1, 1, *pe.shape[3:])
    return _rope_reference(q, table).flatten(2), _rope_reference(k, table).flatten(2), v.flatten(2)


def _normed_heads(streams, heads: int, eps: float):
    """Each stream's q, k, v as (batch, tokens, heads, head_dim), q and k RMS-normalised with the
    stream's weights, the streams concatenated along the tokens."""
    qs, ks, vs = [], [], []
    for q, k, v, q_weight, k_weight in streams:
        q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
        qs.append(F.rms_norm(q, q.shape[-1:], weight=q_weight.to(q.dtype), eps=eps))
        ks.append(F.rms_norm(k, k.shape[-1:], weight=k_weight.to(k.dtype), eps=eps))
        vs.append(v)
    return tuple(torch.cat(t, dim=1) for t in (qs, ks, vs))


def _rope_reference(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    # In pe's dtype: fp32 (FLUX's table, x converted first) or x's own (Qwen-Image's, each op rounded).
    pairs = x.to(pe.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    return (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).reshape(x.shape).to(x.dtype)
