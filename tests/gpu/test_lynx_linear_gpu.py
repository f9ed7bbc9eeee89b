"""The whole Lynx linear on a Hopper GPU through the dispatch: fast path chosen, same math as
the reference backend, traced by torch.compile without graph breaks, fallbacks for odd shapes."""
import pytest
import torch

from kernel_helpers import require_fast_path
from rt_lynx_pack.kernels import select_backend, sparse_linear_reference
from rt_lynx_pack.lynx import LynxConfig, installed, lynx_linear, plan_model
from rt_lynx_pack.lynx.tiny_dit import TinyDiTConfig, TinyFluxDiT, random_inputs


@pytest.fixture(scope="module", autouse=True)
def fast_path():
    require_fast_path("sm90")   # the tests expect it chosen: if it is not, its own reason is the failure
    return require_fast_path()


def relative_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(1, 4608), (2, 333), (3, 5, 7)])
def test_lynx_linear_takes_the_fast_path_and_matches_the_reference(dtype, lead):
    g = torch.Generator(device="cuda").manual_seed(sum(lead))
    x = torch.randn(*lead, 3072, device="cuda", generator=g).to(dtype) ** 3
    w = (torch.randn(1024, 3072, device="cuda", generator=g) / 55).to(dtype)
    b = torch.randn(1024, device="cuda", generator=g).to(dtype)
    assert select_backend(x.reshape(-1, 3072), w, "auto", 2, 4).name == "sm90"
    y = lynx_linear(x, w, b, LynxConfig(min_tokens=1))
    want = sparse_linear_reference(x.reshape(-1, 3072).float(), w.float(), b.float(), True).reshape(*lead, 1024)
    assert y.shape == want.shape and y.dtype == dtype
    assert relative_error(y, want) < 1e-2


def test_compiled_lynx_linear_has_no_graph_break_and_matches_eager():
    x = torch.randn(2, 512, 3072, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3072, 3072, device="cuda", dtype=torch.bfloat16) / 55
    b = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
    config = LynxConfig()
    eager = lynx_linear(x, w, b, config)
    compiled = torch.compile(lambda x: lynx_linear(x, w, b, config), fullgraph=True)
    assert relative_error(compiled(x), eager) < 1e-3
    x2 = torch.randn(1, 4100, 3072, device="cuda", dtype=torch.bfloat16)  # another token count
    assert relative_error(compiled(x2), lynx_linear(x2, w, b, config)) < 1e-3


def test_shapes_the_kernel_cannot_take_fall_back_to_the_reference():
    x = torch.randn(256, 96, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(64, 96, device="cuda", dtype=torch.bfloat16)
    choice = select_backend(x, w, "auto", 2, 4)
    assert choice.name == "reference" and "96" in choice.reason
    y = lynx_linear(x, w, None, LynxConfig())
    assert torch.equal(y, sparse_linear_reference(x, w, None, True))
    x32 = torch.randn(256, 128, device="cuda")
    assert select_backend(x32, torch.randn(64, 128, device="cuda"), "auto", 2, 4).name == "reference"


def test_fp8_stored_weights_run_on_the_fast_path():
    x = torch.randn(512, 3072, device="cuda", dtype=torch.bfloat16)
    w8 = (torch.randn(3072, 3072, device="cuda") / 55).to(torch.float8_e4m3fn)
    y = lynx_linear(x, w8, None, LynxConfig())
    want = sparse_linear_reference(x.float(), w8.float(), None, True)
    assert relative_error(y, want) < 1e-2


def test_tiny_dit_on_the_gpu_matches_the_reference_backend():
    torch.manual_seed(0)
    config = TinyDiTConfig(hidden=512, heads=8)
    model = TinyFluxDiT(config).cuda().to(torch.bfloat16).eval()
    inputs = random_inputs(config, 2, 1024, 64, torch.Generator().manual_seed(1), "cuda", torch.bfloat16)
    with torch.inference_mode():
        with installed(model, plan_model(model, LynxConfig(backend="auto"))):
            fast = model(*inputs)
        with installed(model, plan_model(model, LynxConfig(backend="reference"))):
            reference = model(*inputs)
    assert torch.isfinite(fast).all()
    assert relative_error(fast, reference) < 2e-2


def test_fp8_precision_takes_the_fp8_fast_path_eager_and_compiled():
    from rt_lynx_pack.kernels import quantize_weight_fp8, sparse_linear_fp8_reference
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(2, 700, 3072, device="cuda", generator=g).to(torch.bfloat16) ** 3
    w = (torch.randn(3072, 3072, device="cuda", generator=g) / 55).to(torch.bfloat16)
    b = torch.randn(3072, device="cuda", generator=g).to(torch.bfloat16)
    wq, w_scale = quantize_weight_fp8(w)
    assert select_backend(x.reshape(-1, 3072), wq, "auto", 2, 4, "fp8").name == "sm90"
    config = LynxConfig(precision="fp8")
    want = sparse_linear_fp8_reference(x.reshape(-1, 3072), wq, w_scale, b, True).reshape(2, 700, 3072)
    eager = lynx_linear(x, w, b, config, fp8_weight=(wq, w_scale))
    assert relative_error(eager, want) < 5e-3  # only the accumulation order and y's rounding differ
    compiled = torch.compile(lambda x: lynx_linear(x, w, b, config, fp8_weight=(wq, w_scale)), fullgraph=True)
    assert relative_error(compiled(x), eager) < 1e-3


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_lynx_lora_with_both_parts_on_the_gpu_matches_the_reference_backend(precision):
    """A folded part is in the weight the fast GEMM multiplies, the runtime branch in its K extension
    (bf16); warm-up (dense) steps take the folded part off and skip the branch."""
    from rt_lynx_pack.lynx import LynxLoRA, LynxRuntime, attach_lora
    torch.manual_seed(0)
    config = TinyDiTConfig(hidden=512, heads=8)
    model = TinyFluxDiT(config).cuda().to(torch.bfloat16).eval()
    inputs = random_inputs(config, 2, 1024, 64, torch.Generator().manual_seed(1), "cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    weights = {name: p.clone() for name, p in model.state_dict().items()}
    outputs = {}
    with torch.inference_mode():
        dense = model(*inputs)
        for backend in ("auto", "reference"):
            runtime = LynxRuntime()
            plan = plan_model(model, LynxConfig(backend=backend, precision=precision), runtime=runtime)
            g.manual_seed(2)
            shapes = plan.sparse_layer_shapes
            runtime_part, folded_part = ({n: (torch.randn(16, k, generator=g) * 0.02,
                                              torch.randn(o, 16, generator=g) * 0.02) for n, (k, o) in shapes.items()}
                                         for _ in range(2))
            lora = LynxLoRA("flux", 16, 16.0, "2:4", True, runtime_part, folded_rank=16, folded_alpha=16.0,
                            folded_layers=folded_part)
            folded = attach_lora(plan, lora, 1.0)
            with installed(model, folded):
                sparse = model(*inputs)
                runtime.dense = True
                outputs[backend] = sparse, model(*inputs)
    assert all(torch.equal(weights[n], p) for n, p in model.state_dict().items())
    (fast, fast_dense), (reference, reference_dense) = outputs["auto"], outputs["reference"]
    assert torch.isfinite(fast).all()
    assert relative_error(fast, reference) < 2e-2
    assert relative_error(fast_dense, reference_dense) < 2e-3
    # The dense step is the dense model up to the patched weight's bf16 rounding.
    assert relative_error(fast_dense, dense) < 2e-2
