"""The blocks' modulation linears as one product (lynx/batched_modulation.py) on the GPU: the kernel
computes each output channel alone, so a layer's columns of the one product are its own product,
byte for byte, at FLUX.1-dev's modulation shapes; compiled by Inductor, a call makes it once."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernel_helpers import make_input, poison_allocator, require_fast_path
from rt_lynx_pack.lynx import LynxConfig, LynxRuntime
from rt_lynx_pack.lynx.batched_modulation import BatchedModulation, modulation_output
from rt_lynx_pack.lynx.patching import PerImageFp8Forward

# FLUX.1-dev: a double block's two modulations (3072 -> 18432) and a single block's (3072 -> 9216);
# an odd width last, so a layer's columns end inside a block of the kernel's channels.
OUT_FEATURES = [18432, 18432, 9216, 1000]


@pytest.fixture(scope="module")
def fp8_dense():
    return require_fast_path("fp8_dense")


def _batch(dtype, generator, runtime=None):
    config = LynxConfig(precision="fp8", backend="cuda")   # "cuda": the reference would raise
    runtime = runtime or LynxRuntime()
    forwards = []
    for i, n in enumerate(OUT_FEATURES):
        linear = nn.Linear(3072, n, device="cuda", dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(make_input("student_t", n, 3072, torch.float32, generator) * 0.02)
            linear.bias.copy_(make_input("randn", 1, n, dtype, generator)[0])
        forward = PerImageFp8Forward(linear, f"m{i}", config, runtime)
        linear.forward = forward.bound_to(linear)
        forwards.append(forward)
    batch = BatchedModulation(forwards)
    poison_allocator(batch.out_features * 3072)   # rows the write would leave unwritten read as NaN
    assert batch.write(torch.device("cuda"), dtype,
                       lambda f: f.prepare_fp8(f.module.weight, keep_addresses=True))
    return batch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("images", [1, 2, 3])
@pytest.mark.parametrize("kind", ["randn", "student_t"])
def test_each_layers_columns_are_its_own_product_byte_for_byte(fp8_dense, generator, dtype, images, kind):
    batch = _batch(dtype, generator)
    vec = make_input(kind, images, 3072, dtype, generator)
    poison_allocator(images * batch.out_features * 2)
    product = batch.product(vec)
    assert product.shape == (images, batch.out_features) and not product.isnan().any()
    for forward in batch.forwards:
        start, stop = forward.batch_columns
        own = forward.module(F.silu(vec))   # one launch of the layer's own rows
        assert torch.equal(product[:, start:stop], own), forward.name
    # Written again in place (a model replaying CUDA graphs): the same tensors, new values.
    addresses = [t.data_ptr() for t in (batch.weight, batch.scale, batch.bias)]
    with torch.no_grad():
        batch.forwards[1].module.weight.mul_(2)
    batch.write(torch.device("cuda"), dtype, lambda f: f.prepare_fp8(f.module.weight, keep_addresses=True))
    assert [t.data_ptr() for t in (batch.weight, batch.scale, batch.bias)] == addresses
    start, stop = batch.forwards[1].batch_columns
    assert torch.equal(batch.product(vec)[:, start:stop], batch.forwards[1].module(F.silu(vec)))


def test_compiled_a_call_makes_one_product_for_all_its_modulations(fp8_dense, generator):
    runtime = LynxRuntime()
    batch = _batch(torch.bfloat16, generator, runtime)
    layers = batch.forwards

    def modulations(vec):
        return [modulation_output(layer, vec) for layer in layers]
    vec = make_input("randn", 1, 3072, torch.bfloat16, generator)
    want = [layer.module(F.silu(vec)) for layer in layers]
    torch._dynamo.reset()
    compiled = torch.compile(modulations, fullgraph=True)
    from torch._inductor.utils import run_and_get_code
    got, code = run_and_get_code(compiled, vec)
    runtime.modulation_product = None
    calls = re.findall(r"torch\.ops\.rt_lynx\.linear_e4m3_weight\.default\(", "\n".join(code))
    assert len(calls) == 1, f"one product for the call, not {len(calls)}"
    # Inductor may round the SiLU differently from eager (one bf16 ulp of the input).
    for g, w in zip(got, want, strict=True):
        assert ((g.float() - w.float()).norm() / w.float().norm()).item() < 1e-2
