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
    _fast_import_error = ""
except ImportError as error:  # a partial install: keep working on the reference path
    _fast, _fast_import_error = None, f"fast kernels not importable ({error})"


@torch.compiler.assume_constant_result
def fast_path_availability(device: torch.device) -> tuple[bool, str]:
    """Whether the fast sparse kernels can run on `device` at all (built, Hopper, self-test).
    A constant for torch.compile: it is decided once per device, outside the traced graph."""
    if device.type != "cuda":
        return False, f"{device.type} device: the fast kernels need a CUDA GPU"
    if _fast is None:
        return False, _fast_import_error
    return _fast.availability(device)


def select_backend(x2d: torch.Tensor, weight: torch.Tensor, requested: str, n: int, m: int) -> BackendChoice:
    if requested not in REQUESTS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {REQUESTS}")
    if requested == "reference":
        return BackendChoice("reference", "reference backend requested")
    if (n, m) != (2, 4):
        return BackendChoice("reference", f"{n}:{m} has no sparse tensor core kernel (2:4 only)")
    available, why_not = fast_path_availability(x2d.device)
    if not available:
        return BackendChoice("reference", why_not)
    supported, why_not = _fast.supports(x2d, weight)
    if not supported:
        return BackendChoice("reference", why_not)
    return BackendChoice("cusparselt", "cuSPARSELt 2:4 sparse tensor cores")


def sparse_linear(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, compensate: bool,
                  requested: str = "auto", n: int = 2, m: int = 4) -> torch.Tensor:
    """y = s * (sparse_n:m(x) @ W^T) + b on the best backend for this call (x2d is M x K)."""
    choice = select_backend(x2d, weight, requested, n, m)
    if not torch.compiler.is_compiling():
        where = "sparse tensor cores" if choice.name == "cusparselt" else "reference PyTorch path"
        log_once(f"{_describe(x2d, weight)}: {where} ({choice.reason})")
    if choice.name == "cusparselt":
        y = _fast.sparse_linear(x2d, weight, None, compensate)
        # The bias is added outside the op: under torch.compile Inductor fuses it into the next
        # elementwise work (activation, gate, residual) instead of a pass of its own.
        return y if bias is None else y.add_(bias)
    return reference.sparse_linear_reference(x2d, weight, bias, compensate, n, m)
