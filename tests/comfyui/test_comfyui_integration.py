"""The nodes inside a real ComfyUI: registration, patching a FLUX model loaded by ComfyUI's own
loader, sampling with ComfyUI's sampler, bypass, clones, ComfyUI LoRAs, lowvram, Lynx LoRA node."""
import asyncio
import pathlib

import pytest
import torch

from comfyui_env import import_comfyui

import_comfyui()

import comfy.model_management  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402

from comfyui_models import graphs_after_each_run, load_flux, sample, sparsify, watch_each_step  # noqa: E402
from rt_lynx_pack.kernels import sparse_linear_reference  # noqa: E402
from rt_lynx_pack.lynx import LynxLinearForward, LynxLoRAMismatch, save_lynx_lora  # noqa: E402
from rt_lynx_pack.lynx.patching import lynx_layer  # noqa: E402
from rt_lynx_pack.lynx.tiny_dit import TinyFluxDiT  # noqa: E402
from rt_lynx_pack.nodes import RTLynxLoadLoRA  # noqa: E402
from rt_lynx_pack.nodes.comfy_glue import installed_plan  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
QKV = "double_blocks.0.img_attn.qkv"


def lynx_forwards_installed(patcher):
    return [n for n, m in patcher.model.diffusion_model.named_modules()
            if lynx_layer(m) is not None]


def test_comfyui_loads_the_pack_as_a_custom_node():
    assert asyncio.run(nodes.load_custom_node(str(ROOT)))
    assert nodes.NODE_CLASS_MAPPINGS["RTLynxSparsifyModel"].__name__ == "RTLynxSparsifyModel"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["RTLynxSparsifyModel"] == "RT-Lynx Sparsify Model"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["RTLynxLoadLoRA"] == "Load Lynx LoRA"
    for name in ("RTLynxSparsifyModel", "RTLynxLoadLoRA"):
        spec = nodes.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()
        assert spec["required"]["model"] == ("MODEL",)


def test_policy_names_match_comfyui_flux(flux):
    comfy_linears = {n for n, m in flux.model.diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)}
    tiny = {n for n, m in TinyFluxDiT().named_modules() if isinstance(m, torch.nn.Linear)}
    # The embedded tiny DiT uses ComfyUI's names (2 double + 4 single blocks vs 1 + 1 here).
    assert {n for n in tiny if not n.startswith(("double_blocks.1", "single_blocks.1", "single_blocks.2",
                                                 "single_blocks.3"))} <= comfy_linears


def test_patched_clone_samples_and_bypass_is_bit_identical(flux, capsys):
    dense_before = sample(flux)
    lynx = sparsify(flux)
    assert "RT-Lynx: flux, 9 linears sparsified 2:4 + norm compensation, 1 kept dense" in capsys.readouterr().out
    assert lynx is not flux and installed_plan(flux) is None
    lynx_out = sample(lynx)
    assert torch.isfinite(lynx_out).all()
    assert not torch.equal(lynx_out, dense_before)
    dense_after = sample(flux)
    assert torch.equal(dense_before, dense_after)
    assert lynx_forwards_installed(flux) == []  # the original model is restored


def test_two_patched_clones_do_not_interfere(flux):
    with_comp = sparsify(flux, compensation=True)
    without_comp = sparsify(flux, compensation=False)
    a1 = sample(with_comp)
    b1 = sample(without_comp)
    a2 = sample(with_comp)
    assert torch.equal(a1, a2) and not torch.equal(a1, b1)


def test_a_clone_on_a_copy_of_the_model_computes_with_the_copys_own_layers(flux):
    import inspect
    if "model_override" not in inspect.signature(flux.clone).parameters:
        pytest.skip("this ComfyUI's ModelPatcher.clone makes no copies of the model")
    from rt_lynx_pack.nodes.comfy_glue import _refuse_a_copy_of_the_model
    lynx = sparsify(flux, dense_warmup_steps=1)
    # What a later ComfyUI's TorchCompileModel or hooks under dynamic VRAM, or its multi-GPU work
    # units, do: a clone on a newly loaded copy (here the same weights).
    copy = lynx.clone(model_override=load_flux().get_clone_model_override())
    copied = copy.get_model_object("diffusion_model")
    assert copied is not lynx.get_model_object("diffusion_model")
    plan = installed_plan(copy)
    assert plan is not installed_plan(lynx) and plan.runtime is installed_plan(lynx).runtime
    assert all(copied.get_submodule(name) is f.module for name, f in plan.installed_forwards.items())
    assert all(copy.object_patches[f"diffusion_model.{name}.forward"] is f for name, f in plan.installed_forwards.items())
    blocks = [p.rt_lynx_block for p in copy.model_options["transformer_options"]["patches_replace"]["dit"].values()]
    assert sorted(blocks) == [("double", "double_blocks", 0), ("single", "single_blocks", 0)]
    assert torch.equal(sample(copy, steps=2), sample(lynx, steps=2))
    # A copy made some other way is refused at the run's start, not computed with the wrong modules.
    with pytest.raises(RuntimeError, match="copy of the patched model"):
        _refuse_a_copy_of_the_model(copy, installed_plan(lynx))


def test_dense_warmup_covering_all_steps_is_dense(flux):
    dense = sample(flux, steps=2)
    assert torch.equal(sample(sparsify(flux, dense_warmup_steps=2), steps=2), dense)
    half = sample(sparsify(flux, dense_warmup_steps=1), steps=2)
    assert not torch.equal(half, dense)
    assert not torch.equal(half, sample(sparsify(flux), steps=2))


def test_layer_uses_the_weight_comfyui_would_use_with_a_lora_patch_and_lowvram(flux):
    comfy.model_management.unload_all_models()  # patch_model below is called directly, not by the loader
    lynx = sparsify(flux)
    layer = flux.model.diffusion_model.get_submodule(QKV)
    diff = torch.randn_like(layer.weight) * 0.01
    lynx.add_patches({f"diffusion_model.{QKV}.weight": (diff,)}, 1.0)
    x = torch.randn(2, 40, 3072)
    expected = sparse_linear_reference(x.reshape(-1, 3072), layer.weight + diff, layer.bias, True).reshape(2, 40, -1)
    for lowvram_bytes in (0, 1):  # full load merges the patch; lowvram casts it per call
        lynx.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=lowvram_bytes)
        try:
            assert isinstance(lynx_layer(layer), LynxLinearForward)
            assert layer.comfy_cast_weights == bool(lowvram_bytes)
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
        finally:
            lynx.unpatch_model(device_to=torch.device("cpu"))
    assert lynx_forwards_installed(flux) == []


@pytest.mark.parametrize("warmup", [0, 1])
def test_comfyui_torch_compile_wrapper_runs_the_lynx_layers_without_graph_breaks(flux, warmup, tmp_path,
                                                                                   monkeypatch):
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters

    def compiled_sample(patcher):
        compiled = patcher.clone()
        set_torch_compile_wrapper(compiled, backend="aot_eager")
        torch._dynamo.reset()
        counters.clear()
        out = sample(compiled)
        return out, dict(counters["graph_break"])

    _, dense_breaks = compiled_sample(flux)
    lynx = sparsify(flux, dense_warmup_steps=warmup)  # warm-up: a dense and a sparse graph
    out, lynx_breaks = compiled_sample(lynx)
    torch.testing.assert_close(out, sample(lynx), rtol=1e-4, atol=1e-4)
    # ComfyUI's own model code breaks the graph in places; the Lynx layers add no reason of their
    # own (with a warm-up the dense and sparse variants each meet ComfyUI's breaks once).
    assert set(lynx_breaks) <= set(dense_breaks), lynx_breaks
    if not warmup:
        assert lynx_breaks == dense_breaks
    if warmup:   # a folded Lynx LoRA: its dense steps subtract the branch, inside the compiled graph too
        save_folded_lora(installed_plan(lynx), tmp_path, monkeypatch)
        folded = RTLynxLoadLoRA().load(lynx, "lynx/folded.safetensors", 1.0)[0]
        out, folded_breaks = compiled_sample(folded)
        torch.testing.assert_close(out, sample(folded), rtol=1e-4, atol=1e-4)
        assert set(folded_breaks) <= set(dense_breaks), folded_breaks


def test_fp8_copies_that_do_not_fit_leave_their_layers_quantising_per_call(flux, monkeypatch):
    from rt_lynx_pack.nodes import comfy_glue
    lynx_fp8 = sparsify(flux, precision="fp8")
    forwards = installed_plan(lynx_fp8).installed_forwards
    roomy = sample(lynx_fp8)
    mm = comfy.model_management
    sizes = sorted(comfy_glue._fp8_copy_bytes(f.module) for f in forwards.values())
    room = sum(sizes[: len(sizes) // 2])   # about half of the copies fit
    # Short of room, ComfyUI is asked to unload what this run does not use (this model stays) ...
    asked = []
    with monkeypatch.context() as patch:
        patch.setattr(mm, "get_free_memory", lambda device=None, torch_free_too=False: mm.minimum_inference_memory() + room)
        patch.setattr(mm, "free_memory", lambda need, device, keep_loaded=(): asked.append((need, keep_loaded)) or [])
        assert comfy_glue._room_for_fp8_copies(lynx_fp8.load_device, sum(sizes)) == room
        assert comfy_glue._room_for_fp8_copies(lynx_fp8.load_device, room) == room   # fits: nothing asked
    assert len(asked) == 1 and asked[0][0] == sum(sizes) + mm.minimum_inference_memory()
    assert any(loaded.model is lynx_fp8 for loaded in asked[0][1])
    # ... and the layers whose copies still do not fit quantise their weight per call. The modulation
    # linears' copies come after all others, all or none; without them those compute as the original
    # layers.
    monkeypatch.setattr(comfy_glue, "_room_for_fp8_copies", lambda device, needed: room)
    modulation = installed_plan(lynx_fp8).per_image_forwards
    with_copies = watch_each_step(lynx_fp8, lambda: {n for n, f in forwards.items() if f.fp8_weight is not None})
    tight = sample(lynx_fp8)
    assert with_copies and all(0 < len(made) < len(forwards) and not made & modulation.keys() for made in with_copies)
    with monkeypatch.context() as patch:   # room for every copy but the modulation linears'
        patch.setattr(type(next(iter(modulation.values()))), "prepare_fp8", lambda self, *args: None)
        roomy_without_modulation_copies = sample(lynx_fp8)
    assert torch.equal(tight, roomy_without_modulation_copies)   # the same e4m3 weights, made per call
    assert not torch.equal(tight, roomy)
    # Room for every other copy and all but a little of the modulation linears': none of theirs.
    modulation_bytes = sum(comfy_glue._fp8_copy_bytes(f.module) for f in modulation.values())
    monkeypatch.setattr(comfy_glue, "_room_for_fp8_copies", lambda device, needed: needed - modulation_bytes // 2)
    made = watch_each_step(lynx_fp8, lambda: {n for n, f in forwards.items() if f.fp8_weight is not None})
    sample(lynx_fp8)
    assert made and all(m == forwards.keys() - modulation.keys() for m in made)


def test_fp8_under_dynamic_vram_copies_what_each_layer_casts_once_per_run(flux, monkeypatch):
    # Later ComfyUI releases' dynamic VRAM (CUDA only) keeps the weights where they were loaded and
    # casts each per call: the run's preparation is called here as it would be for such a patcher.
    import types

    from comfy.patcher_extension import CallbacksMP
    from rt_lynx_pack.nodes import comfy_glue
    lynx = sparsify(flux, precision="fp8")
    forwards = installed_plan(lynx).installed_forwards
    cast = comfy_glue.comfy_linear_weights
    casts = []
    monkeypatch.setattr(comfy_glue, "comfy_linear_weights",
                        lambda module, x: casts.append(module) or cast(module, x))
    monkeypatch.setattr(comfy_glue, "_weight_in_place", lambda module, device: False)   # not on the GPU
    dynamic = types.SimpleNamespace(model=lynx.model, load_device=lynx.load_device, get_model_object=lynx.get_model_object,
                                    model_options=lynx.model_options, is_dynamic=lambda: True)
    for callback in lynx.callbacks[CallbacksMP.ON_PRE_RUN].values():
        for function in callback:
            function(dynamic)
    try:
        assert all(f.fp8_weight is not None for f in forwards.values())
        assert {id(m) for m in casts} == {id(f.module) for f in forwards.values()}   # each from its cast weight
        # ... and the bias it casts beside it (where ComfyUI patches biases per call, only that one has them)
        assert all((f.fp8_bias is None) == (f.module.bias is None) for f in forwards.values())
        x = torch.randn(1, 40, 64 * 48)   # a call after it: the product, not a cast
        casts.clear()
        forwards["double_blocks.0.img_attn.qkv"](x)
        assert not casts
    finally:
        for callback in lynx.callbacks[CallbacksMP.ON_DETACH].values():
            for function in callback:
                function(lynx)


def test_compiled_fp8_model_samples_again_without_compiling_again(flux):
    # Each sampling run makes its e4m3 weights anew (and drops them after): new tensors of the
    # same kind must not make torch.compile compile the model again.
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters
    compiled = sparsify(flux, precision="fp8").clone()
    set_torch_compile_wrapper(compiled, backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    first = sample(compiled)
    graphs = counters["stats"]["unique_graphs"]
    second = sample(compiled)
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(first, second)


@pytest.fixture(scope="module")
def dense_graph_counts(flux):
    return graphs_after_each_run(flux)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_compiled_lynx_model_compiles_no_more_often_than_the_dense_one(flux, dense_graph_counts, precision):
    # torch.compile may compile the Lynx model again only where it compiles ComfyUI's own. The
    # sampler hands every block its schedule (transformer_options["sample_sigmas"], one longer than
    # the steps): a guard on it would compile the whole model again for a new step count (25 s for
    # FLUX on a GPU).
    # ComfyUI's own model does not compile again for a new step count (else this test could not see it).
    assert dense_graph_counts[0] > 0 and dense_graph_counts[1] == dense_graph_counts[0]
    assert graphs_after_each_run(sparsify(flux, precision=precision)) == dense_graph_counts


def test_lynx_lora_node_loads_a_file_and_refuses_others(flux, tmp_path):
    from rt_lynx_pack.lynx import LynxLoRA
    lynx = sparsify(flux)
    plan = installed_plan(lynx)
    g = torch.Generator().manual_seed(3)
    layers = {n: (torch.randn(4, k, generator=g) * 0.01, torch.randn(o, 4, generator=g) * 0.01)
              for n, (k, o) in plan.sparse_layer_shapes.items()}
    (tmp_path / "lynx").mkdir()
    save_lynx_lora(LynxLoRA("flux", 4, 4.0, "2:4", True, layers), str(tmp_path / "lynx" / "tiny_flux.safetensors"))
    save_lynx_lora(LynxLoRA("qwen_image", 4, 4.0, "2:4", True, {"transformer_blocks.0.attn.to_q":
                                                                 (torch.zeros(4, 3072), torch.zeros(3072, 4))}),
                   str(tmp_path / "lynx" / "qwen.safetensors"))
    folder_paths.add_model_folder_path("loras", str(tmp_path), is_default=True)
    names = RTLynxLoadLoRA.INPUT_TYPES()["required"]["lora_name"][0]
    assert names[:2] == ["lynx/qwen.safetensors", "lynx/tiny_flux.safetensors"]

    with_lora = RTLynxLoadLoRA().load(lynx, "lynx/tiny_flux.safetensors", 1.0)[0]
    base, out = sample(lynx), sample(with_lora)
    assert torch.isfinite(out).all() and not torch.equal(base, out)
    assert torch.equal(sample(RTLynxLoadLoRA().load(lynx, "lynx/tiny_flux.safetensors", 0.0)[0]), base)
    with pytest.raises(LynxLoRAMismatch, match=r"architecture 'qwen_image'.*transformer_blocks\.0\.attn\.to_q"):
        RTLynxLoadLoRA().load(lynx, "lynx/qwen.safetensors", 1.0)
    with pytest.raises(ValueError, match="connect that node first"):
        RTLynxLoadLoRA().load(flux, "lynx/tiny_flux.safetensors", 1.0)


def save_folded_lora(plan, folder, monkeypatch) -> dict:
    """A random folded Lynx LoRA for `plan` as lynx/folded.safetensors under `folder`, which is
    ComfyUI's loras folder for the rest of the test."""
    from rt_lynx_pack.lynx import LynxLoRA
    g = torch.Generator().manual_seed(4)
    layers = {n: (torch.randn(4, k, generator=g) * 0.05, torch.randn(o, 4, generator=g) * 0.05)
              for n, (k, o) in plan.sparse_layer_shapes.items()}
    (folder / "lynx").mkdir(exist_ok=True)
    save_lynx_lora(LynxLoRA("flux", 0, 0.0, "2:4", True, {}, folded_rank=4, folded_alpha=8.0,
                            folded_layers=layers),
                   str(folder / "lynx" / "folded.safetensors"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(folder)], folder_paths.supported_pt_extensions))
    return layers


def test_folded_lynx_lora_is_a_comfyui_weight_patch_that_dense_steps_take_back_off(flux, tmp_path, monkeypatch):
    dense = sample(flux)
    lynx = sparsify(flux)
    layers = save_folded_lora(installed_plan(lynx), tmp_path, monkeypatch)
    module = flux.model.diffusion_model.get_submodule(QKV)
    original = module.weight.detach().clone()
    down, up = (t.float() for t in layers[QKV])

    folded = RTLynxLoadLoRA().load(lynx, "lynx/folded.safetensors", 0.5)[0]
    assert f"diffusion_model.{QKV}.weight" in folded.patches and not lynx.patches   # on the clone only
    weights_seen = watch_each_step(folded, lambda: module.weight.detach().clone())
    base, out = sample(lynx), sample(folded)
    assert torch.isfinite(out).all() and not torch.equal(base, out)
    # ComfyUI patched the weight while sampling (scale alpha / rank * strength = 8 / 4 * 0.5) ...
    torch.testing.assert_close(weights_seen[0], original + (up.bfloat16().float() @ down.bfloat16().float()),
                               rtol=1e-5, atol=1e-6)
    # ... and undid it: the loaded model is what it was.
    assert torch.equal(sample(flux), dense) and torch.equal(module.weight, original)
    # Dense steps (here every step) compute with the unpatched weight: the branch comes back off.
    all_dense = RTLynxLoadLoRA().load(sparsify(flux, dense_warmup_steps=100), "lynx/folded.safetensors", 0.5)[0]
    torch.testing.assert_close(sample(all_dense), dense, rtol=1e-4, atol=1e-4)
    # With fp8 precision the e4m3 weight is made from the patched one.
    fp8 = RTLynxLoadLoRA().load(sparsify(flux, precision="fp8"), "lynx/folded.safetensors", 0.5)[0]
    qkv = installed_plan(fp8).forwards[QKV]
    fp8_weights = watch_each_step(fp8, lambda: qkv.fp8_weight[0].float() * qkv.fp8_weight[1][:, None])
    sample(fp8)
    torch.testing.assert_close(fp8_weights[0], weights_seen[0], rtol=2 ** -3, atol=1e-3)
    assert not torch.allclose(fp8_weights[0], original, rtol=2 ** -3, atol=1e-3)


def test_cancel_takes_effect_in_every_patched_layer_as_in_comfyuis_own(flux):
    import comfy.ops
    if not hasattr(comfy.ops, "run_every_op"):
        pytest.skip("this ComfyUI's layers check for Cancel nowhere per op (run_every_op came later)")
    plan = installed_plan(sparsify(flux, precision="fp8"))
    kinds = (plan.forwards, plan.fp8_dense_forwards, plan.per_image_forwards)
    assert all(kinds), "the fp8 plan has sparse, fp8 dense and modulation layers"
    for forward in (next(iter(forwards.values())) for forwards in kinds):
        x = torch.randn(1, 16, forward.module.in_features)
        comfy.model_management.interrupt_current_processing(True)
        try:
            with pytest.raises(comfy.model_management.InterruptProcessingException):
                forward(x)
        finally:
            comfy.model_management.interrupt_current_processing(False)
        assert forward(x).shape == (1, 16, forward.module.out_features)


def test_bad_requests_are_refused_clearly(flux):
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        sparsify(flux, backend="cuda")
    with pytest.raises(ValueError, match="already patched"):
        sparsify(sparsify(flux))
    with pytest.raises(ValueError, match="invalid layer filter"):
        sparsify(flux, include_layers="(")


def test_a_model_replaying_cuda_graphs_writes_its_fp8_weights_again_where_they_are(flux):
    # Inductor's CUDA graphs read every weight at its recorded address; a moved one is recorded again.
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from rt_lynx_pack.nodes.comfy_glue import replays_cuda_graphs
    lynx = sparsify(flux, precision="fp8")
    compiled = lynx.clone()
    set_torch_compile_wrapper(model=compiled, backend="inductor", mode="reduce-overhead")   # not run here
    assert replays_cuda_graphs(compiled) and not replays_cuda_graphs(lynx)
    default_mode = lynx.clone()
    set_torch_compile_wrapper(model=default_mode, backend="inductor")
    assert not replays_cuda_graphs(default_mode)
    forwards = installed_plan(compiled).installed_forwards
    qkv = forwards[QKV]
    original = qkv.module.weight.detach().clone()
    comfy.model_management.load_models_gpu([compiled])
    try:
        compiled.pre_run()
        first = {name: (*f.fp8_weight, f.fp8_bias) for name, f in forwards.items()}   # held: no reuse
        batch = installed_plan(compiled).modulation_batch   # the modulation linears' one e4m3 tensor
        batch_first = [t.data_ptr() for t in (batch.weight, batch.scale, batch.bias)]
        assert batch.ready
        scale_before = qkv.fp8_weight[1].clone()
        compiled.cleanup()
        assert all(f.fp8_weight is not None for f in forwards.values())   # kept between runs
        qkv.module.weight.data.mul_(2)   # changed between runs (a LoRA patched it)
        compiled.pre_run()
        addresses = lambda tensors: [None if t is None else t.data_ptr() for t in tensors]  # noqa: E731
        assert all(addresses((*f.fp8_weight, f.fp8_bias)) == addresses(first[name]) for name, f in forwards.items())
        assert batch.ready and addresses((batch.weight, batch.scale, batch.bias)) == batch_first
        assert torch.allclose(qkv.fp8_weight[1], 2 * scale_before)   # with the new values
        compiled.cleanup()
        lynx.pre_run()   # the same layers sampled without CUDA graphs: made anew, dropped after
        assert qkv.fp8_weight[0].data_ptr() != first[QKV][0].data_ptr()
        lynx.cleanup()
        assert all(f.fp8_weight is None for f in forwards.values())
        assert not batch.ready and batch.weight is None
    finally:
        qkv.module.weight.data.copy_(original)
        comfy.model_management.unload_all_models()


def test_under_cuda_graphs_the_room_asked_counts_a_modulation_tensor_that_must_be_made(flux, monkeypatch):
    # A run where one modulation linear was patched per call (no batch: each layer its own copy),
    # then a run where the batch can be made: its whole tensor is new memory, not a rewrite.
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from rt_lynx_pack.nodes import comfy_glue
    compiled = sparsify(flux, precision="fp8").clone()
    set_torch_compile_wrapper(model=compiled, backend="inductor", mode="reduce-overhead")   # not run here
    plan = installed_plan(compiled)
    batch = plan.modulation_batch
    asked = []
    room_for = comfy_glue._room_for_fp8_copies
    monkeypatch.setattr(comfy_glue, "_room_for_fp8_copies", lambda device, needed: asked.append(needed) or
                        room_for(device, needed))
    patched_per_call = batch.forwards[0].module
    modulation_bytes = sum(comfy_glue._fp8_copy_bytes(f.module) for f in batch.forwards)
    comfy.model_management.load_models_gpu([compiled])
    try:
        patched_per_call.weight_function.append(lambda weight: weight)
        compiled.pre_run()
        assert not batch.ready and all(f.fp8_weight is not None for f in batch.forwards[1:])
        patched_per_call.weight_function.clear()
        compiled.pre_run()
        assert batch.ready
        assert asked[-1] == modulation_bytes   # every other layer's copy is written again where it is
        compiled.pre_run()
        assert asked[-1] == 0   # the tensor written again where it is
    finally:
        patched_per_call.weight_function.clear()
        compiled.cleanup()
        comfy.model_management.unload_all_models()


def test_fp8_precision_quantises_weights_for_each_run_and_drops_them_after_it(flux):
    from comfy.patcher_extension import CallbacksMP
    lynx_bf16 = sparsify(flux)
    lynx_fp8 = sparsify(flux, precision="fp8")
    plan = installed_plan(lynx_fp8)
    # The layers kept dense (FLUX single-block linear2) run the dense fp8 product, and the blocks'
    # modulation linears read their weights in e4m3.
    assert plan.fp8_dense_forwards.keys() == {d.name for d in plan.decisions if not d.sparse} != set()
    assert set(plan.per_image_forwards) == {"double_blocks.0.img_mod.lin", "double_blocks.0.txt_mod.lin",
                                            "single_blocks.0.modulation.lin"}
    assert not installed_plan(lynx_bf16).per_image_forwards
    forwards = plan.installed_forwards.values()
    made_at_each_step = watch_each_step(lynx_fp8, lambda: all(f.fp8_weight is not None for f in forwards))
    bf16_out = sample(lynx_bf16)
    fp8_out = sample(lynx_fp8)
    assert made_at_each_step and all(made_at_each_step)  # made before the sampling run's first step
    assert all(f.fp8_weight is None for f in forwards)  # and dropped when it ended
    assert torch.isfinite(fp8_out).all() and not torch.equal(fp8_out, bf16_out)
    assert torch.equal(sample(lynx_fp8), fp8_out)  # the next run makes the same weights again
    # Hook LoRAs rewrite weights in place during sampling: the fp8 weights are made again then.
    lynx_fp8.pre_run()
    qkv = plan.forwards[QKV]
    before = qkv.fp8_weight[1].clone()
    original = qkv.module.weight.detach().clone()
    try:
        qkv.module.weight.data.mul_(2)
        for callback in lynx_fp8.get_all_callbacks(CallbacksMP.ON_APPLY_HOOKS):
            callback(lynx_fp8, None)
        assert torch.allclose(qkv.fp8_weight[1], 2 * before)
    finally:
        qkv.module.weight.data.copy_(original)
    assert qkv.fp8_weight is not None  # state of a run that did not clean up ...
    sparse_fp8_only = sample(sparsify(flux, precision="fp8", fp8_dense_layers=False))
    assert all(f.fp8_weight is None for f in forwards)  # ... goes when loading another clone detaches it
    assert not torch.equal(sparse_fp8_only, fp8_out)
    dense = sample(flux)
    assert ((fp8_out - dense).norm() / dense.norm()) < 2 * ((bf16_out - dense).norm() / dense.norm()) + 0.05
