"""Shared helpers for the GPU kernel tests: input families, layout decoding, error measures."""
import importlib

import pytest
import torch

# (M, K, N) of the FLUX.1-dev and Qwen-Image linears at 1024x1024 (FINDINGS "Linear shapes").
FLUX_SHAPES = [
    (4096, 3072, 9216), (4096, 3072, 3072), (4096, 3072, 12288), (4096, 12288, 3072),
    (512, 3072, 9216), (512, 3072, 3072), (512, 3072, 12288), (512, 12288, 3072),
    (4608, 3072, 21504), (4608, 15360, 3072),
]
# Qwen-Image with CFG batch 2: 8192 image tokens; text assumed 256 tokens x 2 = 512.
QWEN_SHAPES = [
    (8192, 3072, 3072), (8192, 3072, 12288), (8192, 12288, 3072),
    (512, 3072, 3072), (512, 3072, 12288), (512, 12288, 3072),
]
DTYPES = [torch.bfloat16, torch.float16]
INPUT_KINDS = ["randn", "cubed", "student_t", "tied", "zero_rows"]


AVAILABILITY = {"cusparselt": "availability", "fp8": "availability_fp8", "sm90": "availability_sm90",
                "fp8_dense": "availability_fp8_dense", "block_ops": "availability_block_ops"}


def require_fast_path(name: str = "cusparselt"):
    """Skip without CUDA or Hopper; on Hopper the named fast path (kernels/<name>.py) must be
    available (else fail). Returns its module."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the kernel tests need an NVIDIA Hopper GPU")
    capability = torch.cuda.get_device_capability()
    if capability != (9, 0):
        pytest.skip(f"GPU is sm_{capability[0]}{capability[1]}; the kernels target Hopper (sm_90)")
    module = importlib.import_module(f"rt_lynx_pack.kernels.{name}")
    available, reason = getattr(module, AVAILABILITY[name])(torch.device("cuda"))
    assert available, f"{name} path unavailable on a Hopper GPU: {reason}"
    return module


def make_input(kind: str, rows: int, cols: int, dtype, generator, device="cuda", no_zeros=False):
    """Fresh inputs of one family; never all zeros unless the family asks for zero rows."""
    if kind == "randn":
        x = torch.randn(rows, cols, generator=generator, device=device)
    elif kind == "cubed":  # heavy tails
        x = torch.randn(rows, cols, generator=generator, device=device) ** 3
    elif kind == "student_t":  # df=2: normal / sqrt(chi2/2)
        z = torch.randn(rows, cols, generator=generator, device=device)
        chi2 = torch.randn(rows, cols, 2, generator=generator, device=device).square().sum(-1)
        # Capped where fp16 would overflow to inf (a chi2 draw near 0): inf inputs have no defined scale.
        x = (z / torch.sqrt(chi2 / 2 + 1e-12)).clamp(-1e4, 1e4)
    elif kind == "tied":  # values from a tiny set: many equal magnitudes in a group
        levels = torch.tensor([-2.0, -1.0, 1.0, 2.0] if no_zeros else [-2.0, -1.0, 0.0, 1.0, 2.0],
                              device=device)
        x = levels[torch.randint(len(levels), (rows, cols), generator=generator, device=device)]
    elif kind == "zero_rows":
        x = torch.randn(rows, cols, generator=generator, device=device)
        x[::3] = 0.0
    else:
        raise ValueError(kind)
    x = x.to(dtype)
    if no_zeros:
        x = torch.where(x == 0, torch.ones((), dtype=dtype, device=device), x)
    return x


def fp8_linear_case(dtype, kind, rows, k, n, generator, bias=True):
    """(x, w, b, wq, w_scale) for an fp8 linear test: x of an input family, W scaled to unit output
    variance, quantize_weight_fp8(W)."""
    from rt_lynx_pack.kernels.reference import quantize_weight_fp8
    x = make_input(kind, rows, k, dtype, generator)
    w = (torch.randn(n, k, generator=generator, device="cuda") / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=generator, device="cuda").to(dtype) if bias else None
    wq, w_scale = quantize_weight_fp8(w)
    return x, w, b, wq, w_scale


def metadata_byte_index(rows_padded: int, cols: int, device):
    """(byte index, nibble shift) of every (row, group) in the 16-bit compressed metadata."""
    r = torch.arange(rows_padded, device=device)[:, None]
    g = torch.arange(cols // 4, device=device)[None, :]
    index = ((r // 64) * 8 * cols + (g // 8) * 256 + ((r % 64) // 16) * 64 + (r % 8) * 8
             + 2 * (g % 4) + (g % 8) // 4)
    shift = ((r % 16) // 8) * 4
    return index, shift.expand_as(index)


def decode_compressed(compressed: torch.Tensor, rows: int, rows_padded: int, cols: int):
    """Kept mask (rows x cols, bool) and kept values (rows x cols/2) from our compressed buffer."""
    raw = compressed.view(torch.uint8)
    meta = raw[rows_padded * cols: rows_padded * cols * 9 // 8]
    index, shift = metadata_byte_index(rows_padded, cols, compressed.device)
    codes = (meta[index].to(torch.int32) >> shift) & 0xF
    low, high = codes & 3, codes >> 2
    position = torch.arange(4, device=compressed.device)
    kept = (position == low[..., None]) | (position == high[..., None])
    values = compressed[: rows_padded * cols // 2].view(rows_padded, cols // 2)
    return kept.reshape(rows_padded, cols)[:rows], values[:rows], (low < high)[:rows]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    denominator = want.norm().item()
    return (got - want).norm().item() / (denominator if denominator > 0 else 1.0)


def fp32_lynx(x, weight, bias, compensate):
    """s * (sparse(x) @ W^T) + b with fp32 math on the same sparsified input."""
    from rt_lynx_pack.kernels.reference import norm_compensation_scale, sparsify_nm
    kept = sparsify_nm(x)
    y = kept.float() @ weight.float().t()
    if compensate:
        y = y * norm_compensation_scale(x, kept)
    if bias is not None:
        y = y + bias.float()
    return y


def poison_allocator(numel_bytes: int, device="cuda"):
    """Fill, then free, a block at least as large as the next outputs: torch's caching allocator
    hands the NaN-filled memory to the op's outputs, so unwritten elements show as NaN."""
    # 0xFFFF is NaN as fp16 and bf16, and 0xFFFFFFFF as fp32.
    block = torch.full((numel_bytes // 2 + 4096,), -1, dtype=torch.int16, device=device)
    del block


QUEUE_CYCLES = 20_000_000   # about 10 ms of GPU clock: longer than the host takes to launch a chain


def assert_launch_modes_give_the_same_bytes(run, switched, poison_bytes: int):
    """run() under switched(False) and switched(True) (context managers: plain and programmatic
    launches) in turns, as a race need not show every time; each over NaN-poisoned memory and queued
    behind a long kernel, so every launch is waiting in the stream when the one before it ends (else
    the host's launch time can leave nothing to overlap). The outputs must be the plain launches'
    bytes: the kernels are deterministic."""
    outputs = {}
    for programmatic in (False, True, False, True):
        with switched(programmatic):
            poison_allocator(poison_bytes)
            torch.cuda._sleep(QUEUE_CYCLES)
            y = run()
            torch.cuda.synchronize()
        assert not y.isnan().any(), f"programmatic={programmatic}: poisoned memory read or left"
        outputs.setdefault(programmatic, []).append(y)
    plain = outputs[False][0]
    for y in outputs[False][1:] + outputs[True]:
        assert torch.equal(y, plain), "programmatic launch changed the result"


def padded(rows: int) -> int:
    """Rows padded to the compressed layout's 64-row tiles."""
    return (rows + 63) // 64 * 64


LINEAR_TOLERANCE = 1e-2  # relative error of a Lynx linear vs fp32 math on the same sparsified input


def check_lynx_linear(linear, x, weight, bias, compensate):
    """y = linear(x, weight, bias, compensate) into poisoned memory: shaped and strided like
    F.linear's output, every element written, within LINEAR_TOLERANCE of fp32 math and of the
    reference. Returns y."""
    from rt_lynx_pack.kernels.reference import sparse_linear_reference
    rows, n = x.shape[0], weight.shape[0]
    poison_allocator((padded(rows) * x.shape[1] * 9 // 8 + 2 * padded(rows) * n) * 2)
    y = linear(x, weight, bias, compensate)
    assert y.shape == (rows, n) and y.dtype == x.dtype and y.is_contiguous()
    assert y.stride() == (n, 1), "y must look like F.linear's output"
    assert not y.isnan().any(), "output not fully written (poisoned NaN left)"
    error_fp32 = relative_error(y, fp32_lynx(x, weight, bias, compensate))
    assert error_fp32 < LINEAR_TOLERANCE, f"relative error vs fp32 math {error_fp32:.2e}"
    error_reference = relative_error(y, sparse_linear_reference(x, weight, bias, compensate))
    assert error_reference < LINEAR_TOLERANCE, f"relative error vs reference {error_reference:.2e}"
    return y


def check_zero_tokens_give_the_bias(y, x, bias):
    """A token of zeros has nothing to keep: its output is exactly the bias (or zero)."""
    zero_rows = (x == 0).all(dim=1)
    if zero_rows.any():
        n = y.shape[1]
        want = bias.to(y.dtype) if bias is not None else torch.zeros(n, dtype=y.dtype, device=y.device)
        assert torch.equal(y[zero_rows], want.expand(int(zero_rows.sum()), n))


def negative_tail(rows: int, cols: int, dtype, generator, device="cuda"):
    """GELU inputs in [-7, -3.4], where the fast GELU (sm90.fast_gelu) and torch's differ most (its
    1 + tanh(u) cancels there, and is -0 below about -5.6): with these a kernel that did not get
    the switch gives other bytes."""
    return (torch.rand(rows, cols, generator=generator, device=device) * -3.6 - 3.4).to(dtype)


def assert_gelu_close(got, want, x):
    """A GELU computed the fast way (sm90.fast_gelu) against torch's, elementwise: within one ulp of
    the 16-bit type, plus |x| 2^-21 where torch's 1 + tanh(u) cancels in fp32 (the negative tail,
    where its result is off by a few fp32 ulps of 1 times x); NaN where torch's is NaN."""
    assert torch.equal(got.isnan(), want.isnan()), "NaN in one and not the other"
    info = torch.finfo(want.dtype)
    got, want, x = got.float().nan_to_num(), want.float().nan_to_num(), x.float().nan_to_num()
    exponent = torch.floor(torch.log2(want.abs().clamp_min(info.tiny)))
    ulp = torch.exp2(exponent) * info.eps   # at least the subnormal spacing, info.tiny * eps
    bound = ulp + x.abs() * 2.0 ** -21
    excess = ((got - want).abs() - bound).max().item()
    assert excess <= 0, f"fast GELU off by {excess:.3g} past one ulp"

