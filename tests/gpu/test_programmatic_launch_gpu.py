"""GPU tests of programmatic dependent launch (sm90.programmatic_launch): the sparse GEMM and the
sparsify passes may start while the kernel before them in the stream ends, so each must wait for
it before touching memory. A missing wait is a race, seen here as outputs that differ from the
plain launches' or NaN from poisoned memory.

Each case chains Lynx linears so that every pass reads what the GEMM just before it wrote (the GEMM
lets the next launch begin at its last tiles) and every GEMM reads what its pass just wrote, over
NaN-poisoned memory, eagerly and in a CUDA graph. An eager chain is queued behind a long kernel, so
every launch is waiting in the stream when the one before it ends (else the host's launch time can
leave nothing to overlap). The kernels are deterministic, so the outputs must be bit for bit those
of plain launches, which in turn must match fp32 math.
"""
import contextlib

import pytest
import torch

from rt_lynx_pack.kernels.reference import (gelu_tanh_reference, modulated_layer_norm_reference, quantize_weight_fp8,
                                            sparse_linear_fp8_reference)

from kernel_helpers import (DTYPES, assert_launch_modes_give_the_same_bytes, fp32_lynx, make_input, poison_allocator,
                            relative_error, require_fast_path)

WIDTH = 3072        # every linear of a chain is WIDTH x WIDTH, so each output is the next input
LINKS = 6
TOLERANCE = 1e-2
EPS = 1e-6
PATHS = ["plain", "chunked_pass", "lora_fused_down", "lora_cublas_down", "modulated_lora", "gelu_lora", "fp8"]


@pytest.fixture(scope="module")
def sm90():
    return require_fast_path("sm90")


def _weights(generator, dtype, rank=32):
    scale = WIDTH ** -0.5
    links = []
    for _ in range(LINKS):
        links.append(dict(weight=(torch.randn(WIDTH, WIDTH, generator=generator, device="cuda") * scale).to(dtype),
                          bias=torch.randn(WIDTH, generator=generator, device="cuda").to(dtype),
                          down=(torch.randn(rank, WIDTH, generator=generator, device="cuda") * scale).to(dtype),
                          up=(torch.randn(WIDTH, rank, generator=generator, device="cuda") / rank ** 0.5).to(dtype)))
    return links


def _link(sm90, path, x, link, tokens):
    """One Lynx linear of `path` on x; its output (rows x WIDTH) feeds the next link."""
    weight, bias = link["weight"], link["bias"]
    if path in ("plain", "chunked_pass"):
        return sm90.sparse_linear_sm90(x, weight, bias, True)
    if path == "fp8":
        return sm90.sparse_linear_fp8_sm90(x, link["wq"], link["w_scale"], bias, True)
    up_ext = link["up_ext"]
    if path in ("lora_fused_down", "lora_cublas_down"):
        return sm90.sparse_linear_lora_sm90(x, weight, bias, True, link["down"], up_ext)
    if path == "gelu_lora":
        return sm90.sparse_linear_gelu_sm90(x, weight, None, bias, True, link["down"], up_ext)
    images = x.shape[0] // tokens
    shift, scale1p = link["shift"][:images], link["scale1p"][:images]
    return sm90.sparse_linear_modulated_sm90(x, shift, scale1p, tokens, EPS, weight, None, bias, True,
                                             link["down"], up_ext)


def _chain(sm90, path, x, links, tokens):
    for link in links:
        x = _link(sm90, path, x, link, tokens)
    return x


def _switches(sm90, path, programmatic):
    with contextlib.ExitStack() as stack:   # a switch entered before a failing one is set back
        stack.enter_context(sm90.programmatic_launch(programmatic))
        stack.enter_context(sm90.staged_sparsify(path != "chunked_pass"))
        stack.enter_context(sm90.low_rank_fusion(path != "lora_cublas_down"))
        return stack.pop_all()


def _prepared(sm90, path, links, generator, dtype, images):
    for link in links:
        if path == "fp8":
            link["wq"], link["w_scale"] = quantize_weight_fp8(link["weight"].float())
        link["up_ext"] = sm90.k_extension_up(link["up"], 0.5)
        link["shift"] = (torch.randn(images, WIDTH, generator=generator, device="cuda") / 4).to(dtype)
        link["scale1p"] = (1 + torch.randn(images, WIDTH, generator=generator, device="cuda") / 4).to(dtype)
    return links


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("images,tokens", [(1, 4096), (2, 333), (1, 77)])
def test_chained_linears_give_the_plain_launches_bytes(sm90, generator, dtype, path, images, tokens):
    rows = images * tokens
    links = _prepared(sm90, path, _weights(generator, dtype), generator, dtype, images)
    x = make_input("student_t", rows, WIDTH, dtype, generator)
    with _switches(sm90, path, False):
        _chain(sm90, path, x, links, tokens)   # the GEMM configs are chosen on a shape's first call
    assert_launch_modes_give_the_same_bytes(lambda: _chain(sm90, path, x, links, tokens),
                                            lambda programmatic: _switches(sm90, path, programmatic), 64 * rows * WIDTH)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_chained_linears_in_a_cuda_graph_give_the_plain_launches_bytes(sm90, generator, dtype, path):
    # A new input before each replay: a kernel that read the graph's buffers too early would see
    # the previous replay's values.
    images, tokens = 1, 4096
    links = _prepared(sm90, path, _weights(generator, dtype), generator, dtype, images)
    inputs = [make_input(kind, images * tokens, WIDTH, dtype, generator) for kind in ("randn", "student_t", "cubed")]
    with _switches(sm90, path, False):
        plain = [_chain(sm90, path, x, links, tokens) for x in inputs]
    x = inputs[0].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), _switches(sm90, path, True):
        _chain(sm90, path, x, links, tokens)   # workspaces before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            y = _chain(sm90, path, x, links, tokens)
    torch.cuda.current_stream().wait_stream(stream)
    for turn in range(6):
        x.copy_(inputs[turn % len(inputs)])
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, plain[turn % len(inputs)]), "programmatic launch in a CUDA graph changed the result"


def _want(path, x, link, tokens):
    """fp32 math of one link on the same sparsified input (the branch of the prepared input)."""
    weight, bias = link["weight"].float(), link["bias"].float()
    if path == "fp8":
        return sparse_linear_fp8_reference(x.float(), link["wq"], link["w_scale"], bias, True)
    rows = x
    if path.startswith("modulated"):
        images = x.shape[0] // tokens
        rows = modulated_layer_norm_reference(x, link["shift"][:images], link["scale1p"][:images], tokens, EPS)
    elif path == "gelu_lora":
        rows = gelu_tanh_reference(x)
    want = fp32_lynx(rows, weight, bias, True)
    if "lora" in path:
        want = want + (rows.float() @ link["down"].float().t()) @ (0.5 * link["up"].float()).t()
    return want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_one_link_of_each_path_matches_fp32_math(sm90, generator, dtype, path):
    # The bitwise comparisons above would pass if both launch modes were wrong alike.
    images, tokens = 2, 333
    x = make_input("randn", images * tokens, WIDTH, dtype, generator)
    link = _prepared(sm90, path, _weights(generator, dtype), generator, dtype, images)[0]
    with _switches(sm90, path, True):
        poison_allocator(64 * images * tokens * WIDTH)
        y = _link(sm90, path, x, link, tokens)
    assert not y.isnan().any()
    assert relative_error(y, _want(path, x, link, tokens)) < TOLERANCE


def test_the_switch_is_off_by_default_and_comes_back(sm90):
    current = sm90._cusparselt.extension().programmatic_launch
    assert not current()
    with sm90.programmatic_launch(True):
        assert current()
    assert not current()
