from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from helpers import flux_like_shapes, qwen_image_like_shapes, tree_from_linears
from rt_lynx_pack.lynx import (PACK_VERSION, LowRankBranch, LynxConfig, LynxLinearForward, LynxLoRA, LynxLoRAMismatch,
                               LynxRuntime, attach_lora, installed, load_lynx_lora, plan_model, save_lynx_lora)
from rt_lynx_pack.kernels import quantize_weight_fp8
from rt_lynx_pack.lynx.tiny_dit import TinyDiTConfig, TinyFluxDiT, random_inputs
from rt_lynx_pack.lynx.patching import lynx_layer


def random_lora(plan, rank=4, seed=0, architecture=None, compensation=True):
    g = torch.Generator().manual_seed(seed)
    layers = {name: (torch.randn(rank, k, generator=g) * 0.1, torch.randn(n, rank, generator=g) * 0.1)
              for name, (k, n) in plan.sparse_layer_shapes.items()}
    return LynxLoRA(architecture or plan.policy.name, rank, alpha=2.0 * rank, pattern="2:4",
                    compensation=compensation, layers=layers)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    config = TinyDiTConfig(hidden=64, heads=2)
    model = TinyFluxDiT(config).eval()
    inputs = random_inputs(config, 2, 48, 16, torch.Generator().manual_seed(1))
    return model, inputs


def test_round_trip_keeps_tensors_and_metadata(tmp_path, tiny):
    plan = plan_model(tiny[0])
    lora = random_lora(plan)
    path = tmp_path / "tiny.safetensors"
    save_lynx_lora(lora, str(path), dtype=torch.float32)
    loaded = load_lynx_lora(str(path))
    assert (loaded.architecture, loaded.rank, loaded.alpha, loaded.pattern, loaded.compensation) == \
        ("flux", 4, 8.0, "2:4", True)
    assert loaded.layers.keys() == lora.layers.keys()
    for name, (down, up) in lora.layers.items():
        assert torch.equal(loaded.layers[name][0], down) and torch.equal(loaded.layers[name][1], up)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["rt_lynx.pack_version"] == PACK_VERSION


def test_files_for_another_model_are_refused_with_keys(tmp_path, tiny):
    plan = plan_model(tiny[0])
    qwen_plan = plan_model(tree_from_linears(qwen_image_like_shapes()))
    with pytest.raises(LynxLoRAMismatch, match=r"architecture 'qwen_image'.*not sparsified layers.*transformer_blocks"):
        attach_lora(plan, random_lora(qwen_plan), 1.0)
    wrong_rank = random_lora(plan)
    name = next(iter(wrong_rank.layers))
    wrong_rank.layers[name] = (torch.randn(4, 32), wrong_rank.layers[name][1])
    with pytest.raises(LynxLoRAMismatch, match="wrong shape: " + name.replace(".", r"\.")):
        attach_lora(plan, wrong_rank, 1.0)
    with pytest.raises(LynxLoRAMismatch, match="without norm compensation"):
        attach_lora(plan, random_lora(plan, compensation=False), 1.0)
    # An ordinary LoRA file is not a Lynx LoRA.
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(LynxLoRAMismatch, match="not a Lynx LoRA"):
        load_lynx_lora(str(tmp_path / "plain.safetensors"))


def test_unpaired_keys_are_refused(tmp_path, tiny):
    plan = plan_model(tiny[0])
    lora = random_lora(plan)
    path = str(tmp_path / "broken.safetensors")
    save_lynx_lora(lora, path)
    from safetensors.torch import load_file
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    del tensors[next(k for k in tensors if k.endswith(".lynx_up"))]
    save_file(tensors, path, metadata=meta)
    with pytest.raises(LynxLoRAMismatch, match="without their pair"):
        load_lynx_lora(path)


def test_attached_branch_adds_scaled_low_rank_term(tiny):
    model, inputs = tiny
    plan = plan_model(model)
    lora = random_lora(plan)
    with_lora = attach_lora(plan, lora, strength=0.5)
    assert all(f.lora is None for f in plan.forwards.values())  # the old plan is untouched
    name = "double_blocks.0.img_attn.qkv"
    layer = dict(model.named_modules())[name]
    x = torch.randn(2, 40, layer.in_features)
    base = plan.forwards[name](x)
    down, up = lora.layers[name]
    torch.testing.assert_close(with_lora.forwards[name](x), base + F.linear(F.linear(x, down), up) * (8.0 / 4 * 0.5))
    assert "Lynx LoRA x0.5: rank 4 on 20/20 layers" in with_lora.summary()
    with pytest.raises(ValueError, match="already carries a Lynx LoRA"):
        attach_lora(with_lora, lora, 1.0)


def test_installed_restores_modules_and_plans_do_not_interfere(tiny):
    model, inputs = tiny
    with torch.no_grad():
        dense = model(*inputs)
        plan_a = plan_model(model, LynxConfig(compensate=True))
        plan_b = plan_model(model, LynxConfig(compensate=False))
        with installed(model, plan_a):
            out_a = model(*inputs)
        with installed(model, plan_b):
            out_b = model(*inputs)
        with installed(model, plan_a):
            assert torch.equal(model(*inputs), out_a)
        assert torch.equal(model(*inputs), dense)
    assert not (torch.equal(out_a, dense) or torch.equal(out_a, out_b))
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_dense_warmup_steps_give_the_dense_output(tiny):
    model, inputs = tiny
    runtime = LynxRuntime(dense_warmup_steps=2)
    plan = plan_model(model, runtime=runtime)
    with torch.no_grad():
        dense = model(*inputs)
        with installed(model, plan):
            outputs = []
            for step in range(3):
                runtime.set_step(step)
                outputs.append(model(*inputs))
    assert torch.equal(outputs[0], dense) and torch.equal(outputs[1], dense)
    assert not torch.equal(outputs[2], dense)
    assert "first 2 steps dense" in plan.summary()


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_the_hosts_check_runs_before_every_patched_layer_and_can_stop_the_call(tiny, precision):
    model, inputs = tiny
    calls = []
    runtime = LynxRuntime(before_each_call=lambda: calls.append(1))
    plan = plan_model(model, LynxConfig(precision=precision), runtime=runtime)
    with torch.no_grad(), installed(model, plan):
        model(*inputs)
        # every layer the plan patched: sparse, fp8 dense and fp8 modulation linears alike
        assert len(calls) == len(plan.installed_forwards) > len(plan.forwards) * (precision == "fp8")

        class Cancelled(Exception):
            pass

        def cancel():
            raise Cancelled
        runtime.before_each_call = cancel
        with pytest.raises(Cancelled):
            model(*inputs)


def test_summary_counts_layers_and_reasons():
    plan = plan_model(tree_from_linears(flux_like_shapes()))
    text = plan.summary(torch.device("cpu"))
    assert text.startswith("RT-Lynx: flux, 18 linears sparsified 2:4 + norm compensation, 2 kept dense")
    assert "reference (cpu device" in text


def test_sampling_step_index_follows_the_schedule():
    from rt_lynx_pack.lynx import sampling_step_index
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    assert [sampling_step_index(sigmas, torch.tensor([s])) for s in (1.0, 0.75, 0.5, 0.25)] == [0, 1, 2, 3]
    assert sampling_step_index(sigmas, torch.tensor([0.6, 0.6])) == 1  # a second-order midpoint of step 1
    assert sampling_step_index(None, torch.tensor([0.5])) is None


def test_fp8_plan_quantises_weights_once_while_installed(tiny):
    model, inputs = tiny
    plan = plan_model(model, LynxConfig(precision="fp8"))
    assert " 2:4 fp8 + norm compensation" in plan.summary()
    with torch.no_grad():
        bf16 = model(*inputs)
        with installed(model, plan):
            assert all(f.fp8_weight is not None and f.fp8_weight[0].dtype == torch.float8_e4m3fn
                       for f in plan.installed_forwards.values())
            fp8 = model(*inputs)
            # Quantising in the call gives the same result as the weight made ahead of time (the
            # modulation linears, whose weight alone is in e4m3, keep theirs: without it they compute
            # as the original layer).
            for forward in (plan.forwards | plan.fp8_dense_forwards).values():
                forward.release_fp8()
            assert torch.equal(model(*inputs), fp8)
            for forward in plan.per_image_forwards.values():
                forward.release_fp8()
            assert not torch.equal(model(*inputs), fp8)
    assert all(f.fp8_weight is None for f in plan.installed_forwards.values())
    assert torch.isfinite(fp8).all() and not torch.equal(fp8, bf16)


def test_fp8_plan_runs_the_layers_it_keeps_dense_in_fp8(tiny):
    from rt_lynx_pack.kernels import dense_linear_fp8_reference, quantize_weight_fp8
    model, inputs = tiny
    plan = plan_model(model, LynxConfig(precision="fp8"))
    kept_dense = {d.name for d in plan.decisions if not d.sparse}
    assert kept_dense and plan.fp8_dense_forwards.keys() == kept_dense    # the single blocks' linear2
    assert not kept_dense & plan.forwards.keys()
    assert f"{len(kept_dense)} kept dense (" in plan.summary() and f"{len(kept_dense)} of them in fp8" in plan.summary()
    assert not plan_model(model, LynxConfig()).fp8_dense_forwards
    assert not plan_model(model, LynxConfig(precision="fp8", fp8_dense_layers=False)).fp8_dense_forwards

    name = sorted(kept_dense)[0]
    module = dict(model.named_modules())[name]
    seen = {}
    hook = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    try:
        with torch.no_grad(), installed(model, plan):
            model(*inputs)
    finally:
        hook.remove()
    wq, w_scale = quantize_weight_fp8(module.weight)
    want = dense_linear_fp8_reference(seen["x"].reshape(-1, module.in_features), wq, w_scale, module.bias)
    assert torch.equal(seen["y"], want.reshape(seen["y"].shape))
    assert "forward" not in module.__dict__   # the module is its dense self again

    # A Lynx LoRA attaches to the sparsified layers only; the fp8 dense ones come along unchanged.
    with_lora = attach_lora(plan, random_lora(plan), 1.0)
    assert with_lora.fp8_dense_forwards == plan.fp8_dense_forwards
    assert all(f.lora is not None for f in with_lora.forwards.values())
    with pytest.raises(ValueError, match="only patched for its fp8 product"):
        LynxLinearForward(module, name, LynxConfig(), LynxRuntime(), sparse=False)


def test_fp8_plan_reads_the_modulation_weights_in_e4m3_with_x_unquantised(tiny):
    from rt_lynx_pack.kernels import linear_e4m3_weight_reference, quantize_weight_fp8
    model, inputs = tiny
    plan = plan_model(model, LynxConfig(precision="fp8"))
    modulations = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith("mod.lin")}
    modulations |= {n for n in dict(model.named_modules()) if n.endswith("modulation.lin")}
    assert modulations and set(plan.per_image_forwards) == modulations
    assert f"{len(modulations)} modulation linears with e4m3 weights" in plan.summary()
    assert "; fp8 dense layers and modulation -> reference (cpu device" in plan.summary(torch.device("cpu"))

    module = dict(model.named_modules())["double_blocks.0.img_mod.lin"]
    seen = []
    hook = module.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    try:
        with torch.no_grad(), installed(model, plan):
            model(*inputs)
            plan.runtime.dense = True   # a dense warm-up step: the layer's own product
            model(*inputs)
            plan.runtime.dense = False
    finally:
        hook.remove()
    (x, fp8_out), (x_dense, dense_out) = seen
    wq, w_scale = quantize_weight_fp8(module.weight)
    assert x.shape[0] == inputs[0].shape[0]   # one row per image
    assert torch.equal(fp8_out, linear_e4m3_weight_reference(x, wq, w_scale, module.bias))
    assert torch.equal(dense_out, torch.nn.functional.linear(x_dense, module.weight, module.bias))
    relative = ((fp8_out - dense_out).norm() / dense_out.norm()).item()
    assert 0 < relative < 0.05   # the weight's e4m3 rounding, x unquantised
    # Without its e4m3 copy (no room for it, offloaded) the layer computes as the original one.
    forward = plan.per_image_forwards["double_blocks.0.img_mod.lin"]
    assert forward.fp8_weight is None   # released when `installed` ended
    torch.testing.assert_close(forward(x), torch.nn.functional.linear(x, module.weight, module.bias), rtol=0, atol=0)


def test_fp8_weight_stored_in_e4m3_is_taken_as_is_and_not_cast_per_call():
    from rt_lynx_pack.kernels import sparse_linear_fp8_reference
    g = torch.Generator().manual_seed(4)
    module = torch.nn.Linear(128, 64)
    weight8 = (torch.randn(64, 128, generator=g) * 40).to(torch.float8_e4m3fn)   # an fp8 checkpoint's weight
    scale = torch.tensor(0.02)
    calls = []

    def provider(mod, x):   # what ComfyUI's cast would hand over: the weight in 16 bits, per call
        calls.append(1)
        return weight8.float() * scale, mod.bias, None

    config = LynxConfig(precision="fp8", min_tokens=4)
    forward = LynxLinearForward(module, "layer", config, LynxRuntime(), weights=provider)
    forward.prepare_fp8(weight8, scale)
    wq, w_scale = forward.fp8_weight
    assert wq.data_ptr() == weight8.data_ptr() and torch.equal(w_scale, torch.full((64,), 0.02))
    x = torch.randn(2, 10, 128, generator=g)
    with torch.no_grad():
        y = forward(x)
    assert not calls   # the e4m3 weight is ready: no cast of the weight
    want = sparse_linear_fp8_reference(x.reshape(-1, 128), weight8, w_scale, module.bias.detach(), True)
    assert torch.equal(y, want.reshape(2, 10, 64))
    with torch.no_grad():
        forward(x[:, :2])   # below min_tokens: the model's own product, through the provider
    assert calls == [1]
    # A 16-bit weight with a per-tensor scale is quantised per channel from weight * scale.
    forward.prepare_fp8(module.weight, scale)
    assert torch.equal(forward.fp8_weight[0].view(torch.uint8),
                       quantize_weight_fp8(module.weight.detach().float() * 0.02)[0].view(torch.uint8))


def test_fp8_weights_made_again_keep_their_addresses_and_never_write_a_stored_weight():
    # A model replaying CUDA graphs reads its weights where the graphs were recorded.
    g = torch.Generator().manual_seed(5)
    module = torch.nn.Linear(128, 64)
    forward = LynxLinearForward(module, "layer", LynxConfig(precision="fp8"), LynxRuntime())
    bias = torch.randn(64, generator=g)
    forward.prepare_fp8(module.weight, bias=bias)
    first = forward.fp8_weight, forward.fp8_bias   # held, so a new tensor could not take their memory
    assert forward.holds_fp8_copy() and forward.fp8_bias is not bias and torch.equal(forward.fp8_bias, bias)
    with torch.no_grad():
        module.weight.mul_(3)   # a LoRA patched the weight between runs
    forward.prepare_fp8(module.weight, bias=2 * bias, keep_addresses=True)
    assert [t.data_ptr() for t in (*forward.fp8_weight, forward.fp8_bias)] == \
        [t.data_ptr() for t in (*first[0], first[1])]
    want = quantize_weight_fp8(module.weight)
    assert torch.equal(forward.fp8_weight[0].view(torch.uint8), want[0].view(torch.uint8))
    assert torch.equal(forward.fp8_weight[1], want[1]) and torch.equal(forward.fp8_bias, 2 * bias)
    forward.prepare_fp8(module.weight)   # without keep_addresses: new tensors
    assert forward.fp8_weight[0].data_ptr() != first[0][0].data_ptr() and forward.fp8_bias is None

    # A stored e4m3 weight is the model's own: taken as it is, and a later copy is never written into it.
    weight8 = (torch.randn(64, 128, generator=g) * 40).to(torch.float8_e4m3fn)
    stored = weight8.clone()
    forward.prepare_fp8(weight8, torch.tensor(0.5), keep_addresses=True)
    assert forward.fp8_weight[0].data_ptr() == weight8.data_ptr() and not forward.holds_fp8_copy()
    forward.prepare_fp8(module.weight, keep_addresses=True)
    assert forward.fp8_weight[0].data_ptr() != weight8.data_ptr()
    assert torch.equal(weight8.view(torch.uint8), stored.view(torch.uint8))
    assert forward.holds_fp8_copy()
    forward.release_fp8()
    assert forward.fp8_weight is None and not forward.holds_fp8_copy()


def test_a_compiled_fp8_plan_takes_its_e4m3_weights_as_static_inputs(tiny):
    # Why the copies keep their addresses under CUDA graphs: Inductor's graphs take static inputs
    # (weights) at their recorded addresses and record again when one moves.
    from torch._dynamo.backends.common import aot_autograd
    from torch._guards import TracingContext
    model, inputs = tiny
    plan = plan_model(model, LynxConfig(precision="fp8"))
    seen = []

    def forward_compiler(graph, example_inputs):
        metadata = getattr(TracingContext.try_get(), "fw_metadata", None)
        if metadata is None or not hasattr(metadata, "static_input_indices"):
            pytest.skip("this torch's AOT metadata does not say which inputs are static")
        e4m3 = {i for i, t in enumerate(example_inputs) if torch.is_tensor(t) and t.dtype == torch.float8_e4m3fn}
        seen.append((e4m3, set(metadata.static_input_indices)))
        return graph
    torch._dynamo.reset()
    with torch.inference_mode(), installed(model, plan):
        torch.compile(model, backend=aot_autograd(fw_compiler=forward_compiler))(*inputs)
    ((e4m3, static),) = seen
    assert e4m3 and e4m3 <= static


def test_a_low_rank_branch_prepared_again_stays_where_it_is():
    branch = LowRankBranch(torch.randn(8, 64), torch.randn(32, 8), 0.5)
    branch.prepare(torch.device("cpu"), torch.float32)
    first = branch.operands_for(torch.zeros(1, 64))
    branch.prepare(torch.device("cpu"), torch.float32)
    assert branch.operands_for(torch.zeros(1, 64)) is first
    branch.prepare(torch.device("cpu"), torch.float64)   # another form: made anew
    assert branch.operands_for(torch.zeros(1, 64, dtype=torch.float64)) is not first


def test_fp8_weight_scales_are_one_per_tensor_or_per_channel():
    module = torch.nn.Linear(64, 32)
    forward = LynxLinearForward(module, "layer", LynxConfig(precision="fp8"), LynxRuntime())
    weight8 = torch.randn(32, 64).to(torch.float8_e4m3fn)
    per_channel = torch.rand(32) + 0.5
    forward.prepare_fp8(weight8, per_channel)
    assert forward.fp8_weight[0] is not None and torch.equal(forward.fp8_weight[1], per_channel)
    with pytest.raises(ValueError, match="a weight scale of 4 values for 32 output channels"):
        forward.prepare_fp8(weight8, torch.ones(4))


def test_fp8_dense_layers_need_a_shape_the_fp8_gemm_takes():
    from rt_lynx_pack.kernels import fp8_dense_shape_supported
    assert fp8_dense_shape_supported(15360, 3072) and fp8_dense_shape_supported(320, 64)
    assert not fp8_dense_shape_supported(328, 64)      # in_features not a multiple of 16
    assert not fp8_dense_shape_supported(320, 72)      # out_features not a multiple of 16
    assert not fp8_dense_shape_supported(40960, 64)    # a row longer than the quantise pass holds
    model = tree_from_linears({"single_blocks.0.linear1": (64, 64), "single_blocks.0.linear2": (64, 40),
                               "double_blocks.0.img_attn.qkv": (64, 48)})
    plan = plan_model(model, LynxConfig(precision="fp8"))
    assert "single_blocks.0.linear2" not in plan.fp8_dense_forwards   # 40 outputs: stays in the model dtype


def folded_lora(plan, seed=0, with_runtime_part=False):
    """A file with a random folded part (rank 4, alpha 8), and a random runtime part if asked."""
    runtime, folded = random_lora(plan, seed=seed), random_lora(plan, seed=seed + 1)
    keep = runtime if with_runtime_part else LynxLoRA(runtime.architecture, 0, 0.0, "2:4", True, {})
    return replace(keep, folded_rank=folded.rank, folded_alpha=folded.alpha, folded_layers=folded.layers)


def test_files_with_a_folded_part_are_format_version_2_and_others_stay_version_1(tmp_path, tiny):
    from safetensors import safe_open
    from safetensors.torch import load_file
    plan = plan_model(tiny[0])
    for lora, version in ((random_lora(plan), "1"), (folded_lora(plan), "2"),
                          (folded_lora(plan, with_runtime_part=True), "2")):
        path = str(tmp_path / "file.safetensors")
        save_lynx_lora(lora, path, dtype=torch.float32)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        assert meta["rt_lynx.format_version"] == version
        loaded = load_lynx_lora(path)
        for mine, theirs in ((lora.layers, loaded.layers), (lora.folded_layers, loaded.folded_layers)):
            assert mine.keys() == theirs.keys()
            assert all(torch.equal(mine[n][0], theirs[n][0]) and torch.equal(mine[n][1], theirs[n][1]) for n in mine)
        assert (loaded.rank, loaded.alpha, loaded.folded_rank, loaded.folded_alpha) == \
            (lora.rank, lora.alpha, lora.folded_rank, lora.folded_alpha)
    # A version this pack does not know is refused; folded keys in a version-1 file are not guessed at.
    tensors = load_file(path)
    without_folded_rank = {k: v for k, v in meta.items() if k != "rt_lynx.folded_rank"}
    for metadata, message in (({**meta, "rt_lynx.format_version": "3"}, "format version '3'"),
                              ({**meta, "rt_lynx.format_version": "1"},
                               "without their pair or of unknown kind: .*lynx_folded"),
                              (without_folded_rank, "metadata without rt_lynx.folded_rank")):
        save_file(tensors, path, metadata=metadata)
        with pytest.raises(LynxLoRAMismatch, match=message):
            load_lynx_lora(path)


def test_folded_branch_changes_the_weight_of_sparse_calls_and_comes_off_dense_ones(tiny):
    model, inputs = tiny
    runtime = LynxRuntime()
    plan = plan_model(model, LynxConfig(min_tokens=32), runtime=runtime)
    lora = folded_lora(plan)
    folded = attach_lora(plan, lora, 0.5)
    assert "Lynx LoRA x0.5: rank 4 folded into the weights of 20/20 layers" in folded.summary()
    name = "double_blocks.0.img_attn.qkv"
    layer = dict(model.named_modules())[name]
    weight = layer.weight.detach().clone()
    down, up = lora.folded_layers[name]
    delta = up @ down * (8.0 / 4 * 0.5)
    x = torch.randn(2, 40, layer.in_features)
    short = torch.randn(2, 8, layer.in_features)   # below min_tokens: computed dense
    with torch.no_grad(), installed(model, folded):
        torch.testing.assert_close(layer.weight, weight + delta)
        sparse_call = layer(x)
        short_call = layer(short)
        runtime.dense = True
        dense_call = layer(x)
        runtime.dense = False
    assert torch.equal(layer.weight, weight)
    reference = LynxLinearForward(layer, name, plan.config, LynxRuntime())
    with torch.no_grad():
        layer.weight.add_(delta)
        expected_sparse = reference(x)
        layer.weight.copy_(weight)
    torch.testing.assert_close(sparse_call, expected_sparse)
    torch.testing.assert_close(short_call, F.linear(short, weight, layer.bias))
    torch.testing.assert_close(dense_call, F.linear(x, weight, layer.bias))
    assert not torch.allclose(sparse_call, reference(x), atol=1e-3)


@pytest.mark.parametrize("warmup, tokens", [(True, 40), (False, 8)])
def test_folded_branch_comes_off_dense_calls_through_the_block_prologues(tiny, warmup, tokens):
    """A fused block hands a layer its LayerNorm + modulation or GELU; a call that computes dense
    (a warm-up step, or fewer tokens than min_tokens) must still see W."""
    from rt_lynx_pack.kernels import gelu_tanh_reference
    from rt_lynx_pack.lynx.linear import modulated_layer_norm
    model, _ = tiny
    plan = plan_model(model, runtime=LynxRuntime(dense=warmup))
    folded = attach_lora(plan, folded_lora(plan), 1.0)
    name = "double_blocks.0.img_attn.qkv"
    layer = dict(model.named_modules())[name]
    weight = layer.weight.detach().clone()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, tokens, layer.in_features, generator=g)
    shift = torch.randn(2, 1, layer.in_features, generator=g)
    scale1p = 1 + torch.randn(2, 1, layer.in_features, generator=g)
    with torch.no_grad(), installed(model, folded):
        forward = folded.forwards[name]
        modulated = forward.modulated(x, shift, scale1p, 1e-6)
        after_gelu = forward.after_gelu(x)
    torch.testing.assert_close(modulated, F.linear(modulated_layer_norm(x, shift, scale1p, 1e-6), weight, layer.bias))
    torch.testing.assert_close(after_gelu, F.linear(gelu_tanh_reference(x), weight, layer.bias))


def test_installed_restores_folded_weights_after_an_error(tiny):
    model, inputs = tiny
    plan = plan_model(model)
    weights = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"):
        with installed(model, attach_lora(plan, folded_lora(plan), 1.0)):
            assert not all(torch.equal(weights[n], p) for n, p in model.state_dict().items())
            raise RuntimeError("inside")
    assert all(torch.equal(weights[n], p) for n, p in model.state_dict().items())
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_both_parts_together_sparse_and_dense():
    """Sparse: S(x) (W + folded)^T + the runtime branch of the dense x. Dense: x W^T, neither part."""
    from rt_lynx_pack.kernels import sparse_linear_reference
    g = torch.Generator().manual_seed(5)
    layer = torch.nn.Linear(16, 8)
    runtime_branch = LowRankBranch(torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g), 0.5)
    folded_branch = LowRankBranch(torch.randn(3, 16, generator=g), torch.randn(8, 3, generator=g), 0.25)
    config, runtime = LynxConfig(min_tokens=1), LynxRuntime()
    forward = LynxLinearForward(layer, "layer", config, runtime, lora=runtime_branch, folded=folded_branch)
    x = torch.randn(5, 16, generator=g)
    weight = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(folded_branch.weight_delta())   # where ComfyUI's weight patch puts it
        sparse = forward(x)
        runtime.dense = True
        dense = forward(x)
        layer.weight.copy_(weight)
        want = sparse_linear_reference(x, weight + folded_branch.weight_delta(), layer.bias, True) + runtime_branch(x)
    torch.testing.assert_close(sparse, want)
    torch.testing.assert_close(dense, F.linear(x, weight, layer.bias))


def test_the_block_prologue_products_take_a_folded_part_off_when_they_compute_dense():
    """lynx_linear_modulated / lynx_linear_after_gelu called directly (not through a layer) with
    an input below min_tokens: x W^T with W the weight before the folded part went in."""
    from rt_lynx_pack.kernels import gelu_tanh_reference
    from rt_lynx_pack.lynx.linear import lynx_linear_after_gelu, lynx_linear_modulated, modulated_layer_norm
    g = torch.Generator().manual_seed(9)
    weight, bias = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    folded = LowRankBranch(torch.randn(3, 16, generator=g), torch.randn(8, 3, generator=g), 0.5)
    patched = weight + folded.weight_delta()
    x = torch.randn(2, 5, 16, generator=g)
    shift, scale1p = torch.randn(2, 1, 16, generator=g), 1 + torch.randn(2, 1, 16, generator=g)
    config = LynxConfig(min_tokens=32)
    torch.testing.assert_close(lynx_linear_modulated(x, shift, scale1p, 1e-6, patched, bias, config, folded=folded),
                               F.linear(modulated_layer_norm(x, shift, scale1p, 1e-6), weight, bias))
    torch.testing.assert_close(lynx_linear_after_gelu(x, patched, bias, config, folded=folded),
                               F.linear(gelu_tanh_reference(x), weight, bias))


def test_a_plan_rebound_to_a_copy_of_the_model_computes_with_the_copys_layers(tiny):
    import copy
    model, inputs = tiny
    plan = plan_model(model)
    g = torch.Generator().manual_seed(5)
    lora = LynxLoRA("flux", 4, 4.0, "2:4", True, {n: (torch.randn(4, k, generator=g) * 0.01,
                                                   torch.randn(o, 4, generator=g) * 0.01)
                                               for n, (k, o) in plan.sparse_layer_shapes.items()})
    plan = attach_lora(plan, lora, 1.0)
    twin = copy.deepcopy(model)
    rebound = plan.rebound(twin)
    modules = dict(twin.named_modules())
    assert rebound.runtime is plan.runtime and rebound.decisions == plan.decisions
    for name, forward in rebound.installed_forwards.items():
        assert forward.module is modules[name] and type(forward) is type(plan.installed_forwards[name])
        assert forward.lora is not plan.installed_forwards[name].lora   # its own prepared factors
    with installed(model, plan):
        want = model(*inputs)
    with installed(twin, rebound):
        got = twin(*inputs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("warmup", [False, True])
def test_gated_residual_is_the_layer_then_the_blocks_addcmul(precision, warmup):
    # The reference path takes no residual in a kernel: every route must give addcmul(residual, gate,
    # layer(x)) bit for bit, sparse or dense, after a GELU, with a branch, in a dense warm-up step.
    g = torch.Generator().manual_seed(9)
    runtime = LynxRuntime()
    runtime.dense = warmup
    config = LynxConfig(backend="reference", precision=precision, min_tokens=1)
    x = torch.randn(2, 40, 64, generator=g).to(torch.bfloat16)
    residual = torch.randn(2, 40, 32, generator=g).to(torch.bfloat16)
    gate = torch.randn(2, 1, 32, generator=g).to(torch.bfloat16)
    linear = torch.nn.Linear(64, 32).to(torch.bfloat16)
    branch = LowRankBranch(torch.randn(4, 64, generator=g) / 8, torch.randn(32, 4, generator=g) / 8, 1.0)
    for forward in (LynxLinearForward(linear, "proj", config, runtime),
                    LynxLinearForward(linear, "proj", config, runtime, lora=branch)):
        if precision == "fp8":
            forward.prepare_fp8(linear.weight)
        assert torch.equal(forward.gated_residual(residual, gate, x), torch.addcmul(residual, gate, forward(x)))
        assert torch.equal(forward.gated_residual(residual, gate, x, after_gelu=True),
                           torch.addcmul(residual, gate, forward.after_gelu(x)))
    if precision == "fp8":   # a layer kept dense: FLUX's linear2 of its two input parts
        wide = torch.nn.Linear(96, 32).to(torch.bfloat16)
        dense = LynxLinearForward(wide, "linear2", config, runtime, sparse=False)
        dense.prepare_fp8(wide.weight)
        tail = torch.randn(2, 40, 32, generator=g).to(torch.bfloat16)
        assert torch.equal(dense.after_cat_gelu(x, tail, residual, gate),
                           torch.addcmul(residual, gate, dense.after_cat_gelu(x, tail)))


def test_an_installed_layer_is_reached_through_its_module_only(tiny):
    # torch.compile evaluates, on every call, the guards on Python objects its trace read, except
    # under nn.Modules whose dicts did not change. An installed layer is a method bound to its linear
    # calling an nn.Module: no per-layer guard that the forward's module is the linear.
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    model, inputs = tiny
    plan = plan_model(model, LynxConfig(precision="fp8", backend="reference", min_tokens=1))
    torch._dynamo.reset()
    with torch.inference_mode(), installed(model, plan):
        compiled = torch.compile(model, backend=lambda graph, example_inputs: graph.forward)
        torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=0, atol=0)
    (entry,) = _debug_get_cache_entry_list(type(model).forward.__code__)
    guards = str(entry.guard_manager)
    assert ".forward.module" not in guards and ".forward.__func__.__closure__" in guards   # the layer, read


def test_a_layer_set_as_the_forward_itself_is_refused_where_it_would_not_run():
    linear = torch.nn.Linear(8, 8)
    layer = LynxLinearForward(linear, "layer", LynxConfig(), LynxRuntime())
    linear.forward = layer   # nn.Module makes it a child: linear(x) would still run Linear.forward
    with pytest.raises(TypeError, match="install layer.bound_to"):
        lynx_layer(linear)
    del linear.forward
    linear.forward = layer.bound_to(linear)
    assert lynx_layer(linear) is layer and layer.module is linear and "module" not in layer._modules
