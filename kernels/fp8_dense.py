"""FP8 (e4m3) dense linear on Hopper, for the layers an fp8 model keeps dense (not sparsified).

Computes `reference.dense_linear_fp8_reference` in two kernels:

  torch.ops.rt_lynx.quantize_rows_fp8(x, gelu_tail=None) -> (q, a)
                                                     one read of x: q = e4m3(x * 448 / max|x|) per
                                                     token (M x K), a = max|x| / 448 (fp32, M x 1);
                                                     with gelu_tail the rows are
                                                     cat((x, gelu_tanh(gelu_tail)), -1), never written
  torch._scaled_mm(q, wq^T, scale_a=a, scale_b=w_scale, bias)   dense e4m3 tensor cores, row-wise
                                                     scales and the bias in torch's GEMM epilogue,
                                                     summing in the tensor cores (FAST_ACCUMULATION)

(wq, w_scale) come from `quantize_weight_fp8`, once per weight. torch's row-wise scaled GEMM
writes bf16; an fp16 model gets that cast to fp16 (one pass over y).
A block's gated residual after the layer, residual + gate * y (bf16, one image's gate), goes into
the GEMM's epilogue instead of a pass over y (torch's op takes no C, so cuBLASLt is called directly;
csrc/e4m3_gemm_residual.cpp):
  torch.ops.rt_lynx.scaled_mm_residual(q, a, wq, gate * w_scale, gate * bias, residual, fast_accumulation)

The per-image linears of an fp8 model (block modulations: one or two input rows per step) read
their e4m3 weight once and keep x in 16 bits, `reference.linear_e4m3_weight_reference`:

  torch.ops.rt_lynx.linear_e4m3_weight(x, wq, w_scale, bias) -> y   one kernel (csrc/e4m3_weight_gemv.cu)
                                                     for 1-8 rows (more: one launch per 8): a read
                                                     of the weight at half the bytes of the 16-bit one
"""
import torch

from . import cusparselt as _cusparselt
from .reference import (cat_gelu_tanh_reference, dense_linear_fp8_reference, linear_e4m3_weight_reference,
                        quantize_rows_fp8, quantize_weight_fp8)

K_MULTIPLE = 16        # torch._scaled_mm's e4m3 operands
N_MULTIPLE = 16
MAX_IN_FEATURES = 32768   # the quantise pass holds a row in one block's registers (kQuantizeMaxCols)
SELF_TEST_TOLERANCE = 1e-2
# torch's row-wise GEMM on Hopper (cuBLASLt's outer-vector-scaled kernels in torch 2.11) moves the
# MMA sums into fp32 registers every few k-steps unless told otherwise. Left in the tensor cores'
# accumulator (use_fast_accum; the sparse e4m3 GEMM's CUTLASS schedule does the same) the sums keep
# fewer bits, still far more than the operands' 3-bit mantissas, and the MMAs issue back to back:
# 1.16x faster on FLUX's shapes, 1.25x on Qwen-Image's (H100; bench/kernels.py --fp8 times both,
# fp8d gemm / promoting), 2.7e-3 at most from the fp8 reference (1.7e-3 promoting; tests: 5e-3).
FAST_ACCUMULATION = True
# Below this many rows the weight read bounds the GEMM, so the fast accumulation gains nothing there,
# and cuBLASLt has no fast-accumulating algorithm for some such shapes (1 x 15360 -> 3072 on an H100:
# CUBLAS_STATUS_NOT_SUPPORTED). Fewer rows promote.
FAST_ACCUMULATION_MIN_ROWS = 64
GEMV_MAX_ROWS = 8                 # kGemvMaxRows: x is held in shared memory,
GEMV_MAX_SHARED_BYTES = 48 * 1024  # kGemvMaxSharedBytes, 16-bit values


def _define_ops():
    if _cusparselt.op_defined("quantize_rows_fp8"):
        return
    lib = torch.library.Library("rt_lynx", "FRAGMENT")
    lib.define("quantize_rows_fp8(Tensor x, Tensor? gelu_tail=None) -> (Tensor, Tensor)")

    @torch.library.register_fake("rt_lynx::quantize_rows_fp8", lib=lib)
    def _(x, gelu_tail=None):
        columns = x.shape[1] + (0 if gelu_tail is None else gelu_tail.shape[1])
        return (x.new_empty((x.shape[0], columns), dtype=torch.float8_e4m3fn),
                x.new_empty((x.shape[0], 1), dtype=torch.float32))

    lib.define("scaled_mm_residual(Tensor q, Tensor a, Tensor wq, Tensor w_scale, Tensor? bias, Tensor residual, "
               "bool fast_accumulation) -> Tensor")

    @torch.library.register_fake("rt_lynx::scaled_mm_residual", lib=lib)
    def _(q, a, wq, w_scale, bias, residual, fast_accumulation):
        return torch.empty_like(residual)

    lib.define("linear_e4m3_weight(Tensor x, Tensor wq, Tensor w_scale, Tensor? bias) -> Tensor")

    @torch.library.register_fake("rt_lynx::linear_e4m3_weight", lib=lib)
    def _(x, wq, w_scale, bias):
        return x.new_empty((x.shape[0], wq.shape[0]))

    _define_ops.library = lib


_define_ops()


def availability_fp8_dense(device: torch.device) -> tuple[bool, str]:
    """(True, info) when the fp8 dense linear works on `device` (the extension on Hopper, the
    quantise pass bit-exact against the reference, torch's row-wise scaled GEMM within tolerance).
    Cached; never raises."""
    return _availability(device)


def _check_device(index: int) -> tuple[bool, str]:
    return _cusparselt.checked_on_device(index, self_test_fp8_dense, "fp8 dense path unavailable",
                                         "e4m3 row quantisation + torch._scaled_mm row-wise, self-test passed")


_availability = _cusparselt.PerDeviceCheck(_check_device, _cusparselt.availability)


def availability_residual_epilogue(device: torch.device) -> tuple[bool, str]:
    """(True, info) when the dense e4m3 GEMM adds a residual in its epilogue on `device` (cuBLASLt
    takes the row-wise scaled GEMM with C; checked against the product then the sum). Cached."""
    return _residual_availability(device)


def _check_residual_device(index: int) -> tuple[bool, str]:
    return _cusparselt.checked_on_device(index, self_test_residual_epilogue, "residual epilogue unavailable",
                                         "cuBLASLt row-wise scaled e4m3 GEMM with a residual, self-test passed")


def self_test_residual_epilogue(device: torch.device) -> str:
    """'' when the GEMM with a residual and a gate matches the product followed by the gated sum."""
    generator = torch.Generator(device=device).manual_seed(2468)
    rows, k, n = 37, 3072, 64
    x = torch.randn(rows, k, generator=generator, device=device).to(torch.bfloat16)
    wq, w_scale = quantize_weight_fp8(torch.randn(n, k, generator=generator, device=device))
    bias = torch.randn(n, generator=generator, device=device).to(torch.bfloat16)
    residual = torch.randn(rows, n, generator=generator, device=device).to(torch.bfloat16) * 3
    gate = torch.randn(n, generator=generator, device=device).to(torch.bfloat16)
    want = residual.float() + gate.float() * dense_linear_fp8(x, wq, w_scale, bias).float()
    got = dense_linear_fp8(x, wq, w_scale, bias, residual=residual, gate=gate)
    error = ((got.float() - want).norm() / want.norm()).item()
    torch.cuda.synchronize(device)
    if got.dtype != torch.bfloat16 or not error < SELF_TEST_TOLERANCE:
        return f"the GEMM with a residual is {error:.2e} from the product then the sum"
    return ""


_residual_availability = _cusparselt.PerDeviceCheck(_check_residual_device, availability_fp8_dense)


def self_test_fp8_dense(device: torch.device) -> str:
    """'' when the quantise pass equals the reference bit for bit (with a GELU tail nearly: its GELU
    is torch's math in another kernel, a rounding apart at worst) and the product matches the
    reference (odd row count, bias, both 16-bit dtypes); else the first problem, one line."""
    generator = torch.Generator(device=device).manual_seed(1357)
    rows, k, n = 37, 3072, 64   # 3072: two warps share a row's max
    for dtype in _cusparselt.SUPPORTED_DTYPES:
        x = torch.randn(rows, k, generator=generator, device=device).to(dtype)
        x[3] = 0  # a zero token: scale 0, q 0
        q, a = torch.ops.rt_lynx.quantize_rows_fp8(x)
        want_q, want_a = quantize_rows_fp8(x)
        if not (torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(a, want_a)):
            return f"quantise pass differs from the reference ({dtype})"
        tail = torch.randn(rows, 2 * k + 64, generator=generator, device=device).to(dtype)[:, 64:]   # strided
        q, a = torch.ops.rt_lynx.quantize_rows_fp8(x, tail)
        want_q, want_a = quantize_rows_fp8(cat_gelu_tanh_reference(x, tail))
        codes_differ = (q.view(torch.uint8) != want_q.view(torch.uint8)).float().mean().item()
        if q.shape != want_q.shape or codes_differ > 1e-3 or not torch.allclose(a, want_a, rtol=1e-2, atol=0):
            return f"quantise pass with a GELU tail differs from the reference ({dtype}; {codes_differ:.1e} of codes)"
        weight = torch.randn(n, k, generator=generator, device=device)
        wq, w_scale = quantize_weight_fp8(weight)
        bias = torch.randn(n, generator=generator, device=device).to(dtype)
        got = dense_linear_fp8(x, wq, w_scale, bias)
        want = dense_linear_fp8_reference(x.float(), wq, w_scale, bias.float())
        error = ((got.float() - want).norm() / want.norm()).item()
        if got.dtype != dtype or not error < SELF_TEST_TOLERANCE:
            return f"fp8 dense GEMM check failed ({dtype}): relative error {error:.2e}, out {got.dtype}"
        for image_rows in (1, 3, GEMV_MAX_ROWS + 3):   # one launch, and two; an odd channel count; bias or none
            for with_bias in (bias[: n - 7], None):
                got = linear_e4m3_weight(x[:image_rows], wq[: n - 7], w_scale[: n - 7], with_bias)
                want = linear_e4m3_weight_reference(x[:image_rows].float(), wq[: n - 7], w_scale[: n - 7],
                                                    None if with_bias is None else with_bias.float())
                if got.dtype != dtype or not torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max()):
                    return f"e4m3-weight linear of {image_rows} rows differs from the reference ({dtype})"
    torch.cuda.synchronize(device)
    return ""


def supports_fp8_dense(x2d: torch.Tensor, wq: torch.Tensor,
                       gelu_tail: torch.Tensor | None = None) -> tuple[bool, str]:
    """Whether (x2d, wq) fit the fp8 dense path (wq from quantize_weight_fp8), x2d followed by
    gelu_tanh(gelu_tail)'s columns when given. Never raises."""
    tail_columns = 0
    if gelu_tail is not None:
        if (gelu_tail.dim() != 2 or gelu_tail.shape[0] != x2d.shape[0] or gelu_tail.dtype != x2d.dtype
                or gelu_tail.device != x2d.device):
            return False, "the GELU tail must be 2-D, with x's rows, dtype and device"
        if gelu_tail.stride(1) != 1 or gelu_tail.shape[1] % K_MULTIPLE:
            return False, f"the GELU tail's rows must be dense, its width a multiple of {K_MULTIPLE}"
        tail_columns = gelu_tail.shape[1]
    supported, why_not = _cusparselt.check_operands(x2d, wq, torch.float8_e4m3fn, " (use quantize_weight_fp8)",
                                                    N_MULTIPLE, K_MULTIPLE, tail_columns)
    in_features = x2d.shape[1] + tail_columns
    if supported and in_features > MAX_IN_FEATURES:
        return False, f"in_features {in_features} > {MAX_IN_FEATURES} (the quantise pass holds a row in registers)"
    return supported, why_not


def supports_quantize_rows(x2d: torch.Tensor) -> tuple[bool, str]:
    """Whether the quantise pass reads x2d's rows as they are (16-bit values, rows of a multiple of
    K_MULTIPLE of them, as the e4m3 GEMM reads its operands; contiguous, 16-byte aligned; at most
    MAX_IN_FEATURES). Never raises."""
    if x2d.dim() != 2 or x2d.dtype not in _cusparselt.SUPPORTED_DTYPES:
        return False, "the quantise pass takes 2-D bfloat16/float16 rows"
    if x2d.shape[1] % K_MULTIPLE or x2d.shape[1] > MAX_IN_FEATURES:
        return False, f"rows of {x2d.shape[1]} values: a multiple of {K_MULTIPLE}, at most {MAX_IN_FEATURES}"
    if not x2d.is_contiguous() or x2d.data_ptr() % 16:
        return False, "the quantise pass needs contiguous, 16-byte aligned rows"
    return True, ""


def supports_linear_e4m3_weight(x2d: torch.Tensor, wq: torch.Tensor) -> tuple[bool, str]:
    """Whether linear_e4m3_weight takes (x2d, wq): 16-bit x (any rows: the kernel takes them in
    chunks) whose row fits shared memory, a contiguous, 16-byte aligned e4m3 weight of x's columns
    (a multiple of 16). Never raises."""
    if x2d.dim() != 2 or x2d.shape[0] < 1:
        return False, f"x of shape {tuple(x2d.shape)} (2-D, at least one row)"
    k = x2d.shape[1]
    if x2d.dtype not in _cusparselt.SUPPORTED_DTYPES:
        return False, f"dtype {x2d.dtype} (bfloat16/float16)"
    # The address only in eager code (Dynamo cannot trace it; the op checks it again and raises).
    if (wq.dtype != torch.float8_e4m3fn or wq.dim() != 2 or wq.shape[1] != k or not wq.is_contiguous()
            or (not torch.compiler.is_compiling() and wq.data_ptr() % 16)):
        return False, "the weight must be a contiguous, 16-byte aligned e4m3 (out_features, in_features) tensor"
    if k < K_MULTIPLE or k % K_MULTIPLE or k * 2 > GEMV_MAX_SHARED_BYTES:
        return False, f"in_features {k} (a multiple of {K_MULTIPLE} up to {GEMV_MAX_SHARED_BYTES // 2})"
    if x2d.device != wq.device:
        return False, "x and the weight on different devices"
    return True, ""


def linear_e4m3_weight(x2d: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """x2d @ (wq * w_scale)^T + bias in x's dtype (supports_linear_e4m3_weight first). Rows beyond
    what one launch holds in shared memory go in further launches: each row's sum is its own, so the
    result is the same bits."""
    w_scale = w_scale.float().contiguous()
    bias = None if bias is None else bias.to(x2d.dtype).contiguous()
    rows_per_launch = min(GEMV_MAX_ROWS, GEMV_MAX_SHARED_BYTES // (2 * x2d.shape[1]))
    if x2d.shape[0] <= rows_per_launch:
        return torch.ops.rt_lynx.linear_e4m3_weight(x2d, wq, w_scale, bias)
    return torch.cat([torch.ops.rt_lynx.linear_e4m3_weight(part, wq, w_scale, bias)
                      for part in x2d.split(rows_per_launch)])


def fp8_dense_shape_supported(in_features: int, out_features: int) -> bool:
    """Whether a layer of this shape can run the fp8 dense path at all (the plan's test)."""
    return (0 < in_features <= MAX_IN_FEATURES and in_features % K_MULTIPLE == 0
            and out_features > 0 and out_features % N_MULTIPLE == 0)


def dense_linear_fp8(x2d: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, gelu_tail: torch.Tensor | None = None,
                     residual: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
    """a[m] * w_scale[n] * (e4m3(x) @ wq^T) + bias, M x N in x's dtype, x being x2d or, with
    gelu_tail, cat((x2d, gelu_tanh(gelu_tail)), -1). With `residual` (M x N bf16, x bf16;
    availability_residual_epilogue first) and `gate` (N values; None: 1): residual + gate * that, in
    the GEMM's epilogue (the gate folded into the channel scale and the bias, the bias rounded to
    bf16 after it, as torch's GEMM takes it). Call availability_fp8_dense and supports_fp8_dense first."""
    q, a = torch.ops.rt_lynx.quantize_rows_fp8(x2d, gelu_tail)
    fast_accumulation = FAST_ACCUMULATION and x2d.shape[0] >= FAST_ACCUMULATION_MIN_ROWS
    if residual is not None:
        if gate is not None:
            gate = gate.reshape(-1).float()
            w_scale = w_scale * gate
            bias = None if bias is None else bias.float() * gate
        return torch.ops.rt_lynx.scaled_mm_residual(q, a, wq, w_scale, bias, residual, fast_accumulation)
    y = torch._scaled_mm(q, wq.t(), scale_a=a, scale_b=w_scale.view(1, -1),
                         bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16,
                         use_fast_accum=fast_accumulation)
    return y if x2d.dtype == torch.bfloat16 else y.to(x2d.dtype)
