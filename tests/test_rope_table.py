"""The RoPE table op: bit for bit ComfyUI's EmbedND (its formula copied in helpers, ComfyUI not needed),
and whole under torch.compile."""
import pytest
import torch

from helpers import comfyui_embed_nd, flux_ids
from rt_lynx_pack.kernels import rope_table

# (theta, axes_dim): FLUX.1 and Qwen-Image (an int theta), Lumina 2 (ComfyUI 0.3.64), Z-Image.
ARCHITECTURES = {"flux": (10000, (16, 56, 56)), "lumina2": (10000.0, (32, 32, 32)), "z_image": (256.0, (32, 48, 48))}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
@pytest.mark.parametrize("ids_kind", ["flux_bf16", "fractional_fp32", "large_fp32"])
def test_rope_table_is_comfyui_embed_nd_bit_for_bit(architecture, ids_kind):
    theta, axes_dim = ARCHITECTURES[architecture]
    generator = torch.Generator().manual_seed(len(ids_kind))
    if ids_kind == "flux_bf16":
        ids = flux_ids(2, 7, 12, 9, offset=3.0)
    elif ids_kind == "fractional_fp32":   # positions scaled by a RoPE-scaling node, say
        ids = torch.rand(1, 33, 3, generator=generator) * 64
    else:
        ids = torch.randint(0, 20000, (2, 17, 3), generator=generator).float() * 1.37
    want = comfyui_embed_nd(ids, theta, axes_dim)
    got = rope_table(ids, theta, axes_dim)
    assert got.shape == want.shape and got.dtype == want.dtype and got.stride() == want.stride()
    assert torch.equal(got, want)


def test_rope_table_compiles_as_one_op_with_the_same_bits():
    from torch._dynamo.backends.common import aot_autograd
    theta, axes_dim = ARCHITECTURES["flux"]
    ids = flux_ids(1, 5, 6, 7)

    def table(ids):
        return rope_table(ids, theta, axes_dim) * 1.0   # a neighbour Inductor could fuse with

    compiled = torch.compile(table, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(ids), comfyui_embed_nd(ids, theta, axes_dim), rtol=0, atol=0)

    graphs = []   # the ATen graph that Inductor would get
    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    torch._dynamo.reset()
    torch.compile(table, fullgraph=True, backend=aot_autograd(fw_compiler=record))(ids)
    calls = {node.target for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert torch.ops.rt_lynx.rope_table.default in calls and torch.ops.aten.cos.default not in calls


@pytest.mark.parametrize("shape, axes_dim, message", [((2, 5), (16, 56, 56), "must be"),
                                                      ((1, 5, 2), (16, 56, 56), "must be"),
                                                      ((1, 5, 3), (16, 55, 56), "even")])
def test_rope_table_refuses_ids_or_axes_it_cannot_take(shape, axes_dim, message):
    with pytest.raises(ValueError, match=message):
        rope_table(torch.zeros(shape), 10000, axes_dim)


class EmbedND(torch.nn.Module):
    """ComfyUI's EmbedND's interface, its forward the copied formula (or another one)."""

    def __init__(self, theta, axes_dim, formula=comfyui_embed_nd):
        super().__init__()
        self.theta, self.axes_dim, self.formula = theta, list(axes_dim), formula

    def forward(self, ids):
        return self.formula(ids, self.theta, self.axes_dim)


def test_rope_table_forward_takes_only_an_embedder_it_reproduces_and_leaves_other_ids_to_it():
    from rt_lynx_pack.lynx.fused_blocks import rope_table_forward
    theta, axes_dim = ARCHITECTURES["flux"]
    embedder = EmbedND(theta, axes_dim)
    forward, why_not = rope_table_forward(embedder)
    assert why_not == "" and forward is not None
    ids = flux_ids(2, 3, 4, 5)
    assert torch.equal(forward(ids), embedder(ids))

    calls = []
    def counting(ids, theta, axes_dim):
        calls.append(tuple(ids.shape))
        return comfyui_embed_nd(ids, theta, axes_dim)
    counted = EmbedND(theta, axes_dim, counting)
    forward, _ = rope_table_forward(counted)
    calls.clear()
    forward(ids)
    forward(ids[..., :2])          # two position axes for three dims: the module's own (and its error)
    forward(ids[0])                # no batch dim
    assert calls == [(2, 23, 2), (23, 3)]

    def scaled(ids, theta, axes_dim):   # a formula the op does not compute
        return comfyui_embed_nd(ids * 0.5, theta, axes_dim)
    assert rope_table_forward(EmbedND(theta, axes_dim, scaled)) == (None, "the RoPE table op differs from this "
                                                                          "EmbedND's output")
    assert rope_table_forward(torch.nn.Identity())[0] is None
