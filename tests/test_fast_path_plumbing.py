"""The fast path's plumbing that runs without a GPU: op schemas and fake kernels (what torch.compile
traces), backend selection by environment, and the sm90 library's build cache key."""
import importlib.util
import pathlib
import shutil

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from rt_lynx_pack.kernels import build, dispatch, sm90


@pytest.mark.parametrize("rows", [1, 100, 4096])
def test_sm90_fake_kernels_give_the_shapes_the_cuda_ops_return(rows):
    k, n = 3072, 1024
    with FakeTensorMode():
        x = torch.empty(rows, k, dtype=torch.bfloat16, device="cuda")
        weight = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
        wq = torch.empty(n, k, dtype=torch.float8_e4m3fn, device="cuda")
        w_scale = torch.empty(n, dtype=torch.float32, device="cuda")
        y = torch.ops.rt_lynx.sparse_linear_sm90(x, weight, None, True)
        y8 = torch.ops.rt_lynx.sparse_linear_fp8_sm90(x, wq, w_scale, None, True)
        down = torch.empty(32, k, dtype=torch.bfloat16, device="cuda")
        up_ext = torch.empty(n, 64, dtype=torch.bfloat16, device="cuda")
        y_lora = torch.ops.rt_lynx.sparse_linear_lora_sm90(x, weight, None, True, down, up_ext)
        compressed, scale = torch.ops.rt_lynx.sparsify_sm90(x, 128, False, True)
        compressed8, scale8 = torch.ops.rt_lynx.sparsify_sm90(x, 128, True, True)
        mm = torch.ops.rt_lynx.sparse_mm_sm90(compressed8, wq, scale8, w_scale, None, rows, 0, torch.float16)
        shift = torch.empty(1, k, dtype=torch.bfloat16, device="cuda")
        y_mod = torch.ops.rt_lynx.sparse_linear_modulated_sm90(x, shift, shift, rows, 1e-6, weight, None, None, True)
        y_mod8 = torch.ops.rt_lynx.sparse_linear_modulated_sm90(x, shift, shift, rows, 1e-6, wq, w_scale, None, True)
        compressed_mod, _ = torch.ops.rt_lynx.sparsify_sm90(x, 64, False, True, shift, shift, rows, 1e-6)
        y_gelu = torch.ops.rt_lynx.sparse_linear_gelu_sm90(x, wq, w_scale, None, True)
        compressed_gelu, _ = torch.ops.rt_lynx.sparsify_sm90(x, 128, True, True, gelu=True)
    padded = (rows + 63) // 64 * 64
    assert (y.shape, y.dtype) == ((rows, n), torch.bfloat16)
    assert (y8.shape, y8.dtype) == ((rows, n), torch.bfloat16)
    assert (y_lora.shape, y_lora.dtype) == ((rows, n), torch.bfloat16)
    # values (K/2 per row) + metadata (K/8 bytes per row), rows padded to CUTLASS's 64-row atom
    assert (compressed.shape, compressed.dtype) == ((padded * k * 9 // 16,), torch.bfloat16)
    assert (compressed8.shape, compressed8.dtype) == ((padded * k * 5 // 8,), torch.uint8)
    assert scale.shape == scale8.shape == (padded,)
    assert (mm.shape, mm.dtype) == ((rows, n), torch.float16)
    assert y_mod.shape == y_mod8.shape == y_gelu.shape == (rows, n) and compressed_mod.shape == compressed.shape
    assert compressed_gelu.shape == compressed8.shape


@pytest.mark.parametrize("rank", [1, 5, 32, 64])
def test_k_extension_form_of_up_puts_each_value_where_u_lands(rank):
    up = torch.randn(48, rank)
    extension = sm90.k_extension_up(up, 0.5)
    assert extension.shape == (48, -(-2 * rank // 8) * 8)   # 16-byte rows
    # u's value j is at position j % 2 of 2:4 group j // 2: the GEMM's dense equivalent of the
    # extension is u interleaved the same way, and it must reproduce u @ (0.5 * up)^T.
    u = torch.randn(7, rank)
    u_spread = torch.zeros(7, extension.shape[1])
    j = torch.arange(rank)
    u_spread[:, 4 * (j // 2) + j % 2] = u
    torch.testing.assert_close(u_spread @ extension.t(), u @ (0.5 * up).t())
    groups = extension.view(48, -1, 4)
    assert (groups[:, :, 2:] == 0).all(), "positions 2 and 3 of each group meet zeros of A: keep them zero"


def test_low_rank_branch_is_added_after_where_no_sparse_gemm_runs():
    operands = dispatch.prepare_low_rank(torch.randn(4, 64), torch.randn(32, 4), 0.5, torch.device("cpu"),
                                         torch.bfloat16)
    assert operands.up_k_extension is None and operands.down.dtype == torch.bfloat16
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    plain = dispatch.sparse_linear(x, w, None, True)
    with_branch = dispatch.sparse_linear(x, w, None, True, low_rank=operands)
    torch.testing.assert_close(with_branch, plain + dispatch.low_rank_reference(x, operands))


def test_gemm_form_of_the_branch_only_where_the_sm90_gemm_can_take_it(monkeypatch):
    # As if the sm90 GEMM ran here: the K-extension form of up is built for the calls that can
    # use it, and not for the reference backend, the fp8 GEMM or fp32 (it would be dead memory).
    monkeypatch.delenv("RT_LYNX_GEMM", raising=False)
    monkeypatch.setattr(dispatch, "backend_availability", lambda device, precision, backend: (True, ""))
    factors = (torch.randn(4, 64), torch.randn(32, 4), 0.5, torch.device("cpu"))
    assert dispatch.prepare_low_rank(*factors, torch.bfloat16).up_k_extension is not None
    assert dispatch.prepare_low_rank(*factors, torch.float16, "cuda").up_k_extension is not None
    assert dispatch.prepare_low_rank(*factors, torch.bfloat16, "reference").up_k_extension is None
    assert dispatch.prepare_low_rank(*factors, torch.bfloat16, "auto", "fp8").up_k_extension is None
    assert dispatch.prepare_low_rank(*factors, torch.float32).up_k_extension is None
    monkeypatch.setenv("RT_LYNX_GEMM", "cusparselt")
    assert dispatch.prepare_low_rank(*factors, torch.bfloat16).up_k_extension is None


def test_branch_prepared_per_config():
    from rt_lynx_pack.lynx import LowRankBranch, LynxConfig
    branch = LowRankBranch(torch.randn(4, 64), torch.randn(32, 4), 0.5)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    first = branch.operands_for(x, LynxConfig())
    assert branch.operands_for(x) is first, "the default config is LynxConfig(): no second copy"
    reference = branch.operands_for(x, LynxConfig(backend="reference"))
    assert reference is not first and reference.down.dtype == torch.bfloat16


def test_rt_lynx_gemm_restricts_the_fast_backends(monkeypatch):
    monkeypatch.delenv("RT_LYNX_GEMM", raising=False)
    assert dispatch.fast_backends() == ("sm90", "cusparselt")
    monkeypatch.setenv("RT_LYNX_GEMM", "cusparselt")
    assert dispatch.fast_backends() == ("cusparselt",)
    monkeypatch.setenv("RT_LYNX_GEMM", "cublas")
    with pytest.raises(ValueError, match="RT_LYNX_GEMM='cublas'"):
        dispatch.fast_backends()


def test_sm90_supports_names_the_constraint_on_cpu():
    supported, why_not = sm90.supports_sm90(torch.randn(64, 256), torch.randn(32, 256))
    assert not supported and "float32" in why_not


def test_cutlass_headers_are_found_from_the_pip_package():
    if importlib.util.find_spec("cutlass_library") is None:
        pytest.skip("nvidia-cutlass is not installed here (requirements.txt installs it)")
    folders = build.find_cutlass()
    assert (folders[0] / "cutlass" / "cutlass.h").exists()
    assert (folders[1] / "cutlass" / "util" / "packed_stride.hpp").exists()


def test_missing_cutlass_headers_give_one_clear_reason(monkeypatch):
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(build.BuildError, match=r"CUTLASS headers not found \(pip install nvidia-cutlass\)"):
        build.find_cutlass()


def test_sm90_library_cache_key_follows_the_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("RT_LYNX_BUILD_DIR", str(tmp_path / "build"))
    if importlib.util.find_spec("cutlass_library") is None:
        pytest.skip("nvidia-cutlass is not installed here (requirements.txt installs it)")
    monkeypatch.setattr(build, "_nvcc", lambda: shutil.which("true") or "/bin/true")
    sources = []
    for source in build.SM90_SOURCES:
        copy = tmp_path / source.name
        copy.write_bytes(source.read_bytes())
        sources.append(copy)
    monkeypatch.setattr(build, "SM90_SOURCES", sources)
    first = build.sm90_library_path()
    assert first == build.sm90_library_path()
    assert first.parent.parent == tmp_path / "build"
    sources[1].write_text(sources[1].read_text() + "\n// changed\n")
    assert build.sm90_library_path() != first


def test_sm90_build_jobs_follow_max_jobs(monkeypatch):
    monkeypatch.setenv("MAX_JOBS", "3")
    assert build._sm90_jobs() == 3
    monkeypatch.delenv("MAX_JOBS")
    assert 1 <= build._sm90_jobs() <= len(build.SM90_SOURCES)


def test_build_error_line_prefers_the_compiler_error():
    text = "FAILED: a.o\nin file a.cu(3): error: no member\nninja: build stopped: subcommand failed."
    assert build._first_error_line(text) == "in file a.cu(3): error: no member"


def test_every_sm90_source_the_build_names_exists():
    for path in build.SM90_SOURCES + build.SM90_HEADERS + build.SOURCES + build.HEADERS:
        assert pathlib.Path(path).exists(), path


@pytest.mark.parametrize("rows", [1, 4608])
def test_fp8_dense_fake_kernel_gives_the_shapes_the_cuda_op_returns(rows):
    with FakeTensorMode():
        q, a = torch.ops.rt_lynx.quantize_rows_fp8(torch.empty(rows, 15360, dtype=torch.bfloat16, device="cuda"))
    assert q.shape == (rows, 15360) and q.dtype == torch.float8_e4m3fn
    assert a.shape == (rows, 1) and a.dtype == torch.float32


def test_a_load_device_without_index_holds_the_weights_on_the_current_gpu():
    # ComfyUI's load device may be torch.device("cuda"); weights report cuda:0. Taking them for
    # different devices would make the fp8 precision requantise every weight on every call.
    from rt_lynx_pack.nodes.comfy_glue import _same_device
    assert _same_device(torch.device("cuda", 0), torch.device("cuda"))
    assert _same_device(torch.device("cuda", 1), torch.device("cuda", 1))
    assert not _same_device(torch.device("cuda", 0), torch.device("cuda", 1))
    assert not _same_device(torch.device("cpu"), torch.device("cuda"))
