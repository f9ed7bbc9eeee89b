"""The one place that decides which backend computes a sparse linear, per call.

Backends never change the math (kernels/reference.py defines it), only where and how fast it
runs. The reason for each choice is logged once per distinct reason.
"""
import logging
from dataclasses import dataclass

import torch

from . import reference

log = logging.getLogger("rt_lynx")

REQUESTS = ("auto", "cuda", "reference")
# "bf16": the product runs in the activations' own 16-bit dtype (bf16 or fp16); "fp8": activations
# and weights quantised to e4m3 (per token / per output channel) around an fp8 sparse product.
PRECISIONS = ("bf16", "fp8")


@dataclass(frozen=True)
class BackendChoice:
    name: str      # "cusparselt" or "reference"
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
    from . import cusparselt as _fast
    from . import fp8 as _fast_fp8
    _fast_import_error = ""
except ImportError as error:  # a partial install: keep working on the reference path
    _fast, _fast_fp8, _fast_import_error = None, None, f"fast kernels not importable ({error})"


@torch.compiler.assume_constant_result
def fast_path_availability(device: torch.device, precision: str = "bf16") -> tuple[bool, str]:
    """Whether the fast sparse kernels of `precision` can run on `device` at all (built, Hopper,
    self-test). A constant for torch.compile: decided once per device, outside the traced graph."""
    if device.type != "cuda":
        return False, f"{device.type} device: the fast kernels need a CUDA GPU"
    if _fast is None:
        return False, _fast_import_error
    return _fast_fp8.availability_fp8(device) if precision == "fp8" else _fast.availability(device)


def select_backend(x2d: torch.Tensor, weight: torch.Tensor, requested: str, n: int, m: int,
                   precision: str = "bf16") -> BackendChoice:
    """`weight` is the layer weight for bf16, the e4m3 weight from quantize_weight_fp8 for fp8.
    A "cuda" request that the fast kernels cannot serve raises instead of falling back."""
    choice = _choose(x2d, weight, requested, n, m, precision)
    if requested == "cuda" and choice.name != "cusparselt":
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
    available, why_not = fast_path_availability(x2d.device, precision)
    if not available:
        return BackendChoice("reference", why_not)
    supported, why_not = (_fast_fp8.supports_fp8 if precision == "fp8" else _fast.supports)(x2d, weight)
    if not supported:
        return BackendChoice("reference", why_not)
    return BackendChoice("cusparselt", f"cuSPARSELt 2:4 {precision} sparse tensor cores")


_reported: set[tuple] = set()


def _report(choice: BackendChoice, x2d: torch.Tensor, weight: torch.Tensor) -> None:
    if torch.compiler.is_compiling():
        return
    key = (x2d.shape, weight.shape, x2d.dtype, choice)
    if key not in _reported:  # checked before formatting: this runs on every call
        _reported.add(key)
        where = "sparse tensor cores" if choice.name == "cusparselt" else "reference PyTorch path"
        log_once(f"{_describe(x2d, weight)}: {where} ({choice.reason})")


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # The bias is added outside the fast ops: under torch.compile Inductor fuses it into the next
    # elementwise work (activation, gate, residual) instead of a pass of its own.
    return y if bias is None else y.add_(bias)


def sparse_linear(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, compensate: bool,
                  requested: str = "auto", n: int = 2, m: int = 4) -> torch.Tensor:
    """y = s * (sparse_n:m(x) @ W^T) + b on the best backend for this call (x2d is M x K)."""
    choice = select_backend(x2d, weight, requested, n, m)
    _report(choice, x2d, weight)
    if choice.name == "cusparselt":
        return _add_bias(_fast.sparse_linear(x2d, weight, None, compensate), bias)
    return reference.sparse_linear_reference(x2d, weight, bias, compensate, n, m)


def sparse_linear_fp8(x2d: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                      compensate: bool, requested: str = "auto") -> torch.Tensor:
    """The fp8 Lynx product (reference.sparse_linear_fp8_reference) with (wq, w_scale) from
    quantize_weight_fp8, on the best backend for this call."""
    choice = select_backend(x2d, wq, requested, 2, 4, "fp8")
    _report(choice, x2d, wq)
    if choice.name == "cusparselt":
        return _add_bias(_fast_fp8.sparse_linear_fp8(x2d, wq, w_scale, None, compensate), bias)
    return reference.sparse_linear_fp8_reference(x2d, wq, w_scale, bias, compensate)
