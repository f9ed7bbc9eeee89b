"""FP8 (e4m3) Lynx linear on Hopper: 2:4 activations quantised per token, weights per channel.

Computes `reference.sparse_linear_fp8_reference` as separate custom ops (the 16-bit path in
cusparselt.py is untouched):

  torch.ops.rt_lynx.sparse_linear_fp8(x, wq, w_scale, bias, compensate) -> y   (M x N, x's dtype)
  torch.ops.rt_lynx.sparsify_fp8(x, m_padded, compensate, split) -> (compressed uint8, a fp32)
  torch.ops.rt_lynx.sparse_mm_fp8(compressed, wq, m_padded) -> D (m_padded x N, bf16)
  torch.ops.rt_lynx.fp8_epilogue(d, a, w_scale, bias, rows, out_dtype) -> y

One sparsify pass writes q = e4m3(x_kept * 448 / max|x_kept|) in cuSPARSELt's e4m3 compressed
layout and a = s * max|x_kept| / 448 per token; cuSPARSELt multiplies q by wq (e4m3, from
`quantize_weight_fp8`, computed once per weight) with fp32 accumulation into bf16 D; one epilogue
pass applies a[m] * w_scale[n] and the bias. cuSPARSELt cannot take the scales itself: a vector
alpha is refused for fp8 on the H100, and its bias is per token.
"""

import torch

from . import cusparselt as _cusparselt
from .reference import (quantize_weight_fp8, sparse_linear_fp8_reference,
                        sparsify_quantize_fp8)

N_MULTIPLE = 32   # conservative for 8-bit cuSPARSELt operands; only multiples of 32 were run
SUPPORTED_DTYPES = _cusparselt.SUPPORTED_DTYPES
SELF_TEST_TOLERANCE = 1e-2

__all__ = ["quantize_weight_fp8", "supports_fp8", "sparse_linear_fp8", "availability_fp8",
           "fp8_compressed_bytes", "self_test_fp8"]


def fp8_compressed_bytes(m_padded: int, k: int) -> int:
    """Bytes of a compressed e4m3 m_padded x k matrix: m*k/2 values + m*k/8 metadata."""
    return m_padded * k * 5 // 8


def _define_ops():
    if _cusparselt.op_defined("sparse_linear_fp8"):
        return
    lib = torch.library.Library("rt_lynx", "FRAGMENT")
    lib.define("sparsify_fp8(Tensor x, int m_padded, bool compensate, int split=0) -> (Tensor, Tensor)")
    lib.define("sparse_mm_fp8(Tensor compressed, Tensor wq, int m_padded) -> Tensor")
    lib.define("sparse_linear_fp8(Tensor x, Tensor wq, Tensor w_scale, Tensor? bias, bool compensate) -> Tensor")
    lib.define("fp8_epilogue(Tensor d, Tensor token_scale, Tensor w_scale, Tensor? bias, int rows, "
               "ScalarType out_dtype) -> Tensor")

    @torch.library.register_fake("rt_lynx::sparsify_fp8", lib=lib)
    def _(x, m_padded, compensate, split=0):
        return (x.new_empty((fp8_compressed_bytes(m_padded, x.shape[1]),), dtype=torch.uint8),
                x.new_empty((m_padded,), dtype=torch.float32))

    @torch.library.register_fake("rt_lynx::sparse_mm_fp8", lib=lib)
    def _(compressed, wq, m_padded):
        return compressed.new_empty((m_padded, wq.shape[0]), dtype=torch.bfloat16)

    @torch.library.register_fake("rt_lynx::sparse_linear_fp8", lib=lib)
    def _(x, wq, w_scale, bias, compensate):
        return x.new_empty((x.shape[0], wq.shape[0]))

    @torch.library.register_fake("rt_lynx::fp8_epilogue", lib=lib)
    def _(d, token_scale, w_scale, bias, rows, out_dtype):
        return d.new_empty((rows, d.shape[1]), dtype=out_dtype)

    _define_ops.library = lib


_define_ops()

def availability_fp8(device: torch.device) -> tuple[bool, str]:
    """(True, info) when the fp8 path works on `device` (16-bit fast path available, e4m3 layout
    byte-exact against cuSPARSELt, product matches the reference). Cached; never raises."""
    return _availability(device)


def _check_device(index: int) -> tuple[bool, str]:
    module = _cusparselt.extension()
    device = torch.device("cuda", index)
    problems = []
    with torch.cuda.device(index):
        # Operand A first (what torch._cslt_sparse_mm uses for fp8), then B.
        for operand in ("A", "B"):
            module.set_fp8_sparse_b(operand == "B")
            try:
                problem = self_test_fp8(device)
            except Exception as exc:
                problem = _cusparselt.self_test_error(exc)
            if not problem:
                how = f"e4m3 structured operand {operand}, self-test passed"
                if problems:
                    how += f" (operand A: {problems[0]})"
                return True, how
            problems.append(problem)
    module.set_fp8_sparse_b(False)
    return False, "fp8 path unavailable: " + "; ".join(problems)


_availability = _cusparselt.PerDeviceCheck(_check_device, _cusparselt.availability)


def _first_difference(ours: torch.Tensor, want: torch.Tensor, values_bytes: int) -> str:
    # cuSPARSELt may append padding after the metadata: compare our bytes, need no more.
    if want.numel() < ours.numel():
        return f"size {want.numel()} bytes < ours {ours.numel()}"
    want = want[: ours.numel()]
    if torch.equal(ours, want):
        return ""
    first = int((ours != want).nonzero()[0])
    return f"first difference in {'values' if first < values_bytes else 'metadata'} at byte {first}"


def self_test_fp8(device: torch.device) -> str:
    """'' when our e4m3 compressed buffer equals torch._cslt_compress and cuSPARSELt's own
    compression (orientation in use) of the reference's quantised matrix, the per-token scales
    match, and sparse_linear_fp8 matches the fp8 reference; else the first problem, one line."""
    module = _cusparselt.extension()
    sparse_b = bool(module.fp8_sparse_b())
    generator = torch.Generator(device=device).manual_seed(4321)
    rows, k, n = 128, 256, 64
    for dtype in SUPPORTED_DTYPES:
        # No zeros: for a group with zeros cuSPARSELt may store other (equally valid) positions.
        x = torch.randn(rows, k, generator=generator, device=device).to(dtype)
        x = torch.where(x == 0, torch.ones((), dtype=dtype, device=device), x)
        compressed, scale = torch.ops.rt_lynx.sparsify_fp8(x, rows, True, 0)
        q, a = sparsify_quantize_fp8(x, True)
        values_bytes = rows * k // 2
        difference = _first_difference(compressed, torch._cslt_compress(q).reshape(-1).view(torch.uint8),
                                       values_bytes)
        if difference:
            return f"e4m3 layout differs from torch._cslt_compress ({dtype}, {difference})"
        own = module.compress_reference(q, sparse_b)
        difference = _first_difference(compressed, own, values_bytes)
        if difference:
            return (f"e4m3 layout differs from cuSPARSELt's compression as operand "
                    f"{'B' if sparse_b else 'A'} ({dtype}, {difference})")
        scale_error = ((scale[:rows] - a.reshape(-1)).abs() / a.reshape(-1).abs()).max().item()
        if not scale_error < 1e-5:
            return f"per-token scale differs from the reference ({dtype}): {scale_error:.1e}"
        weight = torch.randn(n, k, generator=generator, device=device)
        wq, w_scale = quantize_weight_fp8(weight)
        bias = torch.randn(n, generator=generator, device=device).to(dtype)
        for m in (rows, 37):  # a padded M too
            xm = x[:m].contiguous()
            got = torch.ops.rt_lynx.sparse_linear_fp8(xm, wq, w_scale, bias, True)
            want = sparse_linear_fp8_reference(xm.float(), wq, w_scale, bias.float(), True)
            error = ((got.float() - want).norm() / want.norm()).item()
            if not error < SELF_TEST_TOLERANCE:
                return f"fp8 GEMM check failed ({dtype}, M={m}): relative error {error:.2e}"
    torch.cuda.synchronize(device)
    return ""


def fp8_operand() -> str:
    """'B' or 'A': the structured operand the fp8 GEMM uses."""
    return "B" if _cusparselt.extension().fp8_sparse_b() else "A"


def set_fp8_operand(operand: str) -> None:
    """Switch the fp8 orientation (tests and benchmarks). Process-wide."""
    if operand not in ("A", "B"):
        raise ValueError(f"operand must be 'A' or 'B', got {operand!r}")
    _cusparselt.extension().set_fp8_sparse_b(operand == "B")


def supports_fp8(x2d: torch.Tensor, wq: torch.Tensor) -> tuple[bool, str]:
    """Whether (x2d, wq) fit the fp8 path's constraints (wq from quantize_weight_fp8). Never raises."""
    return _cusparselt.check_operands(x2d, wq, torch.float8_e4m3fn, " (use quantize_weight_fp8)", N_MULTIPLE)


def sparse_linear_fp8(x2d: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None, compensate: bool) -> torch.Tensor:
    """a[m] * w_scale[n] * (e4m3 2:4 x) @ wq^T + bias on sparse fp8 tensor cores; M x N in x's
    dtype. (wq, w_scale) = quantize_weight_fp8(W), cached by the caller. Call availability_fp8
    and supports_fp8 first; inputs the kernels cannot take raise a RuntimeError."""
    return torch.ops.rt_lynx.sparse_linear_fp8(x2d, wq, w_scale, bias, bool(compensate))
