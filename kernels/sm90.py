"""Hopper fast path, stage 2: own CUTLASS sm90a sparse GEMM with the scales and bias in its epilogue.

Computes `reference.sparse_linear_reference` (bf16/fp16) and `reference.sparse_linear_fp8_reference`
(e4m3) as custom ops in the `rt_lynx` namespace:

  torch.ops.rt_lynx.sparse_linear_sm90(x, weight, bias, compensate) -> y               (M x N)
  torch.ops.rt_lynx.sparse_linear_lora_sm90(x, weight, bias, compensate, down, up_ext) -> y
  torch.ops.rt_lynx.sparse_linear_fp8_sm90(x, wq, w_scale, bias, compensate) -> y      (M x N)
  torch.ops.rt_lynx.sparse_linear_modulated_sm90(x, shift, scale1p, tokens, eps, weight, w_scale, bias,
                                                 compensate[, down, up_ext]) -> y      (M x N)
  torch.ops.rt_lynx.sparse_linear_gelu_sm90(x, weight, w_scale, bias, compensate[, down, up_ext]) -> y
  torch.ops.rt_lynx.sparsify_sm90(x, metadata_block, e4m3, compensate[, shift, scale1p, tokens, eps, gelu])
                                  -> (compressed, scale)
  torch.ops.rt_lynx.sparse_mm_sm90(compressed, weight, row_scale, col_scale, bias, rows, config,
                                   out_dtype) -> y                                  (one config)

A call is two kernels: the sparsify pass reads x once and writes the kept values, CUTLASS's
metadata and the per-token scale (s for 16-bit; a = s * max|x_kept| / 448 for e4m3, whose values
it quantises); the GEMM (wgmma.sp, TMA, warp-specialised) applies s (or a * w_scale) and the bias
to its fp32 accumulators and writes y once. Rows are not padded for the GEMM (TMA fills the tile
edges); the metadata is, to 64 rows, as CUTLASS's layout wants.

With a Lynx LoRA the branch joins the same accumulators (sm90_k_extended_mainloop.cuh): u =
down(x) (for ranks up to 32 computed by the sparsify pass on tensor cores from its own read of x,
else one small cuBLAS product first; `low_rank_fusion` switches) divided by s is written into
extra columns of the sparse A as 2:4 groups [u0 u1 0 0] by the sparsify pass, and the GEMM's
k-tiles past K take their B from `k_extension_up(up, scale)` instead of the weight; the epilogue's
s then restores u. One k-tile more than the plain GEMM (64 logical columns on the configs with a
64-wide tile K for ranks up to 32, else 128 for ranks up to 64), and no pass over y.

The modulated and gelu ops are the same product on what the producer of the linear's input
computes elementwise, done by the sparsify pass on the rows it holds in registers before it
selects, so that input is never written or read back: a DiT block's LayerNorm + modulation
(reference.modulated_layer_norm_reference; the pass reads the residual stream x and takes each
row's statistics from the row it holds) and an MLP's GELU before its down projection
(reference.gelu_tanh_reference; the pass reads the up projection's output). With down and up_ext
(16-bit, ranks up to 32) the Lynx LoRA branch of that prepared input joins as above: the fused
down pass applies the same work to its x tiles (a LayerNorm's row statistics from a small kernel
first, since that pass splits K), for the selection and for u alike.

`availability_sm90` says yes only after the start-up self-test: the metadata writer's byte formula
against CuTe's layout for every config, then every config's product against the reference.
"""
import contextlib

import torch

from . import build as _build
from . import cusparselt as _cusparselt
from .fp8 import fp8_compressed_bytes
from .reference import (LowRankOperands, gelu_tanh_reference, low_rank_reference, modulated_layer_norm_reference,
                        quantize_weight_fp8, sparse_linear_fp8_reference, sparse_linear_reference)

K_MULTIPLE = 128      # the metadata atom spans 128 columns (64 for some configs)
N_MULTIPLE = 16       # 16-byte rows of y for TMA (e4m3 weights: 32, as the fp8 ops check)
SUPPORTED_DTYPES = _cusparselt.SUPPORTED_DTYPES
ELEMENTS = {torch.bfloat16: 0, torch.float16: 1, torch.float8_e4m3fn: 2}   # RtLynxElement
SELF_TEST_TOLERANCE = 1e-2


def compressed_numel(rows: int, k: int, e4m3: bool) -> int:
    """Elements of sparsify_sm90's buffer: the same sizes as the cuSPARSELt layouts (rows padded
    to 64, K/2 values then K/8 metadata bytes per row), only the metadata order differs."""
    padded = _cusparselt.padded_rows(rows)
    return fp8_compressed_bytes(padded, k) if e4m3 else _cusparselt.compressed_numel(padded, k)


def _define_ops():
    if _cusparselt.op_defined("sparse_linear_sm90"):
        return
    lib = torch.library.Library("rt_lynx", "FRAGMENT")
    # residual, gate: y = residual + gate * the product, in the GEMM's epilogue (one image's gate).
    lib.define("sparse_linear_sm90(Tensor x, Tensor weight, Tensor? bias, bool compensate, Tensor? residual=None, "
               "Tensor? gate=None) -> Tensor")
    lib.define("sparse_linear_lora_sm90(Tensor x, Tensor weight, Tensor? bias, bool compensate, Tensor down, "
               "Tensor up_ext, Tensor? residual=None, Tensor? gate=None) -> Tensor")
    lib.define("sparse_linear_fp8_sm90(Tensor x, Tensor wq, Tensor w_scale, Tensor? bias, bool compensate, "
               "Tensor? residual=None, Tensor? gate=None) -> Tensor")
    lib.define("sparse_linear_modulated_sm90(Tensor x, Tensor shift, Tensor scale1p, int tokens, float eps, "
               "Tensor weight, Tensor? w_scale, Tensor? bias, bool compensate, Tensor? down=None, "
               "Tensor? up_ext=None) -> Tensor")
    lib.define("sparse_linear_gelu_sm90(Tensor x, Tensor weight, Tensor? w_scale, Tensor? bias, bool compensate, "
               "Tensor? down=None, Tensor? up_ext=None, Tensor? residual=None, Tensor? gate=None) -> Tensor")
    lib.define("sparsify_sm90(Tensor x, int metadata_block, bool e4m3, bool compensate, Tensor? shift=None, "
               "Tensor? scale1p=None, int tokens=1, float eps=0.0, bool gelu=False) -> (Tensor, Tensor)")
    lib.define("sparse_mm_sm90(Tensor compressed, Tensor weight, Tensor? row_scale, Tensor? col_scale, "
               "Tensor? bias, int rows, int config, ScalarType out_dtype, Tensor? residual=None, "
               "Tensor? gate=None) -> Tensor")

    @torch.library.register_fake("rt_lynx::sparse_linear_sm90", lib=lib)
    def _(x, weight, bias, compensate, residual=None, gate=None):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("rt_lynx::sparse_linear_lora_sm90", lib=lib)
    def _(x, weight, bias, compensate, down, up_ext, residual=None, gate=None):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("rt_lynx::sparse_linear_fp8_sm90", lib=lib)
    def _(x, wq, w_scale, bias, compensate, residual=None, gate=None):
        return x.new_empty((x.shape[0], wq.shape[0]))

    @torch.library.register_fake("rt_lynx::sparse_linear_modulated_sm90", lib=lib)
    def _(x, shift, scale1p, tokens, eps, weight, w_scale, bias, compensate, down=None, up_ext=None):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("rt_lynx::sparse_linear_gelu_sm90", lib=lib)
    def _(x, weight, w_scale, bias, compensate, down=None, up_ext=None, residual=None, gate=None):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("rt_lynx::sparsify_sm90", lib=lib)
    def _(x, metadata_block, e4m3, compensate, shift=None, scale1p=None, tokens=1, eps=0.0, gelu=False):
        numel = compressed_numel(x.shape[0], x.shape[1], e4m3)
        return (x.new_empty((numel,), dtype=torch.uint8 if e4m3 else x.dtype),
                x.new_empty((_cusparselt.padded_rows(x.shape[0]),), dtype=torch.float32))

    @torch.library.register_fake("rt_lynx::sparse_mm_sm90", lib=lib)
    def _(compressed, weight, row_scale, col_scale, bias, rows, config, out_dtype, residual=None, gate=None):
        return weight.new_empty((rows, weight.shape[0]), dtype=out_dtype)

    _define_ops.library = lib


_define_ops()


def availability_sm90(device: torch.device) -> tuple[bool, str]:
    """(True, info) when the sm90 GEMM path works on `device` for bf16, fp16 and e4m3, else
    (False, reason). Needs the extension (cusparselt.availability: Hopper, built) and the sm90
    library loaded into it. Cached; never raises."""
    return _availability(device)


def _check_device(index: int) -> tuple[bool, str]:
    status = _build.sm90_status()
    if status:
        return False, f"sm90 sparse GEMM library unavailable: {status}"
    try:
        with torch.cuda.device(index):
            problem = self_test_sm90(torch.device("cuda", index))
    except Exception as exc:
        problem = _cusparselt.self_test_error(exc)
    if problem:
        return False, problem
    names = ", ".join(sorted({name.split(" cluster")[0] for *_, name in config_info(torch.bfloat16)}))
    return True, f"CUTLASS sm90a sparse GEMM, fused scale+bias epilogue, tiles {names}, self-test passed"


_availability = _cusparselt.PerDeviceCheck(_check_device, _cusparselt.availability)


def config_info(dtype: torch.dtype) -> list[tuple]:
    """(tile_m, tile_n, tile_k, metadata_block, index, name) of each GEMM config for an input dtype."""
    return list(_cusparselt.extension().sm90_config_info(ELEMENTS[dtype]))


def self_test_sm90(device: torch.device) -> str:
    """'' when the metadata layout of every config equals CuTe's, every config's product
    (bf16, fp16: s and bias; e4m3: a, w_scale and bias) matches the reference, and so do the
    product with a low-rank branch in the GEMM and those with a prologue (with and without the
    branch); else the first problem, one line."""
    module = _cusparselt.extension()
    generator = torch.Generator(device=device).manual_seed(2468)
    for dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn):
        for *_, index, name in config_info(dtype):
            problem = module.sm90_check_metadata_layout(ELEMENTS[dtype], index, 130, 256)
            if problem:
                return f"sm90 config {name} ({dtype}): {problem}"
    rows, k, n = 100, 256, 64   # rows not a multiple of 64 or of any tile
    for dtype in SUPPORTED_DTYPES:
        x = torch.randn(rows, k, generator=generator, device=device).to(dtype)
        weight = (torch.randn(n, k, generator=generator, device=device) / k ** 0.5).to(dtype)
        bias = torch.randn(n, generator=generator, device=device).to(dtype)
        want = sparse_linear_reference(x.float(), weight.float(), bias.float(), True)
        for _, _, _, block, index, name in config_info(dtype):
            compressed, scale = torch.ops.rt_lynx.sparsify_sm90(x, block, False, True)
            got = torch.ops.rt_lynx.sparse_mm_sm90(compressed, weight, scale, None, bias, rows, index, dtype)
            error = ((got.float() - want).norm() / want.norm()).item()
            if not error < SELF_TEST_TOLERANCE:
                return f"sm90 GEMM check failed ({dtype}, config {name}): relative error {error:.2e}"
        problem = _check_low_rank(x, weight, bias, generator) or _check_prologues(x, weight, bias, generator)
        if problem:
            return problem
        wq, w_scale = quantize_weight_fp8(weight.float())
        want8 = sparse_linear_fp8_reference(x.float(), wq, w_scale, bias.float(), True)
        for _, _, _, block, index, name in config_info(torch.float8_e4m3fn):
            compressed, a = torch.ops.rt_lynx.sparsify_sm90(x, block, True, True)
            got = torch.ops.rt_lynx.sparse_mm_sm90(compressed, wq, a, w_scale, bias, rows, index, dtype)
            error = ((got.float() - want8).norm() / want8.norm()).item()
            if not error < SELF_TEST_TOLERANCE:
                return f"sm90 e4m3 GEMM check failed (out {dtype}, config {name}): relative error {error:.2e}"
    torch.cuda.synchronize(device)
    return ""


def _low_rank_factors(x, weight, generator) -> tuple[torch.Tensor, torch.Tensor]:
    rank = 5   # odd: the last 2:4 group of u holds one value
    down = (torch.randn(rank, x.shape[1], generator=generator, device=x.device) / x.shape[1] ** 0.5).to(x.dtype)
    up = torch.randn(weight.shape[0], rank, generator=generator, device=x.device).to(x.dtype)
    return down, up


def _check_low_rank(x, weight, bias, generator) -> str:
    down, up = _low_rank_factors(x, weight, generator)
    low_rank = LowRankOperands(down.float(), up.float(), 0.5)
    want = sparse_linear_reference(x.float(), weight.float(), bias.float(), True) + low_rank_reference(x.float(), low_rank)
    got = sparse_linear_lora_sm90(x, weight, bias, True, down, k_extension_up(up, 0.5))
    error = ((got.float() - want).norm() / want.norm()).item()
    if not error < SELF_TEST_TOLERANCE:
        return f"sm90 GEMM with a low-rank branch failed ({x.dtype}): relative error {error:.2e}"
    return ""


def _check_prologues(x, weight, bias, generator) -> str:
    """The products with each prologue against the reference, bf16/fp16 and e4m3, and the 16-bit
    ones with a low-rank branch (of the prepared input, in the fused down pass)."""
    tokens = x.shape[0] // 2   # two images
    shift = torch.randn(2, x.shape[1], generator=generator, device=x.device).to(x.dtype)
    scale1p = (1 + torch.randn(2, x.shape[1], generator=generator, device=x.device) / 4).to(x.dtype)
    rows = x[:2 * tokens] * 3 + 1   # the LayerNorm must remove a mean and a scale
    down, up = _low_rank_factors(x, weight, generator)
    low_rank = LowRankOperands(down.float(), up.float(), 0.5)
    cases = {"LayerNorm + modulation": (modulated_layer_norm_reference(rows, shift, scale1p, tokens, 1e-6),
                                        lambda w, s, *lr: sparse_linear_modulated_sm90(
                                            rows, shift, scale1p, tokens, 1e-6, w, s, bias, True, *lr)),
             "GELU": (gelu_tanh_reference(rows),
                      lambda w, s, *lr: sparse_linear_gelu_sm90(rows, w, s, bias, True, *lr))}
    for name, (prepared, fused) in cases.items():
        for wq, w_scale, branch in ((weight, None, False), (weight, None, True),
                                    (*quantize_weight_fp8(weight.float()), False)):
            if branch and not low_rank_fused(down.shape[0]):
                continue   # the fused down pass is switched off (sm90.low_rank_fusion)
            if w_scale is None:
                want = sparse_linear_reference(prepared.float(), weight.float(), bias.float(), True)
            else:
                want = sparse_linear_fp8_reference(prepared.float(), wq, w_scale, bias.float(), True)
            if branch:
                want = want + low_rank_reference(prepared.float(), low_rank)
            got = fused(wq, w_scale, down, k_extension_up(up, 0.5)) if branch else fused(wq, w_scale)
            error = ((got.float() - want).norm() / want.norm()).item()
            if not error < SELF_TEST_TOLERANCE:
                return (f"sm90 sparsify with {name}{' and a low-rank branch' if branch else ''} + GEMM failed "
                        f"({x.dtype}, weight {wq.dtype}): relative error {error:.2e}")
    return ""


def supports_sm90(x2d: torch.Tensor, weight: torch.Tensor) -> tuple[bool, str]:
    """Whether (x2d, weight) fit the sm90 path (weight: x's dtype, or e4m3 from quantize_weight_fp8).
    Never raises."""
    e4m3 = weight.dtype == torch.float8_e4m3fn
    supported, why_not = _cusparselt.check_operands(
        x2d, weight, torch.float8_e4m3fn if e4m3 else x2d.dtype,
        " (use quantize_weight_fp8)" if e4m3 else " (the x dtype)", 2 * N_MULTIPLE if e4m3 else N_MULTIPLE)
    if supported and x2d.shape[1] % K_MULTIPLE:
        return False, f"in_features {x2d.shape[1]} is not a multiple of {K_MULTIPLE}"
    return supported, why_not


def sparse_linear_sm90(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       compensate: bool, residual: torch.Tensor | None = None,
                       gate: torch.Tensor | None = None) -> torch.Tensor:
    """s * (sparse(x2d) @ weight^T) + bias, M x N in x's dtype, bias in the GEMM epilogue. With
    `residual` (M x N, x's dtype) and `gate` (N values, x's dtype; None: 1), residual + gate * that,
    in the epilogue too, before the one rounding to x's dtype (the same for every op below)."""
    return torch.ops.rt_lynx.sparse_linear_sm90(x2d, weight, bias, bool(compensate), residual, gate)


def supports_prologue(x2d: torch.Tensor, shift: torch.Tensor | None = None, tokens: int = 1,
                      rank: int = 0) -> tuple[bool, str]:
    """Whether the gelu op (shift None) or the modulated op (shift images x K over `tokens` rows per
    image) takes x2d, with a low-rank branch of `rank` (0: none), once supports_sm90 holds for the
    product. Never raises."""
    rows, k = x2d.shape
    if shift is not None and (tokens < 1 or rows != shift.shape[0] * tokens or shift.shape[-1] != k):
        return False, f"{rows} rows are not {shift.shape[0]} images of {tokens} tokens"
    if not _prologue_fits(k):
        return False, f"in_features {k} is longer than the sparsify pass holds with a prologue"
    if rank and not _low_rank_fused_constant(rank):
        return False, f"a rank-{rank} Lynx LoRA is computed apart from the sparsify pass (its input is written)"
    return True, ""


@torch.compiler.assume_constant_result
def _prologue_fits(k: int) -> bool:
    # The staged pass's limit, asked of the extension (loaded once sm90 is chosen); a constant for
    # torch.compile.
    return bool(_cusparselt.extension().sparsify_prologue_supported(64, k))


@torch.compiler.assume_constant_result
def _low_rank_fused_constant(rank: int) -> bool:
    return low_rank_fused(rank)


def sparse_linear_modulated_sm90(x2d: torch.Tensor, shift: torch.Tensor, scale1p: torch.Tensor, tokens: int,
                                 eps: float, weight: torch.Tensor, w_scale: torch.Tensor | None,
                                 bias: torch.Tensor | None, compensate: bool, down: torch.Tensor | None = None,
                                 up_ext: torch.Tensor | None = None) -> torch.Tensor:
    """sparse_linear_sm90 (w_scale None) or sparse_linear_fp8_sm90 (weight e4m3) of
    modulated_layer_norm_reference(x2d, shift, scale1p, tokens, eps), the normalisation and
    modulation done inside the sparsify pass; shift and scale1p in x's dtype. With down and up_ext
    (sparse_linear_lora_sm90's; 16-bit weight, a rank supports_prologue takes) the low-rank branch
    of the modulated input too."""
    return torch.ops.rt_lynx.sparse_linear_modulated_sm90(x2d, shift, scale1p, int(tokens), float(eps), weight,
                                                          w_scale, bias, bool(compensate), down, up_ext)


def sparse_linear_gelu_sm90(x2d: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor | None,
                            bias: torch.Tensor | None, compensate: bool, down: torch.Tensor | None = None,
                            up_ext: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                            gate: torch.Tensor | None = None) -> torch.Tensor:
    """sparse_linear_sm90 (w_scale None) or sparse_linear_fp8_sm90 (weight e4m3) of
    gelu_tanh_reference(x2d), the GELU done inside the sparsify pass; down and up_ext as in
    sparse_linear_modulated_sm90, residual and gate as in sparse_linear_sm90."""
    return torch.ops.rt_lynx.sparse_linear_gelu_sm90(x2d, weight, w_scale, bias, bool(compensate), down, up_ext,
                                                     residual, gate)


def k_extension_up(up: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * up (N x rank) in the sm90 GEMM's K-extension form: value j of u sits at position
    j % 2 of 2:4 group j // 2, so column 4 * (j // 2) + j % 2 holds scale * up[:, j]; the other
    two columns of each group are zero. N x 2 * rank rounded up to 8 columns (16-byte rows for
    TMA; the GEMM reads the columns past them as zero)."""
    n, rank = up.shape
    columns = -(-2 * rank // 8) * 8
    j = torch.arange(rank, device=up.device)
    extension = torch.zeros(n, columns, device=up.device, dtype=up.dtype)
    extension[:, 4 * (j // 2) + j % 2] = (up.float() * scale).to(up.dtype)
    return extension


def sparse_linear_lora_sm90(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            compensate: bool, down: torch.Tensor, up_ext: torch.Tensor,
                            residual: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
    """s * (sparse(x2d) @ weight^T) + bias + up(down(x2d)) * scale in one sparse GEMM, with
    up_ext = k_extension_up(up, scale) and down in x's dtype; residual and gate as in
    sparse_linear_sm90."""
    return torch.ops.rt_lynx.sparse_linear_lora_sm90(x2d, weight, bias, bool(compensate), down, up_ext, residual,
                                                     gate)


def sparse_linear_fp8_sm90(x2d: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                           bias: torch.Tensor | None, compensate: bool, residual: torch.Tensor | None = None,
                           gate: torch.Tensor | None = None) -> torch.Tensor:
    """a[m] * w_scale[n] * (e4m3 2:4 x) @ wq^T + bias, M x N in x's dtype, scales and bias in the
    GEMM epilogue; residual and gate as in sparse_linear_sm90."""
    return torch.ops.rt_lynx.sparse_linear_fp8_sm90(x2d, wq, w_scale, bias, bool(compensate), residual, gate)


def clear_plans() -> None:
    """Forget the chosen GEMM configs: the next call of each shape times every config again."""
    _cusparselt.extension().sm90_clear_plans()


def plan_info() -> list[tuple]:
    """Chosen configs: (M, K, N, element, config, time per candidate config in us, the chosen
    config's K extension columns for a low-rank branch, or 0, whether the GEMM adds a residual)."""
    return list(_cusparselt.extension().sm90_plan_info())


@contextlib.contextmanager
def low_rank_fusion(enabled: bool):
    """Within the block, a LoRA's down(x) is computed inside the sparsify pass (enabled, the
    default; ranks up to 32) or by cuBLAS before it; the previous setting comes back on leaving
    it. Process-wide (every thread and device; a CUDA graph keeps the path it was captured with);
    for benchmarks and tests that compare both on the same data."""
    ext = _cusparselt.extension()
    with _switched(bool(ext.sparsify_low_rank_fused(1)), ext.set_sparsify_low_rank_fusion, enabled):
        yield


@contextlib.contextmanager
def staged_sparsify(enabled: bool):
    """Within the block, the sparsify pass for the sm90 layouts keeps each row pair in registers,
    loaded at once (enabled, the default, for rows up to 16384 columns) or loops over column
    chunks (the pass before it, and the one for longer rows); the previous setting comes back on
    leaving it. Process-wide like low_rank_fusion; for benchmarks and tests."""
    ext = _cusparselt.extension()
    # 64 x 128: a shape the staged pass always holds, so the answer is the switch.
    with _switched(bool(ext.sparsify_staged_pass(64, 128)), ext.set_sparsify_staged_pass, enabled):
        yield


@contextlib.contextmanager
def fast_gelu(enabled: bool):
    """Within the block, every GELU the kernels compute (the sparsify pass's prologue, in the plain
    and the fused down pass, the fp8 quantise pass's tail, cat_gelu_tanh) is x / (1 + exp(-2u)) on
    the hardware exp2 and a fast division (enabled, the default: within one 16-bit ulp of torch's,
    plus up to |x| 2^-21 in the negative tail where torch's own 1 + tanh(u) cancels; the 2:4
    selection or e4m3 rounding after it is far coarser) or torch's bit for bit (its accurate tanhf
    costs more than these passes' memory time: 0.8 ms of kernel time per FLUX 1024² step in bf16,
    1.0 ms in fp8, H200). The previous setting comes back on leaving it. Read at each kernel
    launch: a CUDA graph keeps the setting it was captured with. Process-wide like
    low_rank_fusion; for benchmarks and tests."""
    ext = _cusparselt.extension()
    with _switched(bool(ext.fast_gelu()), ext.set_fast_gelu, enabled):
        yield


@contextlib.contextmanager
def packed_e4m3_gelu(enabled: bool):
    """Within the block, the GELUs of the passes whose output is e4m3 (the fp8 sparsify pass's
    prologue, the fp8 quantise pass's tail) are computed on two 16-bit values at once in x's type,
    with the hardware's packed tanh (enabled: one special-function operation per two values, where
    the fast GELU takes two per value; within 2% of the value, |x| 2^-8 where 1 + tanh(u) cancels,
    under e4m3's rounding of up to 6%) or as the fast GELU (the default). On an H100 it made the
    fp8 sparsify pass with a GELU prologue 21% faster and a compiled FLUX fp8 step 0.6%, for a bf16
    product 0.7% further from fp32 math: off by default for that trade. Needs the fast GELU: with
    fast_gelu(False) torch's bits win. Read at each launch; process-wide like low_rank_fusion."""
    ext = _cusparselt.extension()
    with _switched(bool(ext.packed_e4m3_gelu()), ext.set_packed_e4m3_gelu, enabled):
        yield


@contextlib.contextmanager
def programmatic_launch(enabled: bool):
    """Within the block, the sparse GEMM, the sparsify passes and our other kernels of a Lynx step
    (the quantise pass, the e4m3-weight GEMV, q/k norm + RoPE) are launched with programmatic
    dependent launch (enabled: each may start while the kernel before it ends and waits for it
    before touching memory, so the GEMM sets up while the sparsify pass's last blocks run) or
    plainly (the default: 1-3% on the Lynx linear's time, nothing measurable in a FLUX step, with
    or without CUDA graphs; bench/NOTES.md). The previous setting comes back on leaving it.
    Read at each launch: a CUDA graph keeps what it was captured with. Process-wide like
    low_rank_fusion; for benchmarks and tests."""
    ext = _cusparselt.extension()
    with _switched(bool(ext.programmatic_launch()), ext.set_programmatic_launch, enabled):
        yield


@contextlib.contextmanager
def _switched(previous: bool, set_switch, enabled: bool):
    """A process-wide switch of the extension set to `enabled` within the block, back to `previous` after."""
    set_switch(bool(enabled))
    try:
        yield
    finally:
        set_switch(previous)


def staged_sparsify_runs(rows: int, k: int) -> bool:
    """Whether the staged pass runs for x of rows x k (see staged_sparsify)."""
    return bool(_cusparselt.extension().sparsify_staged_pass(_cusparselt.padded_rows(rows), k))


def low_rank_fused(rank: int) -> bool:
    """Whether the sparsify pass computes down(x) for this rank (see low_rank_fusion)."""
    return bool(_cusparselt.extension().sparsify_low_rank_fused(rank))
