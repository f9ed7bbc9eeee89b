"""The one place that decides which backend computes a sparse linear, per call.

Backends never change the math (kernels/reference.py defines it), only where and how fast it
runs. The reason for each choice is logged once per distinct reason.
"""
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference
from .reference import GatedResidual, LowRankOperands, gated_residual_reference, low_rank_reference

log = logging.getLogger("rt_lynx")

REQUESTS = ("auto", "cuda", "reference")
# "bf16": the product runs in the activations' own 16-bit dtype (bf16 or fp16); "fp8": activations
# and weights quantised to e4m3 (per token / per output channel) around an fp8 sparse product.
PRECISIONS = ("bf16", "fp8")


# The fast backends, best first (bench/results: the sm90 GEMM with its fused epilogue beats
# cuSPARSELt plus a bias pass); cuSPARSELt is the fallback where the sm90 library is missing.
# RT_LYNX_GEMM=sm90 or =cusparselt keeps only that one (comparisons, regressions).
FAST_BACKENDS = ("sm90", "cusparselt")
BACKEND_NAMES = {"sm90": "CUTLASS sm90 sparse GEMM, fused epilogue", "cusparselt": "cuSPARSELt"}


@dataclass(frozen=True)
class BackendChoice:
    name: str      # "sm90", "cusparselt" or "reference"
    reason: str


_logged_messages: set[str] = set()


def log_once(message: str) -> None:
    """Log a message the first time it occurs (eager only: logging is a side effect that
    torch.compile cannot trace; the eager warm-up call reports it)."""
    if torch.compiler.is_compiling() or message in _logged_messages:
        return
    _logged_messages.add(message)
    log.info("RT-Lynx: %s", message)


def _describe(x2d: torch.Tensor, weight: torch.Tensor) -> str:
    return f"{tuple(x2d.shape)} x {tuple(weight.shape)} {str(x2d.dtype).removeprefix('torch.')}"


try:
    from . import block_ops as _block_ops
    from . import cusparselt as _fast
    from . import fp8 as _fast_fp8
    from . import fp8_dense as _fp8_dense
    from . import sm90 as _sm90
    _fast_import_error = ""
except ImportError as error:  # a partial install: keep working on the reference path
    _block_ops = _fast = _fast_fp8 = _fp8_dense = _sm90 = None
    _fast_import_error = f"fast kernels not importable ({error})"


def fast_backends() -> tuple[str, ...]:
    """FAST_BACKENDS, or the one RT_LYNX_GEMM names."""
    forced = os.environ.get("RT_LYNX_GEMM", "").strip().lower()
    if forced in ("", "auto"):
        return FAST_BACKENDS
    if forced not in FAST_BACKENDS:
        raise ValueError(f"RT_LYNX_GEMM={forced!r}: choose auto or one of {FAST_BACKENDS}")
    return (forced,)


@torch.compiler.assume_constant_result
def backend_availability(device: torch.device, precision: str, backend: str) -> tuple[bool, str]:
    """Whether one fast backend runs `precision` on `device` (built, Hopper, self-test); backend
    "fp8_dense" is the dense e4m3 product of the layers an fp8 model keeps dense ("fp8_dense_residual":
    that product with a residual in its epilogue), "block_ops" the fused elementwise kernels of DiT
    blocks. A constant for torch.compile: decided once per device, outside the traced graph."""
    if device.type != "cuda":
        return False, f"{device.type} device: the fast kernels need a CUDA GPU"
    if _fast is None:
        return False, _fast_import_error
    if backend == "block_ops":
        return _block_ops.availability_block_ops(device)
    if backend == "fp8_dense":
        return _fp8_dense.availability_fp8_dense(device)
    if backend == "fp8_dense_residual":
        return _fp8_dense.availability_residual_epilogue(device)
    if backend == "sm90":
        return _sm90.availability_sm90(device)
    return _fast_fp8.availability_fp8(device) if precision == "fp8" else _fast.availability(device)


@torch.compiler.assume_constant_result
def fast_path_availability(device: torch.device, precision: str = "bf16") -> tuple[bool, str]:
    """(True, the backend that will run) when a fast backend runs `precision` on `device`, else
    (False, why not for each)."""
    reasons = []
    for backend in fast_backends():
        available, why_not = backend_availability(device, precision, backend)
        if available:
            return True, BACKEND_NAMES[backend]
        reasons.append((backend, why_not))
    return False, _join_reasons(reasons)


def _join_reasons(reasons: list[tuple[str, str]]) -> str:
    """One line for why no fast backend ran: a reason they all share once, else each named."""
    if len({why for _, why in reasons}) == 1:
        return reasons[0][1]
    return "; ".join(f"{backend}: {why}" for backend, why in reasons)


def select_backend(x2d: torch.Tensor, weight: torch.Tensor, requested: str, n: int, m: int,
                   precision: str = "bf16") -> BackendChoice:
    """`weight` is the layer weight for bf16, the e4m3 weight from quantize_weight_fp8 for fp8.
    A "cuda" request that the fast kernels cannot serve raises instead of falling back."""
    return _fast_or_raise(_choose(x2d, weight, requested, n, m, precision), requested, x2d, weight)


def _fast_or_raise(choice: BackendChoice, requested: str, x2d: torch.Tensor, weight: torch.Tensor) -> BackendChoice:
    if requested == "cuda" and choice.name == "reference":
        raise RuntimeError(f"RT-Lynx backend 'cuda' cannot run {_describe(x2d, weight)}: {choice.reason}")
    return choice


def _choose(x2d, weight, requested, n, m, precision) -> BackendChoice:
    if requested not in REQUESTS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {REQUESTS}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if requested == "reference":
        return BackendChoice("reference", "reference backend requested")
    if (n, m) != (2, 4):
        return BackendChoice("reference", f"{n}:{m} has no sparse tensor core kernel (2:4 only)")
    reasons = []
    best_unavailable = None
    for backend in fast_backends():
        available, why_not = backend_availability(x2d.device, precision, backend)
        if available:
            if backend == "sm90":
                supported, why_not = _sm90.supports_sm90(x2d, weight)
            else:
                supported, why_not = (_fast_fp8.supports_fp8 if precision == "fp8" else _fast.supports)(x2d, weight)
            if supported:
                if best_unavailable is not None:
                    # The best backend's failure (a build or self-test problem) is said when another takes
                    # over: otherwise a slower product would be all that shows of it.
                    log_once(f"{BACKEND_NAMES[best_unavailable[0]]} unavailable for {precision} on {x2d.device}: "
                             f"{best_unavailable[1]}; {BACKEND_NAMES[backend]} runs instead")
                return BackendChoice(backend, f"{BACKEND_NAMES[backend]}, 2:4 {precision}")
        elif not reasons:
            best_unavailable = (backend, why_not)
        reasons.append((backend, why_not))
    return BackendChoice("reference", _join_reasons(reasons))


_reported: set[tuple] = set()


def _report(choice: BackendChoice, x2d: torch.Tensor, weight: torch.Tensor) -> None:
    if torch.compiler.is_compiling():
        return
    key = (x2d.shape, weight.shape, x2d.dtype, choice)
    if key not in _reported:  # checked before formatting: this runs on every call
        _reported.add(key)
        where = {"reference": "reference PyTorch path", "fp8_dense": "dense fp8 tensor cores",
                 "fp8_weight": "e4m3-weight kernel"}.get(
            choice.name, "sparse tensor cores")
        log_once(f"{_describe(x2d, weight)}: {where} ({choice.reason})")


def prepare_low_rank(down: torch.Tensor, up: torch.Tensor, scale: float, device: torch.device,
                     dtype: torch.dtype, requested: str = "auto", precision: str = "bf16") -> LowRankOperands:
    """A low-rank branch's factors on `device` in `dtype`, plus the sm90 GEMM's form of up where
    the calls it serves (`requested` backend, `precision`) can run that GEMM (it then computes the
    branch inside the sparse GEMM; the form costs N x 2*rank more elements per layer, so it is not
    built for the reference backend or the fp8 GEMM, which take no K extension). Call outside
    compiled regions."""
    down, up = down.to(device, dtype), up.to(device, dtype)
    in_gemm = (requested != "reference" and precision == "bf16" and dtype in (torch.bfloat16, torch.float16)
               and "sm90" in fast_backends() and backend_availability(torch.device(device), "bf16", "sm90")[0])
    return LowRankOperands(down, up, scale, _sm90.k_extension_up(up, scale) if in_gemm else None)


def _with_low_rank(y: torch.Tensor, x2d: torch.Tensor, low_rank: LowRankOperands | None) -> torch.Tensor:
    return y if low_rank is None else y + low_rank_reference(x2d, low_rank)


# Whether a gated residual goes into the GEMM's epilogue (the sm90 sparse one, the dense e4m3 one; the
# default) or is added by torch after the product (`residual_epilogue(False)`, for benchmarks that
# compare both). Read where a call is
# traced: a compiled model keeps the choice it was compiled with (Dynamo guards on it).
_residual_in_epilogue = True


@contextlib.contextmanager
def residual_epilogue(enabled: bool):
    """Within the block, gated residuals are added in the GEMMs' epilogues (enabled, the default) or by
    torch after the product; the previous setting comes back on leaving it. Process-wide."""
    global _residual_in_epilogue
    previous, _residual_in_epilogue = _residual_in_epilogue, bool(enabled)
    try:
        yield
    finally:
        _residual_in_epilogue = previous


def _epilogue_residual(residual: GatedResidual | None, x2d: torch.Tensor) -> dict:
    """A GEMM op's residual and gate arguments for `residual` around a product of x2d's rows: one
    image's (a gate of one row; several images have a gate each, which the epilogue does not take),
    in x's dtype. Empty where there is none or it is added after the product."""
    if residual is None or not _residual_in_epilogue:
        return {}
    out_features = residual.residual.shape[-1]
    if (residual.gate.numel() != out_features or residual.residual.numel() != x2d.shape[0] * out_features
            or residual.residual.dtype != x2d.dtype or residual.gate.dtype != x2d.dtype):
        return {}
    return {"residual": residual.residual.reshape(-1, out_features), "gate": residual.gate.reshape(out_features)}


def _finish(y: torch.Tensor, x2d: torch.Tensor, low_rank: LowRankOperands | None, residual: GatedResidual | None,
            residual_added: bool) -> torch.Tensor:
    """y plus what the product's kernel did not compute: the low-rank branch, then the gated residual
    (unless the GEMM's epilogue added it: `residual_added`)."""
    y = _with_low_rank(y, x2d, low_rank)
    return y if residual is None or residual_added else gated_residual_reference(y, residual)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # cuSPARSELt cannot add a per-feature bias, so it is added outside its op: under torch.compile
    # Inductor fuses it into the next elementwise work (activation, gate, residual).
    return y if bias is None else y.add_(bias)


def sparse_linear(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, compensate: bool,
                  requested: str = "auto", n: int = 2, m: int = 4, low_rank: LowRankOperands | None = None,
                  residual: GatedResidual | None = None) -> torch.Tensor:
    """y = s * (sparse_n:m(x) @ W^T) + b [+ the low-rank branch on the dense x] on the best
    backend for this call (x2d is M x K). The sm90 backend runs the branch inside its GEMM when
    low_rank carries the form it needs (prepare_low_rank); elsewhere it is added after. With
    `residual`: residual + gate * y, in the sm90 GEMM's epilogue where it takes it (one image, the
    branch inside the GEMM or none), else after."""
    choice = select_backend(x2d, weight, requested, n, m)
    _report(choice, x2d, weight)
    epilogue = {}
    if choice.name == "sm90":
        branch_in_gemm = low_rank is not None and low_rank.up_k_extension is not None
        if low_rank is None or branch_in_gemm:
            epilogue = _epilogue_residual(residual, x2d)
        if branch_in_gemm:
            y = _sm90.sparse_linear_lora_sm90(x2d, weight, bias, compensate, low_rank.down, low_rank.up_k_extension,
                                              **epilogue)
            low_rank = None
        else:
            y = _sm90.sparse_linear_sm90(x2d, weight, bias, compensate, **epilogue)
    elif choice.name == "cusparselt":
        y = _add_bias(_fast.sparse_linear(x2d, weight, None, compensate), bias)
    else:
        y = reference.sparse_linear_reference(x2d, weight, bias, compensate, n, m)
    return _finish(y, x2d, low_rank, residual, len(epilogue) > 0)


def sparse_linear_fp8(x2d: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                      compensate: bool, requested: str = "auto", low_rank: LowRankOperands | None = None,
                      residual: GatedResidual | None = None) -> torch.Tensor:
    """The fp8 Lynx product (reference.sparse_linear_fp8_reference) with (wq, w_scale) from
    quantize_weight_fp8, on the best backend for this call; a low-rank branch is added after
    in x's dtype (the e4m3 GEMM takes no K extension). `residual` as in sparse_linear (in the
    epilogue without a branch)."""
    choice = select_backend(x2d, wq, requested, 2, 4, "fp8")
    _report(choice, x2d, wq)
    epilogue = {}
    if choice.name == "sm90":
        epilogue = _epilogue_residual(residual, x2d) if low_rank is None else {}
        y = _sm90.sparse_linear_fp8_sm90(x2d, wq, w_scale, bias, compensate, **epilogue)
    elif choice.name == "cusparselt":
        y = _add_bias(_fast_fp8.sparse_linear_fp8(x2d, wq, w_scale, None, compensate), bias)
    else:
        y = reference.sparse_linear_fp8_reference(x2d, wq, w_scale, bias, compensate)
    return _finish(y, x2d, low_rank, residual, len(epilogue) > 0)


def sparse_linear_modulated(x2d: torch.Tensor, shift: torch.Tensor, scale1p: torch.Tensor, tokens: int, eps: float,
                            weight: torch.Tensor, bias: torch.Tensor | None, compensate: bool,
                            requested: str = "auto", w_scale: torch.Tensor | None = None,
                            modulated_input: Callable[[], torch.Tensor] | None = None,
                            low_rank: LowRankOperands | None = None) -> torch.Tensor:
    """sparse_linear, or sparse_linear_fp8 when w_scale is given (weight is then the e4m3 weight),
    of reference.modulated_layer_norm_reference(x2d, shift, scale1p, tokens, eps): a DiT block's
    LayerNorm + modulation and the linear after it (with `low_rank`, the Lynx LoRA branch of that
    input too). On the sm90 backend the normalisation and modulation run inside the sparsify pass
    (the modulated activations are never written; with a branch, where the fused down pass takes
    it); otherwise they are computed first (by `modulated_input()` when given, e.g. shared by the
    linears of one input), the same math up to rare one-ulp roundings."""
    shift, scale1p = shift.to(x2d.dtype), scale1p.to(x2d.dtype)
    if modulated_input is None:   # `is None`, not `or`: torch 2.11's Dynamo cannot branch on a function
        modulated_input = lambda: reference.modulated_layer_norm_reference(x2d, shift, scale1p, tokens, eps)  # noqa: E731
    return _sparse_linear_after(
        "LayerNorm + modulation", (shift, tokens),
        lambda *branch: _sm90.sparse_linear_modulated_sm90(x2d, shift, scale1p, tokens, eps, weight, w_scale, bias,
                                                           compensate, *branch),
        modulated_input,
        x2d, weight, bias, compensate, requested, w_scale, low_rank)


def sparse_linear_gelu(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, compensate: bool,
                       requested: str = "auto", w_scale: torch.Tensor | None = None,
                       low_rank: LowRankOperands | None = None, residual: GatedResidual | None = None) -> torch.Tensor:
    """sparse_linear (or sparse_linear_fp8 with w_scale) of reference.gelu_tanh_reference(x2d):
    an MLP's GELU and its down projection (with `low_rank`, plus the LoRA branch of the activation;
    with `residual`, residual + gate * that, as in sparse_linear). On the sm90 backend the GELU runs
    inside the sparsify pass (the activation is never written); otherwise it is computed first."""
    epilogue = _epilogue_residual(residual, x2d)
    return _sparse_linear_after(
        "GELU", (),
        lambda *branch: _sm90.sparse_linear_gelu_sm90(x2d, weight, w_scale, bias, compensate, *branch, **epilogue),
        lambda: reference.gelu_tanh_reference(x2d),
        x2d, weight, bias, compensate, requested, w_scale, low_rank, residual, len(epilogue) > 0)


def _sparse_linear_after(prologue_label: str, modulation: tuple, fused, prepared_input, x2d: torch.Tensor,
                         weight: torch.Tensor, bias: torch.Tensor | None, compensate: bool, requested: str,
                         w_scale: torch.Tensor | None, low_rank: LowRankOperands | None,
                         residual: GatedResidual | None = None, fused_adds_residual: bool = False) -> torch.Tensor:
    """The 2:4 product of what `prepared_input()` computes from x2d, plus `low_rank`'s branch of it
    (and `residual`): fused(*branch) where the sm90 backend runs this call and its sparsify pass
    takes the prologue (`modulation`: (shift, tokens) of a LayerNorm + modulation, () for the GELU)
    and the branch (16-bit product, the sm90 form of the up factor, a rank the fused down pass
    takes), else the prologue in torch ops and the product after it. `fused_adds_residual`: fused
    computes the residual in its epilogue (else it is added to its output here)."""
    choice = select_backend(x2d, weight, requested, 2, 4, "fp8" if w_scale is not None else "bf16")
    if choice.name == "sm90":
        branch = () if low_rank is None else (low_rank.down, low_rank.up_k_extension)
        supported, why_not = _sm90.supports_prologue(x2d, *modulation, rank=0 if low_rank is None else
                                                     low_rank.down.shape[0])
        if branch and (w_scale is not None or low_rank.up_k_extension is None):
            supported, why_not = False, "the Lynx LoRA branch is added after this product"
        if supported:
            _report(choice, x2d, weight)
            return _finish(fused(*branch), x2d, None, residual, fused_adds_residual)
        log_once(f"{prologue_label} before the sparsify pass ({why_not})")
    x = prepared_input()
    if w_scale is not None:
        return sparse_linear_fp8(x, weight, w_scale, bias, compensate, requested, low_rank, residual)
    return sparse_linear(x, weight, bias, compensate, requested, low_rank=low_rank, residual=residual)


def fp8_dense_availability(device: torch.device) -> tuple[bool, str]:
    """(True, info) when the dense e4m3 product of fp8 models' dense layers runs fast on `device`."""
    return backend_availability(device, "fp8", "fp8_dense")


def fp8_dense_shape_supported(in_features: int, out_features: int) -> bool:
    """Whether a layer of this shape runs the dense e4m3 product when an fp8 model keeps it dense
    (the plan's test); False throughout where the fast kernels are not importable."""
    return _fp8_dense is not None and _fp8_dense.fp8_dense_shape_supported(in_features, out_features)


def _fp8_dense_kernels_for(requested: str, device: torch.device) -> tuple[bool, str]:
    """(whether a call with backend `requested` may use the fp8 dense kernels on `device`, why not)."""
    if requested not in REQUESTS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {REQUESTS}")
    if requested == "reference":
        return False, "reference backend requested"
    return fp8_dense_availability(device)


def quantize_weight_fp8(weight: torch.Tensor, requested: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """reference.quantize_weight_fp8, the same bits, in one read of the weight by the fp8 dense
    quantise pass where it runs: a 16-bit CUDA weight whose rows hold a multiple of 16 values, at most
    MAX_IN_FEATURES. An fp8 model quantises its weights at the start of every sampling run, and
    torch's fp32 ops pass over them about six times."""
    available, _ = _fp8_dense_kernels_for(requested, weight.device)
    rows = weight.contiguous() if available else weight
    if available and _fp8_dense.supports_quantize_rows(rows)[0]:
        wq, dequant_scale = torch.ops.rt_lynx.quantize_rows_fp8(rows)
        return wq, dequant_scale.reshape(-1)
    return reference.quantize_weight_fp8(weight)


def dense_linear_fp8(x2d: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     requested: str = "auto", gelu_tail: torch.Tensor | None = None,
                     residual: GatedResidual | None = None) -> torch.Tensor:
    """A layer an fp8 model keeps dense: reference.dense_linear_fp8_reference with (wq, w_scale)
    from quantize_weight_fp8, on dense e4m3 tensor cores where the fast kernels run, else on the
    reference path. With gelu_tail (2-D, x2d's rows) the input is cat((x2d, gelu_tanh(gelu_tail)),
    -1): on the fast path the quantise pass makes it from both, and it is never written. With
    `residual`: residual + gate * y, in the GEMM's epilogue where it takes it (one image, bf16),
    else after."""
    available, why_not = _fp8_dense_kernels_for(requested, x2d.device)
    if available:
        available, why_not = _fp8_dense.supports_fp8_dense(x2d, wq, gelu_tail)
        if not available and gelu_tail is not None:
            # A tail the quantise pass cannot read (strided columns, another device): written first.
            x2d, gelu_tail = cat_gelu_tanh(x2d, gelu_tail), None
            available, why_not = _fp8_dense.supports_fp8_dense(x2d, wq)
    choice = BackendChoice("fp8_dense", "e4m3 dense GEMM") if available else BackendChoice("reference", why_not)
    _report(_fast_or_raise(choice, requested, x2d, wq), x2d, wq)
    if choice.name == "fp8_dense":
        epilogue = {}
        if x2d.dtype == torch.bfloat16 and backend_availability(x2d.device, "fp8", "fp8_dense_residual")[0]:
            epilogue = _epilogue_residual(residual, x2d)
        y = _fp8_dense.dense_linear_fp8(x2d, wq, w_scale, bias, gelu_tail, **epilogue)
        return _finish(y, x2d, None, residual, len(epilogue) > 0)
    x = x2d if gelu_tail is None else reference.cat_gelu_tanh_reference(x2d, gelu_tail)
    return _finish(reference.dense_linear_fp8_reference(x, wq, w_scale, bias), x2d, None, residual, False)


def linear_fp8_weight(x2d: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                      requested: str = "auto") -> torch.Tensor:
    """A per-image linear of an fp8 model (a block's modulation): reference.linear_e4m3_weight_reference,
    the e4m3 weight read by one kernel per 8 rows where the fast kernels run, else on the reference
    path."""
    available, why_not = _fp8_dense_kernels_for(requested, x2d.device)
    if available:
        available, why_not = _fp8_dense.supports_linear_e4m3_weight(x2d, wq)
    choice = (BackendChoice("fp8_weight", "the weight read in e4m3") if available
              else BackendChoice("reference", why_not))
    _report(_fast_or_raise(choice, requested, x2d, wq), x2d, wq)
    if choice.name == "fp8_weight":
        return _fp8_dense.linear_e4m3_weight(x2d, wq, w_scale, bias)
    return reference.linear_e4m3_weight_reference(x2d, wq, w_scale, bias)


def block_ops_availability(device: torch.device) -> tuple[bool, str]:
    """(True, info) when the fused elementwise kernels of DiT blocks run on `device`."""
    return backend_availability(torch.device(device), "bf16", "block_ops")


def qk_norm_rope(qkv_a: torch.Tensor, q_weight_a: torch.Tensor, k_weight_a: torch.Tensor,
                 qkv_b: torch.Tensor | None, q_weight_b: torch.Tensor | None, k_weight_b: torch.Tensor | None,
                 pe: torch.Tensor, heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference.qk_norm_rope_reference (FLUX), in one fused pass where the kernels run, else on the
    reference path. The norm weights are taken in qkv's dtype, as ComfyUI casts them. For one
    stream the kernels leave v where it is: v is then a heads-major view of qkv_a."""
    weights = _in_dtype_of(qkv_a, q_weight_a, k_weight_a, q_weight_b, k_weight_b)
    args = (qkv_a, weights[0], weights[1], qkv_b, weights[2], weights[3], pe, heads, eps)
    if _runs_fused_block_ops(qkv_a, qkv_a.shape[-1] // (3 * heads), pe):
        if qkv_b is None:
            q, k = torch.ops.rt_lynx.qk_norm_rope_qk(qkv_a, weights[0], weights[1], pe, heads, eps)
            return q, k, _block_ops.heads_major_v(qkv_a, heads)
        return torch.ops.rt_lynx.qk_norm_rope(*args)
    return reference.qk_norm_rope_reference(*args)


def qk_norm_rope_split(q_a: torch.Tensor, k_a: torch.Tensor, v_a: torch.Tensor, q_weight_a: torch.Tensor,
                       k_weight_a: torch.Tensor, q_b: torch.Tensor | None, k_b: torch.Tensor | None,
                       v_b: torch.Tensor | None, q_weight_b: torch.Tensor | None, k_weight_b: torch.Tensor | None,
                       pe: torch.Tensor, heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference.qk_norm_rope_split_reference (Qwen-Image), fused where the kernels run."""
    weights = _in_dtype_of(q_a, q_weight_a, k_weight_a, q_weight_b, k_weight_b)
    args = (q_a, k_a, v_a, weights[0], weights[1], q_b, k_b, v_b, weights[2], weights[3], pe, heads, eps)
    if _runs_fused_block_ops(q_a, q_a.shape[-1] // heads, pe):
        return torch.ops.rt_lynx.qk_norm_rope_split(*args)
    return reference.qk_norm_rope_split_reference(*args)


def cat_gelu_tanh(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """reference.cat_gelu_tanh_reference(a, b) for a (..., Ka) and b (..., Kb) of the same leading
    dims: in one pass where the fused kernels run (FLUX's single-block linear2 input), else in
    torch ops."""
    if a.shape[:-1] != b.shape[:-1]:
        raise ValueError(f"cat_gelu_tanh: a {tuple(a.shape)} and b {tuple(b.shape)} differ before their last dim")
    a2d, b2d = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    available, why_not = block_ops_availability(a.device)
    if available:
        available, why_not = _block_ops.supports_cat_gelu_tanh(a2d, b2d)
    if not available:
        log_once(f"GELU + concatenation in torch ops ({why_not})")
        return reference.cat_gelu_tanh_reference(a, b)
    return torch.ops.rt_lynx.cat_gelu_tanh(a2d, b2d).reshape(*a.shape[:-1], a.shape[-1] + b.shape[-1])


def _in_dtype_of(x: torch.Tensor, *weights):
    return [w if w is None else w.to(device=x.device, dtype=x.dtype) for w in weights]


def _runs_fused_block_ops(projection: torch.Tensor, head_dim: int, pe: torch.Tensor) -> bool:
    available, why_not = block_ops_availability(projection.device)
    if available:
        available, why_not = _block_ops.supports_qk_norm_rope(projection, head_dim, pe)
    if not available:
        log_once(f"q/k norm + RoPE on the reference path ({why_not})")
    return available
