"""Fast RT-Lynx linear on Hopper: own fused sparsify+compress (scale folded), cuSPARSELt 2:4 GEMM.

Computes `reference.sparse_linear_reference` (same kept positions and tie rule) as custom ops in
the `rt_lynx` namespace, so torch.compile traces them without a graph break. One difference in
rounding: the per-token scale s is folded into the compressed values (round(s * x_kept) in x's
dtype) instead of scaling the product. The op can add the bias in a pass over Y in fp32
(cuSPARSELt 0.8 adds its bias per token in either orientation, so it cannot take a per-feature
bias); the dispatch instead adds it after the op in x's dtype, so torch.compile fuses it into the
next elementwise work (one more rounding than the reference, well inside the tests' tolerance).

  torch.ops.rt_lynx.sparse_linear(x, weight, bias, compensate) -> y            (M x N, x's dtype)
  torch.ops.rt_lynx.sparsify_compress(x, m_padded) -> (compressed, scale)      (unscaled values)
  torch.ops.rt_lynx.sparsify_compress_scaled(x, m_padded, split) -> (compressed, scale)
                                                        (values round(s * x_kept); split 0 = auto)
  torch.ops.rt_lynx.sparse_mm(compressed, weight, m_padded) -> (m_padded x N)  (GEMM alone)
  torch.ops.rt_lynx.scale_bias_epilogue(gemm, scale, bias, rows) -> (rows x N)

Orientation: the activations are cuSPARSELt's structured operand A (Y = X_s W^T), or on request
(RT_LYNX_SPARSE_OPERAND=B) operand B (D = W x X_s^T, column-major N x M, i.e. Y row-major; same
compressed layout; no faster on the H100). The compressed layout is a private detail of
cuSPARSELt, so `availability` only says yes after a start-up self-test of our layout against
torch._cslt_compress and cuSPARSELt's own compression for the orientation in use, and a product
check against the reference.
"""
import os
import threading

import torch

from . import build as _build
from .reference import sparse_linear_reference, sparsify_nm

ROW_PAD = 64          # the compressed layout tiles rows by 64
K_MULTIPLE = 64       # in_features granularity of the fused sparsify kernel and the layout
N_MULTIPLE = 16       # out_features granularity (16-byte aligned rows for cuSPARSELt)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
SELF_TEST_TOLERANCE = 1e-2


def padded_rows(rows: int) -> int:
    return (rows + ROW_PAD - 1) // ROW_PAD * ROW_PAD


def compressed_numel(m_padded: int, k: int) -> int:
    """Elements (x's dtype) of a compressed m_padded x k matrix: m*k/2 values + m*k/8 bytes."""
    return m_padded * k * 9 // 16


def op_defined(name: str) -> bool:
    """Whether rt_lynx::<name> is defined already: the kernel modules can be imported under two
    package names (ComfyUI and standalone), and each must define its ops once."""
    try:
        getattr(torch.ops.rt_lynx, name).default
        return True
    except (AttributeError, RuntimeError):
        return False


def _define_ops():
    if op_defined("sparse_linear"):
        return
    lib = torch.library.Library("rt_lynx", "DEF")
    lib.define("sparsify_compress(Tensor x, int m_padded) -> (Tensor, Tensor)")
    lib.define("sparsify_compress_scaled(Tensor x, int m_padded, int split=0) -> (Tensor, Tensor)")
    lib.define("sparse_mm(Tensor compressed, Tensor weight, int m_padded) -> Tensor")
    lib.define("sparse_linear(Tensor x, Tensor weight, Tensor? bias, bool compensate) -> Tensor")
    lib.define("scale_bias_epilogue(Tensor gemm, Tensor? scale, Tensor? bias, int rows) -> Tensor")

    @torch.library.register_fake("rt_lynx::sparsify_compress", lib=lib)
    def _(x, m_padded):
        return (x.new_empty((compressed_numel(m_padded, x.shape[1]),)),
                x.new_empty((m_padded,), dtype=torch.float32))

    @torch.library.register_fake("rt_lynx::sparsify_compress_scaled", lib=lib)
    def _(x, m_padded, split=0):
        return (x.new_empty((compressed_numel(m_padded, x.shape[1]),)),
                x.new_empty((m_padded,), dtype=torch.float32))

    @torch.library.register_fake("rt_lynx::sparse_mm", lib=lib)
    def _(compressed, weight, m_padded):
        return weight.new_empty((m_padded, weight.shape[0]))

    @torch.library.register_fake("rt_lynx::sparse_linear", lib=lib)
    def _(x, weight, bias, compensate):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("rt_lynx::scale_bias_epilogue", lib=lib)
    def _(gemm, scale, bias, rows):
        return gemm.new_empty((rows, gemm.shape[1]))

    _define_ops.library = lib  # keep the registrations alive


_define_ops()


class PerDeviceCheck:
    """(ok, reason) of `check(index)` for a CUDA device, computed once per device index (the
    start-up self-tests), after `prerequisite(device)` holds. Never raises. The per-call path is
    one dict lookup, no lock."""

    def __init__(self, check, prerequisite=None):
        self._check, self._prerequisite = check, prerequisite
        self._by_index: dict[int, tuple[bool, str]] = {}
        self._by_device: dict[torch.device, tuple[bool, str]] = {}
        self._lock = threading.Lock()

    def __call__(self, device: torch.device) -> tuple[bool, str]:
        hit = self._by_device.get(device)
        if hit is not None:
            return hit
        if self._prerequisite is not None:
            available, reason = self._prerequisite(device)
            if not available:
                return False, reason
        try:
            device = torch.device(device)
            if device.type != "cuda":
                return False, f"device {device} is not CUDA"
            if not torch.cuda.is_available():
                return False, "CUDA is not available to torch"
            index = device.index if device.index is not None else torch.cuda.current_device()
        except Exception as exc:
            return False, f"cannot inspect device {device!r}: {exc}"
        with self._lock:
            if index not in self._by_index:
                self._by_index[index] = self._check(index)
            if device.index is not None:  # "cuda" alone follows the current device: not cached by name
                self._by_device[device] = self._by_index[index]
            return self._by_index[index]


def extension():
    """The loaded extension module (builds on first call); raises build.BuildError."""
    return _build.load_extension()


def availability(device: torch.device) -> tuple[bool, str]:
    """(True, info) when the fast path works on `device`, else (False, one-line reason).

    Cached per device; builds the extension on first call. Never raises.
    """
    return _availability(device)


def _check_device(index: int) -> tuple[bool, str]:
    try:
        capability = torch.cuda.get_device_capability(index)
        name = torch.cuda.get_device_name(index)
        if capability != (9, 0):
            return False, (f"{name} is sm_{capability[0]}{capability[1]}; the cuSPARSELt "
                           "layout is verified on Hopper (sm_90) only")
        torch_cslt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
        if torch_cslt is None:
            return False, "torch reports no cuSPARSELt (needed for the start-up layout check)"
        try:
            module = extension()
        except _build.BuildError as exc:
            return False, str(exc)
        versions = module.cusparselt_versions()
        runtime, header = versions[:3], versions[3:]
        if runtime != header:
            return False, (f"cuSPARSELt version mismatch: built against "
                           f"{'.'.join(map(str, header))}, loaded {'.'.join(map(str, runtime))}")
        # Operand A by default: operand B was not measurably faster on the H100 (the difference
        # flipped with measurement order, bench/NOTES.md) and fuses nothing more.
        # RT_LYNX_SPARSE_OPERAND=B asks for B (A if it fails).
        wants_b = os.environ.get("RT_LYNX_SPARSE_OPERAND", "").upper() == "B"
        orientation, fallback_reason = "A", ""
        with torch.cuda.device(index):
            device = torch.device("cuda", index)
            if wants_b:
                module.set_sparse_b(True)
                problem = _self_test_guarded(device)
                if problem:
                    fallback_reason = problem
                else:
                    orientation = "B"
            if orientation == "A":
                module.set_sparse_b(False)
                module.clear_plans()
                problem = _self_test_guarded(device)
                if problem:
                    return False, problem
        version = ".".join(map(str, runtime))
        how = f"structured operand {orientation}" + (
            f" (operand B failed: {fallback_reason})" if fallback_reason else "")
        return True, (f"{name}, cuSPARSELt {version} (torch's: {torch_cslt}), {how}, "
                      "self-test passed")
    except Exception as exc:  # availability never raises
        return False, self_test_error(exc)


_availability = PerDeviceCheck(_check_device)


def checked_on_device(index: int, self_test, unavailable: str, available: str) -> tuple[bool, str]:
    """(True, available) when self_test(device) returns '' on CUDA device `index`, else (False,
    "<unavailable>: <its problem>"); an exception counts as the problem. Never raises."""
    try:
        with torch.cuda.device(index):
            problem = self_test(torch.device("cuda", index))
    except Exception as exc:
        problem = self_test_error(exc)
    return (False, f"{unavailable}: {problem}") if problem else (True, available)


def self_test_error(exc: Exception) -> str:
    """One line for the log: the first line of the error, cut short."""
    text = str(exc).strip()
    return f"self-test error: {(text.splitlines()[0] if text else type(exc).__name__)[:300]}"


def _self_test_guarded(device: torch.device) -> str:
    try:
        return self_test(device)
    except Exception as exc:  # e.g. cuSPARSELt refusing an orientation
        return self_test_error(exc)


def sparse_operand() -> str:
    """'B' (activations are cuSPARSELt's structured B) or 'A'."""
    return "B" if extension().sparse_b() else "A"


def set_sparse_operand(operand: str) -> None:
    """Switch the orientation (tests and benchmarks; the start-up self-test picks the default).
    Process-wide: do not switch while other threads run the ops."""
    if operand not in ("A", "B"):
        raise ValueError(f"operand must be 'A' or 'B', got {operand!r}")
    extension().set_sparse_b(operand == "B")


def _first_difference(ours: torch.Tensor, want: torch.Tensor, rows: int, k: int) -> str:
    ours_bytes, want_bytes = ours.view(torch.uint8), want.view(torch.uint8)
    if ours_bytes.numel() != want_bytes.numel():
        return f"size {want_bytes.numel()} bytes != ours {ours_bytes.numel()}"
    if torch.equal(ours_bytes, want_bytes):
        return ""
    first = int((ours_bytes != want_bytes).nonzero()[0])
    part = "values" if first < rows * k else "metadata"
    return f"first difference in {part} at byte {first}"


def self_test(device: torch.device) -> str:
    """'' when our compressed layout equals torch._cslt_compress and cuSPARSELt's own compression
    for the orientation in use, and the product (scale folded, bias) matches the reference for
    bf16 and fp16; else a one-line description of the first difference."""
    module = extension()
    sparse_b = bool(module.sparse_b())
    generator = torch.Generator(device=device).manual_seed(1234)
    for dtype in SUPPORTED_DTYPES:
        rows, k, n = 128, 256, 64
        # No zeros: for an all-zero group cuSPARSELt may store other (equally valid) positions.
        x = torch.randn(rows, k, generator=generator, device=device).to(dtype)
        x = torch.where(x == 0, torch.ones((), dtype=dtype, device=device), x)
        compressed, _ = torch.ops.rt_lynx.sparsify_compress(x, rows)
        pruned = sparsify_nm(x)
        difference = _first_difference(compressed, torch._cslt_compress(pruned).reshape(-1), rows, k)
        if difference:
            return (f"compressed layout differs from torch._cslt_compress ({dtype}, {difference}):"
                    " unsupported cuSPARSELt version")
        own = module.compress_reference(pruned, sparse_b)
        difference = _first_difference(compressed, own[: compressed.numel() * 2], rows, k)
        if difference:
            return (f"compressed layout differs from cuSPARSELt's compression as operand "
                    f"{'B' if sparse_b else 'A'} ({dtype}, {difference})")
        for m in (rows, 37):  # a padded M too
            xm = x[:m].contiguous()
            weight = (torch.randn(n, k, generator=generator, device=device) / k ** 0.5).to(dtype)
            bias = torch.randn(n, generator=generator, device=device).to(dtype)
            got = torch.ops.rt_lynx.sparse_linear(xm, weight, bias, True)
            want = sparse_linear_reference(xm.float(), weight.float(), bias.float(), True)
            error = ((got.float() - want).norm() / want.norm()).item()
            if not error < SELF_TEST_TOLERANCE:
                return f"sparse GEMM check failed ({dtype}, M={m}): relative error {error:.2e}"
    torch.cuda.synchronize(device)
    return ""


def check_operands(x2d: torch.Tensor, weight: torch.Tensor, weight_dtype: torch.dtype, weight_hint: str,
                   n_multiple: int, k_multiple: int = K_MULTIPLE, tail_columns: int = 0) -> tuple[bool, str]:
    """The constraints every fast path shares: 2-D, 16-bit x, weight of `weight_dtype` on x's CUDA
    device, K a multiple of `k_multiple`, N of `n_multiple`, contiguous and 16-byte aligned.
    `tail_columns`: input columns the op appends to x's (the weight's K counts them)."""
    try:
        if x2d.dim() != 2 or weight.dim() != 2:
            return False, f"need 2-D x and weight, got {x2d.dim()}-D and {weight.dim()}-D"
        if x2d.dtype not in SUPPORTED_DTYPES:
            return False, f"x dtype {x2d.dtype} is not bfloat16/float16"
        if weight.dtype != weight_dtype:
            return False, f"weight dtype {weight.dtype} is not {weight_dtype}{weight_hint}"
        if not (x2d.is_cuda and weight.device == x2d.device):
            return False, "x and weight must be on the same CUDA device"
        rows, k = x2d.shape
        n, k_weight = weight.shape
        if k_weight != k + tail_columns:
            return False, f"in_features mismatch: x has {k + tail_columns}, weight has {k_weight}"
        if rows < 1:
            return False, "x has no rows"
        if k % k_multiple:
            return False, f"in_features {k} is not a multiple of {k_multiple}"
        if n % n_multiple:
            return False, f"out_features {n} is not a multiple of {n_multiple}"
        if not weight.is_contiguous():
            return False, "weight is not contiguous"
        if x2d.stride(1) != 1 or x2d.stride(0) != k:
            return False, "x is not contiguous"
        # Pointers do not exist while torch.compile traces; the ops re-check alignment at run
        # time (x: copied, weight: clear error).
        if not torch.compiler.is_compiling() and (weight.data_ptr() % 16 or x2d.data_ptr() % 16):
            return False, "x or weight is not 16-byte aligned"
        return True, "ok"
    except Exception as exc:
        return False, f"cannot inspect inputs: {exc}"


def supports(x2d: torch.Tensor, weight: torch.Tensor) -> tuple[bool, str]:
    """Whether (x2d, weight) fit the 16-bit fast path's constraints. Never raises."""
    return check_operands(x2d, weight, x2d.dtype, " (the x dtype)", N_MULTIPLE)


def sparse_linear(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  compensate: bool) -> torch.Tensor:
    """s * (sparse(x2d) @ weight^T) + bias on sparse tensor cores; M x N in x's dtype.

    Any M >= 1 (rows are padded to 64 internally). Inputs the kernels cannot take raise a
    RuntimeError naming the constraint; call `supports` first to choose another path.
    """
    return torch.ops.rt_lynx.sparse_linear(x2d, weight, bias, bool(compensate))


def plan_info():
    """Cached cuSPARSELt plans: (M_padded, K, N, bf16, alg_id, split_k, split_k_mode,
    workspace bytes, how the algorithm was chosen)."""
    return extension().plan_info()
