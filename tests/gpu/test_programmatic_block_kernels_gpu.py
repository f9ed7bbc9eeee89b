"""GPU tests of programmatic dependent launch for the kernels around the Lynx linears in an fp8
block: the quantise pass of a layer kept dense, the e4m3-weight GEMV of the modulations and the
fused q/k norm + RoPE. With sm90.programmatic_launch on, each may start while the kernel before it
ends, so each must wait for it before touching memory (test_programmatic_launch_gpu.py covers the
sparse GEMM and the sparsify passes the same way).

A chain of blocks makes every one of the three read what the kernel just before it wrote, over
NaN-poisoned memory, eagerly (queued behind a long kernel) and in a CUDA graph; the outputs must be
the plain launches' bytes, which in turn must match the reference ops.
"""
import pytest
import torch

from rt_lynx_pack.kernels import fp8_dense, quantize_weight_fp8
from rt_lynx_pack.kernels.reference import (dense_linear_fp8_reference, linear_e4m3_weight_reference,
                                            qk_norm_rope_reference)

from kernel_helpers import (DTYPES, assert_launch_modes_give_the_same_bytes, make_input, poison_allocator,
                            relative_error, require_fast_path)

HEADS, HEAD_DIM = 24, 128
WIDTH = HEADS * HEAD_DIM   # a block's input and each of q, k, v
LINKS = 4
EPS = 1e-6


@pytest.fixture(scope="module")
def kernels():
    require_fast_path("fp8_dense")
    require_fast_path("block_ops")
    return require_fast_path("sm90")


def _links(generator, dtype, tokens):
    angles = torch.rand(1, 1, tokens, HEAD_DIM // 2, generator=generator, device="cuda") * 1000
    cos, sin = torch.cos(angles), torch.sin(angles)
    pe = torch.stack([cos, -sin, sin, cos], dim=-1).reshape(1, 1, tokens, HEAD_DIM // 2, 2, 2)
    links = []
    for _ in range(LINKS):
        qkv_weight = torch.randn(3 * WIDTH, WIDTH, generator=generator, device="cuda").to(dtype) * WIDTH ** -0.5
        modulation_weight = torch.randn(WIDTH, WIDTH, generator=generator, device="cuda").to(dtype) * WIDTH ** -0.5
        links.append(dict(qkv=quantize_weight_fp8(qkv_weight), modulation=quantize_weight_fp8(modulation_weight),
                          bias=torch.randn(3 * WIDTH, generator=generator, device="cuda").to(dtype),
                          norms=[torch.rand(HEAD_DIM, generator=generator, device="cuda").to(dtype) + 0.5
                                 for _ in range(2)], pe=pe))
    return links


def _block(x, link, index, reference=False):
    """(next x, modulation rows) of one block. Even links run the GEMV right after the GEMM and the
    q/k pass after it; odd links the other way round: so each of the three kernels, in one link or
    the other, reads what the kernel just before it wrote (the quantise pass reads q)."""
    wq, w_scale = link["qkv"]
    if reference:
        dense, gemv, qk = dense_linear_fp8_reference, linear_e4m3_weight_reference, qk_norm_rope_reference
    else:
        dense, gemv = fp8_dense.dense_linear_fp8, fp8_dense.linear_e4m3_weight
        qk = torch.ops.rt_lynx.qk_norm_rope
    h = dense(x, wq, w_scale, link["bias"]).to(x.dtype)
    rows = x.shape[0]

    def norm_rope(source):
        return qk(source.view(1, rows, 3 * WIDTH), *link["norms"], None, None, None, link["pe"], HEADS, EPS)

    if index % 2 == 0:
        modulation = gemv(h[:2, :WIDTH], *link["modulation"], None).to(x.dtype)
        q, k, v = norm_rope(h)
    else:
        q, k, v = norm_rope(h)
        modulation = gemv(v.reshape(rows, WIDTH)[:2], *link["modulation"], None).to(x.dtype)
    return q.reshape(rows, WIDTH), modulation


def _chain(x, links, reference=False):
    modulations = []
    for index, link in enumerate(links):
        x, modulation = _block(x, link, index, reference)
        modulations.append(modulation)
    return torch.cat([x] + modulations)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [4096, 77])
def test_chained_blocks_give_the_plain_launches_bytes(kernels, generator, dtype, tokens):
    links = _links(generator, dtype, tokens)
    x = make_input("student_t", tokens, WIDTH, dtype, generator)
    assert_launch_modes_give_the_same_bytes(lambda: _chain(x, links), kernels.programmatic_launch,
                                            64 * tokens * WIDTH)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chained_blocks_in_a_cuda_graph_give_the_plain_launches_bytes(kernels, generator, dtype):
    tokens = 4096
    links = _links(generator, dtype, tokens)
    inputs = [make_input(kind, tokens, WIDTH, dtype, generator) for kind in ("randn", "student_t", "cubed")]
    with kernels.programmatic_launch(False):
        plain = [_chain(x, links) for x in inputs]
    x = inputs[0].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), kernels.programmatic_launch(True):
        _chain(x, links)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            y = _chain(x, links)
    torch.cuda.current_stream().wait_stream(stream)
    for turn in range(6):   # a new input before each replay: an early read would see the last one's
        x.copy_(inputs[turn % len(inputs)])
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, plain[turn % len(inputs)]), "programmatic launch in a CUDA graph changed the result"


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_programmatic_block_matches_the_reference_ops(kernels, generator, dtype):
    # The bitwise comparisons above would pass if both launch modes were wrong alike.
    tokens = 333
    links = _links(generator, dtype, tokens)[:2]
    x = make_input("randn", tokens, WIDTH, dtype, generator)
    with kernels.programmatic_launch(True):
        poison_allocator(64 * tokens * WIDTH)
        got = _chain(x, links)
    want = _chain(x, links, reference=True)
    assert not got.isnan().any()
    assert relative_error(got, want) < 2e-2
