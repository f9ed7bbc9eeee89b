"""The blocks' modulation linears of an fp8 model as one product per model call (batched_modulation)."""
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import flux_like_shapes, qwen_image_like_shapes, tree_from_linears
from rt_lynx_pack.kernels import linear_e4m3_weight_reference
from rt_lynx_pack.lynx import LynxConfig, LynxRuntime, installed, plan_model
from rt_lynx_pack.lynx.batched_modulation import BatchedModulation, modulation_output
from rt_lynx_pack.lynx.fused_blocks import _flux_modulation, _qwen_modulation_parameters
from rt_lynx_pack.lynx.patching import PerImageFp8Forward, lynx_layer

FP8 = LynxConfig(precision="fp8")


def _close(a, b):
    # The reference computes in fp32 on the CPU, where a wider product may sum in another order.
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("shapes", [flux_like_shapes(), qwen_image_like_shapes()], ids=["flux", "qwen_image"])
def test_the_plan_puts_every_modulation_linear_in_one_batch_in_block_order(shapes):
    model = tree_from_linears(shapes)
    plan = plan_model(model, FP8)
    batch = plan.modulation_batch
    assert batch is not None and batch.forwards == list(plan.per_image_forwards.values())
    stops = [f.batch_columns for f in batch.forwards]
    assert stops[0][0] == 0 and all(a[1] == b[0] for a, b in zip(stops, stops[1:]))
    assert batch.out_features == stops[-1][1] == sum(f.module.out_features for f in batch.forwards)
    assert all(f.batch is batch for f in batch.forwards)
    assert all(f.batch is None and f.batch_columns is None for f in plan.forwards.values())
    assert plan_model(model, LynxConfig()).modulation_batch is None   # bf16: the modulation keeps its layers
    # A copy of the model gets a batch of its own, over its own layers' forwards.
    copy = tree_from_linears(shapes)
    rebound = plan.rebound(copy)
    assert rebound.modulation_batch is not batch
    assert rebound.modulation_batch.forwards == list(rebound.per_image_forwards.values())
    assert all(f.batch is batch for f in batch.forwards)


def test_a_plan_whose_batch_holds_other_forwards_is_refused():
    from dataclasses import replace
    plan = plan_model(tree_from_linears(flux_like_shapes()), FP8)
    with pytest.raises(ValueError, match="modulation batch"):
        replace(plan, per_image_forwards={})
    assert replace(plan, per_image_forwards={}, modulation_batch=None).modulation_batch is None


def test_installed_writes_each_layers_e4m3_weight_into_its_rows_of_the_one_product():
    torch.manual_seed(0)
    model = tree_from_linears(flux_like_shapes()).to(torch.bfloat16)
    plan = plan_model(model, FP8)
    batch = plan.modulation_batch
    vec = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad(), installed(model, plan):
        assert batch.ready and batch.weight.dtype == torch.float8_e4m3fn and batch.bias.dtype == torch.bfloat16
        product = batch.product(vec)
        assert product.shape == (2, batch.out_features)
        for forward in batch.forwards:
            start, stop = forward.batch_columns
            assert forward.fp8_weight[0].data_ptr() == batch.weight[start].data_ptr()
            module = forward.module
            own = module(F.silu(vec))   # the layer's own e4m3 product, one launch
            assert torch.equal(own, linear_e4m3_weight_reference(F.silu(vec), *forward.fp8_weight, module.bias))
            _close(product[:, start:stop], own)
    assert not batch.ready and batch.weight is None
    assert all(f.fp8_weight is None for f in batch.forwards)


def test_a_weight_stored_in_e4m3_keeps_its_layer_and_the_batch_is_not_used():
    model = tree_from_linears(flux_like_shapes())
    name = "double_blocks.1.txt_mod.lin"
    stored = model.get_submodule(name)
    stored.weight = nn.Parameter(stored.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    plan = plan_model(model, FP8)
    with torch.no_grad(), installed(model, plan):
        assert not plan.modulation_batch.ready and plan.modulation_batch.weight is None   # no second copy
        assert plan.per_image_forwards[name].fp8_weight[0].data_ptr() == stored.weight.data_ptr()   # not copied
        layer = plan.per_image_forwards[name]
        assert modulation_output(layer, torch.randn(1, 64)) is None


def test_a_failed_write_leaves_no_layer_reading_half_written_rows():
    plan = plan_model(tree_from_linears(flux_like_shapes()), FP8)
    batch = plan.modulation_batch
    calls = []

    def prepare(forward):
        calls.append(forward)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        forward.prepare_fp8(forward.module.weight, keep_addresses=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        batch.write(torch.device("cpu"), torch.float32, prepare)
    assert batch.weight is None and not batch.ready
    assert all(f.fp8_weight is None for f in batch.forwards)


def test_a_new_tensor_takes_the_place_of_the_layers_own_copies():
    plan = plan_model(tree_from_linears(flux_like_shapes()), FP8)
    batch = plan.modulation_batch
    for forward in batch.forwards:   # a run without the batch: each layer its own copy
        forward.prepare_fp8(forward.module.weight)
    own = [forward.fp8_weight[0] for forward in batch.forwards]
    released = []
    original = type(batch.forwards[0]).release_fp8

    def release(forward):
        released.append(forward.fp8_weight is not None and forward.fp8_weight[0] is own[batch.forwards.index(forward)])
        original(forward)
    for forward in batch.forwards:
        forward.release_fp8 = lambda forward=forward: release(forward)
    assert batch.write(torch.device("cpu"), torch.float32,
                       lambda f: f.prepare_fp8(f.module.weight, keep_addresses=True))
    assert released == [True] * len(own)   # dropped before the new tensor was made
    for forward, copy in zip(batch.forwards, own):
        torch.testing.assert_close(forward.fp8_weight[0].float(), copy.float(), rtol=0, atol=0)


def test_a_failed_allocation_leaves_the_batch_not_ready(monkeypatch):
    plan = plan_model(tree_from_linears(flux_like_shapes()), FP8)
    batch = plan.modulation_batch
    prepare = lambda f: f.prepare_fp8(f.module.weight, keep_addresses=True)  # noqa: E731
    assert batch.write(torch.device("cpu"), torch.float32, prepare)
    batch.weight = batch.weight.to("meta")   # as if it were on another device: a new tensor is made

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("no room")
    monkeypatch.setattr(torch, "empty", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        batch.write(torch.device("cpu"), torch.float32, prepare)
    assert not batch.ready


def test_the_reference_product_of_a_wide_e4m3_weight_makes_its_fp32_copy_in_parts(monkeypatch):
    from rt_lynx_pack.kernels import quantize_weight_fp8, reference
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    wq, scale = quantize_weight_fp8(torch.randn(300, 64))
    bias = torch.randn(300, dtype=torch.bfloat16)
    whole = linear_e4m3_weight_reference(x, wq, scale, bias)
    monkeypatch.setattr(reference, "E4M3_WEIGHT_CHUNK_ELEMENTS", 64 * 7)   # 7 rows at a time, 43 parts
    floats = []
    real_float = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda t: floats.append(t.numel()) or real_float(t))
    parts = linear_e4m3_weight_reference(x, wq, scale, bias)
    monkeypatch.undo()
    assert max(floats) <= 64 * 7   # no fp32 copy of the whole weight
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)


class Modulation(nn.Module):   # comfy.ldm.flux.layers.Modulation (ComfyUI 0.3.x), the class the fused forwards know
    def __init__(self, dim, double):
        super().__init__()
        self.is_double, self.multiplier = double, 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec):
        if vec.ndim == 2:
            vec = vec[:, None, :]
        out = self.lin(F.silu(vec)).chunk(self.multiplier, dim=-1)
        return out[:3], out[3:] if self.is_double else None


def _batch_over(linears, dtype) -> BatchedModulation:
    """Per-image fp8 forwards installed on `linears`, their batch written on the CPU."""
    runtime = LynxRuntime()
    forwards = [PerImageFp8Forward(linear, f"m{i}", FP8, runtime) for i, linear in enumerate(linears)]
    for forward in forwards:
        forward.module.forward = forward.bound_to(forward.module)
    batch = BatchedModulation(forwards)
    batch.write(torch.device("cpu"), dtype, lambda f: f.prepare_fp8(f.module.weight, keep_addresses=True))
    return batch


def _blocks_modulations(dim=64, dtype=torch.bfloat16):
    torch.manual_seed(3)
    modulations = [Modulation(dim, True), Modulation(dim, True), Modulation(dim, False)]
    for m in modulations:
        m.to(dtype)
    return modulations, _batch_over([m.lin for m in modulations], dtype)


def _as_tensors(mod):
    first, second = mod
    return [*first] + ([] if second is None else [*second])


def test_flux_modulations_of_one_call_are_columns_of_one_product_made_by_the_first():
    modulations, batch = _blocks_modulations()
    runtime = batch.runtime
    vec = torch.randn(2, 64, dtype=torch.bfloat16)
    products = []
    original = batch.product
    batch.product = lambda v: products.append(v) or original(v)
    for m in modulations:
        got = _flux_modulation(m, vec)
        want = m(vec)
        for a, b in zip(_as_tensors(got), _as_tensors(want), strict=True):
            assert a.shape == b.shape == (2, 1, 64)
            _close(a, b)
    assert len(products) == 1 and runtime.modulation_product[0] is vec
    # Another vec (a product left from another call) is never read for it.
    other = torch.randn(2, 64, dtype=torch.bfloat16)
    _close(_as_tensors(_flux_modulation(modulations[1], other))[0], modulations[1](other)[0][0])
    assert len(products) == 2 and runtime.modulation_product[0] is other
    # A dense warm-up step, a batch not ready: each module computes its own.
    runtime.modulation_product = None
    runtime.dense = True
    assert modulation_output(lynx_layer(modulations[0].lin), vec) is None
    runtime.dense = False
    batch.release()
    assert modulation_output(lynx_layer(modulations[0].lin), vec) is None
    assert len(products) == 2 and runtime.modulation_product is None
    # A module with its forward patched by another node keeps it.
    modulations[0].forward = lambda v: "its own"
    assert _flux_modulation(modulations[0], vec) == "its own"


def test_qwen_image_modulation_parameters_come_from_the_product_too():
    torch.manual_seed(4)
    mods = [nn.Sequential(nn.SiLU(), nn.Linear(64, 6 * 64)) for _ in range(2)]
    batch = _batch_over([m[1] for m in mods], torch.float32)
    temb = torch.randn(2, 64)
    for m in mods:
        _close(_qwen_modulation_parameters(m, temb), m(temb))
    start, stop = batch.forwards[1].batch_columns
    assert torch.equal(_qwen_modulation_parameters(mods[1], temb), batch.runtime.modulation_product[1][:, start:stop])


def test_compiled_the_modulations_of_a_call_are_one_product_without_graph_breaks():
    modulations, batch = _blocks_modulations()
    runtime = batch.runtime
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def blocks(vec):
        return [t for m in modulations for t in _as_tensors(_flux_modulation(m, vec))]
    compiled = torch.compile(blocks, backend=backend, fullgraph=True)
    for seed in range(2):   # a call after another, the product cleared between them as the host does
        vec = torch.randn(1, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(seed))
        want = blocks(vec)
        eager_product = runtime.modulation_product[1]
        runtime.modulation_product = None
        got = compiled(vec)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        assert runtime.modulation_product[0] is vec and torch.equal(runtime.modulation_product[1], eager_product)
        runtime.modulation_product = None
    assert len(graphs) == 1   # no graph break, no second compilation
    matmuls = [n for n in graphs[0].graph.nodes if n.op == "call_function"
               and n.target in (operator.matmul, torch.matmul, torch.mm, torch.ops.aten.mm.default)]
    assert len(matmuls) == 1   # the reference path's one product (three layers)
