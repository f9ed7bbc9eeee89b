"""The fast path's plumbing that runs without a GPU: op schemas and fake kernels (what torch.compile
traces), backend selection by environment, the sm90 library's build cache key, and the path from
a fused block to the sm90 ops (simulated on the CPU) in one compiled graph."""
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
        y_mod_lora = torch.ops.rt_lynx.sparse_linear_modulated_sm90(x, shift, shift, rows, 1e-6, weight, None, None,
                                                                     True, down, up_ext)
        y_gelu_lora = torch.ops.rt_lynx.sparse_linear_gelu_sm90(x, weight, None, None, True, down, up_ext)
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
    assert y_mod_lora.shape == y_gelu_lora.shape == (rows, n)
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


@pytest.fixture
def sm90_on_the_cpu(monkeypatch):
    """The sm90 path taken on the CPU: the dispatch sees the backend available, and the ops' CPU
    kernels (for this test only) compute the reference math of their arguments. The Python between
    a block and the kernels then runs, and compiles, as it does on a GPU; a wrong argument on the
    way (shift, tokens, the branch's factors, the GELU tail, a gated residual) changes the numbers.
    Returns the names of the ops called, with " + residual" where the call took a gated residual."""
    from rt_lynx_pack.kernels import fp8_dense, reference
    calls = []

    def product(rows, weight, w_scale, bias, compensate, down=None, up_ext=None):
        # In the rows' dtype, as the reference backend computes it.
        if w_scale is None:
            y = reference.sparse_linear_reference(rows, weight, bias, compensate)
        else:
            y = reference.sparse_linear_fp8_reference(rows, weight, w_scale, bias, compensate)
        if down is not None:   # up from its K-extension form: u's value j sits at column 4 (j // 2) + j % 2
            j = torch.arange(down.shape[0])
            y = y + torch.nn.functional.linear(torch.nn.functional.linear(rows, down), up_ext[:, 4 * (j // 2) + j % 2])
        return y

    def counted(name, fn):
        return lambda *args: calls.append(name) or fn(*args)

    def gated(name, y, residual, gate):
        # The unfused ops' roundings (the GEMM adds it before rounding y): the same bits as they make.
        if residual is None:
            return y
        calls.append(f"{name} + residual")
        return torch.addcmul(residual, gate.reshape(1, -1), y)

    def dense_residual(y, residual, gate):
        return y if residual is None else torch.ops.rt_lynx.scaled_mm_residual(y, gate, y, gate, None, residual, True)

    kernels = {
        "scaled_mm_residual": lambda y, gate, _y, _gate, bias, residual, fast: torch.addcmul(
            residual, gate.reshape(1, -1), y),
        "sparse_linear_modulated_sm90": lambda x, shift, scale1p, tokens, eps, *rest: product(
            reference.modulated_layer_norm_reference(x, shift, scale1p, tokens, eps), *rest),
        "sparse_linear_gelu_sm90": lambda x, weight, w_scale, bias, compensate, down=None, up_ext=None, residual=None,
        gate=None: gated(
            "sparse_linear_gelu_sm90", product(reference.gelu_tanh_reference(x), weight, w_scale, bias, compensate,
                                               down, up_ext), residual, gate),
        "sparse_linear_sm90": lambda x, weight, bias, compensate, residual=None, gate=None: gated(
            "sparse_linear_sm90", product(x, weight, None, bias, compensate), residual, gate),
        "sparse_linear_lora_sm90": lambda x, weight, bias, compensate, down, up_ext, residual=None, gate=None: gated(
            "sparse_linear_lora_sm90", product(x, weight, None, bias, compensate, down, up_ext), residual, gate),
        "sparse_linear_fp8_sm90": lambda x, wq, w_scale, bias, compensate, residual=None, gate=None: gated(
            "sparse_linear_fp8_sm90", product(x, wq, w_scale, bias, compensate), residual, gate),
        "quantize_rows_fp8": lambda x, tail=None: reference.quantize_rows_fp8(
            x if tail is None else reference.cat_gelu_tanh_reference(x, tail)),
        "cat_gelu_tanh": reference.cat_gelu_tanh_reference,
    }
    with torch.library._scoped_library("rt_lynx", "IMPL") as lib:
        for name, kernel in kernels.items():
            lib.impl(name, counted(name, kernel), "CPU")
        monkeypatch.delenv("RT_LYNX_GEMM", raising=False)
        monkeypatch.setattr(dispatch, "backend_availability", lambda device, precision, backend: (True, "simulated"))
        monkeypatch.setattr(sm90, "supports_sm90", lambda x2d, weight: (True, ""))
        monkeypatch.setattr(sm90, "_prologue_fits", lambda k: True)
        monkeypatch.setattr(sm90, "_low_rank_fused_constant", lambda rank: rank <= 32)
        monkeypatch.setattr(fp8_dense, "supports_fp8_dense", lambda x2d, wq, gelu_tail=None: (True, ""))
        # The fp8 dense product: the quantise op, then torch._scaled_mm's math (no CPU kernel here).
        # With a residual, the sum runs in the residual GEMM's op (its CPU kernel here takes y and the gate
        # in place of q and a): recorded at run time like the others, with the unfused roundings.
        monkeypatch.setattr(fp8_dense, "dense_linear_fp8", lambda x2d, wq, w_scale, bias, gelu_tail=None,
                            residual=None, gate=None: dense_residual(reference._scaled_product_fp8(
                                *torch.ops.rt_lynx.quantize_rows_fp8(x2d, gelu_tail), wq, w_scale,
                                None if bias is None else bias.float()).to(x2d.dtype), residual, gate))
        yield calls


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("with_lora", [False, True])
@pytest.mark.parametrize("images", [1, 2])
def test_fused_block_parts_reach_the_fast_ops_and_compile_in_one_graph(sm90_on_the_cpu, precision, with_lora, images):
    from rt_lynx_pack.lynx import LowRankBranch, LynxConfig, LynxLinearForward, LynxRuntime
    from rt_lynx_pack.lynx.fused_blocks import (_gated_residual, _linear_of_cat_activation, _mlp_with_residual,
                                                _modulated_linears, _Modulation)
    g = torch.Generator().manual_seed(11)
    dtype, tokens, hidden = torch.bfloat16, 24, 64
    runtime = LynxRuntime()

    def patched(module, config, sparse=True):
        module = module.to(dtype)
        forward = LynxLinearForward(module, "layer", config, runtime, sparse=sparse)
        if with_lora and sparse:
            branch = LowRankBranch(torch.randn(8, module.in_features) / 8, torch.randn(module.out_features, 8) / 8, 1.0)
            branch.prepare(torch.device("cpu"), dtype, config)
            forward = forward.with_lora(branch)
        if precision == "fp8":
            forward.prepare_fp8(module.weight)
        module.forward = forward.bound_to(module)
        return module

    def layers(config):
        torch.manual_seed(5)   # the same weights and branches for both configs
        return (patched(torch.nn.Linear(hidden, 3 * hidden), config),
                torch.nn.Sequential(patched(torch.nn.Linear(hidden, 4 * hidden), config),
                                    torch.nn.GELU(approximate="tanh"),
                                    patched(torch.nn.Linear(4 * hidden, hidden), config)),
                # linear2 stays dense: a plain layer in bf16, the e4m3 dense product in fp8
                patched(torch.nn.Linear(5 * hidden, hidden), config, sparse=False) if precision == "fp8"
                else torch.nn.Linear(5 * hidden, hidden).to(dtype),
                patched(torch.nn.Linear(hidden, hidden), config))   # an attention output projection
    norm = torch.nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
    x = (torch.randn(images, tokens, hidden, generator=g) * 3 + 1).to(dtype)
    shift, scale, gate = (torch.randn(images, 1, hidden, generator=g).to(dtype) / 4 for _ in range(3))
    projected = torch.randn(images, tokens, 7 * hidden, generator=g).to(dtype)

    def block(parts, x, projected):
        qkv, mlp, linear2, proj = parts
        (a,) = _modulated_linears((qkv,), norm, x, shift, scale)
        b = _mlp_with_residual(mlp, norm, x, _Modulation(shift, scale, gate))
        c = _linear_of_cat_activation(linear2, projected[..., :hidden], projected[..., 3 * hidden:],
                                      torch.nn.GELU(approximate="tanh"), x, gate)
        d = _gated_residual(proj, x, gate, projected[..., :hidden])
        return a, b, c, d
    fast = layers(LynxConfig(precision=precision, min_tokens=1))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, p: block(fast, x, p), backend="eager", fullgraph=True)(x, projected)
    called = set(sm90_on_the_cpu)
    proj_op = {"bf16": "sparse_linear_lora_sm90" if with_lora else "sparse_linear_sm90",
               "fp8": "sparse_linear_fp8_sm90"}[precision]
    want = {"sparse_linear_modulated_sm90", "sparse_linear_gelu_sm90", proj_op}
    want |= {"quantize_rows_fp8"} if precision == "fp8" else {"cat_gelu_tanh"}
    if precision == "fp8" and with_lora:   # the fp8 product adds its branch after, from the input written out
        want = {"sparse_linear_fp8_sm90", "quantize_rows_fp8"}
    elif images == 1:   # one gate row: the residual goes into the GEMM's epilogue
        want |= {"sparse_linear_gelu_sm90 + residual", f"{proj_op} + residual"}
    if precision == "fp8" and images == 1:   # linear2, the dense e4m3 GEMM
        want |= {"scaled_mm_residual"}
    assert called == want
    slow = layers(LynxConfig(precision=precision, min_tokens=1, backend="reference"))
    for got, expected in zip(compiled, block(slow, x, projected)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)   # the same math, the same roundings
