"""Qwen-Image, Lumina 2 (Z-Image's model class) and fp8 FLUX weights inside a real ComfyUI: models
of real width with one block, loaded by ComfyUI's loader, patched by the node, sampled by ComfyUI's
sampler on the CPU."""
import pytest
import torch

from comfyui_env import import_comfyui

import_comfyui()

import comfy.model_management  # noqa: E402

from comfyui_models import (build_model, graphs_after_each_run, load_model, relative_error, sample,  # noqa: E402
                            sparsify, state_dict, watch_each_step)
from rt_lynx_pack.nodes.comfy_glue import installed_plan  # noqa: E402


def linears(patcher):
    return {n for n, m in patcher.model.diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.fixture(autouse=True, scope="module")
def _unload():
    yield
    comfy.model_management.unload_all_models()


@pytest.fixture(scope="module")
def qwen():
    return load_model("qwen_image")


@pytest.fixture(scope="module")
def lumina2():
    return load_model("lumina2")


def test_qwen_image_patched_and_sampled_with_cfg_batch_2_and_changing_resolution(qwen, capsys):
    assert type(qwen.model).__name__ == "QwenImage"
    lynx = sparsify(qwen)
    assert ("RT-Lynx: qwen_image, 12 linears sparsified 2:4 + norm compensation, 0 kept dense"
            in capsys.readouterr().out)
    plan = installed_plan(lynx)
    assert set(plan.forwards) <= linears(qwen)
    assert {n.split(".", 2)[2] for n in plan.forwards} == {
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
        "txt_mlp.net.2"}

    # 9x9 then 7x11 patches per image (81, 77 tokens: not multiples of 64), 40 text tokens, batch 2, CFG.
    for size in ((18, 18), (14, 22)):
        kwargs = dict(arch="qwen_image", size=size, batch=2, cfg=3.0, tokens=40, steps=2)
        dense = sample(qwen, **kwargs)
        out = sample(lynx, **kwargs)
        assert out.shape == (2, 16, 1, *size)
        assert torch.isfinite(out).all()
        assert not torch.equal(out, dense)
        assert relative_error(out, dense) < 0.5
        assert torch.equal(sample(qwen, **kwargs), dense)  # the loaded model is not changed


def test_compiled_qwen_image_compiles_no_more_often_than_comfyuis_own(qwen):
    # As test_compiled_lynx_model_compiles_no_more_often_than_the_dense_one, for Qwen-Image's
    # fused blocks (CFG 2 in the last run doubles the batch).
    # ComfyUI 0.33.0's own Qwen-Image compiles again for a new step count (0.3.64's does not): there
    # only the FLUX test can see a guard of ours on the schedule; the counts must match on both.
    dense = graphs_after_each_run(qwen, "qwen_image", tokens=40)
    assert dense[0] > 0
    assert graphs_after_each_run(sparsify(qwen), "qwen_image", tokens=40) == dense


def test_lumina2_nextdit_gets_the_z_image_policy_on_its_real_module_names(lumina2, capsys):
    assert type(lumina2.model).__name__ == "Lumina2"
    names = linears(lumina2)
    lynx = sparsify(lumina2)
    summary = capsys.readouterr().out
    assert "RT-Lynx: z_image, 2 linears sparsified 2:4 + norm compensation, 3 kept dense" in summary
    plan = installed_plan(lynx)
    decisions = {d.name: d for d in plan.decisions}
    assert set(decisions) <= names
    assert set(plan.forwards) == {"layers.0.attention.qkv", "layers.0.feed_forward.w2"}
    assert {n for n, d in decisions.items() if not d.sparse} == {
        "layers.0.attention.out", "layers.0.feed_forward.w1", "layers.0.feed_forward.w3"}
    # The refiners and every non-block linear exist in ComfyUI's NextDiT and are never touched.
    refiners = {n for n in names if n.startswith(("noise_refiner.", "context_refiner."))}
    assert "noise_refiner.0.attention.qkv" in refiners and "context_refiner.1.feed_forward.w2" in refiners
    assert not refiners & set(decisions)
    assert not {"x_embedder", "cap_embedder.1", "final_layer.linear", "layers.0.adaLN_modulation.1"} & set(decisions)

    all_five = installed_plan(sparsify(lumina2, default_dense_layers=False))
    assert {n.split(".", 2)[2] for n in all_five.forwards} == {
        "attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"}

    kwargs = dict(arch="lumina2", size=(18, 14), batch=2, cfg=2.0, tokens=40, steps=2)
    dense = sample(lumina2, **kwargs)
    out = sample(lynx, **kwargs)
    assert torch.isfinite(out).all() and not torch.equal(out, dense)
    assert relative_error(out, dense) < 0.5


def test_build_model_makes_the_model_comfyui_detects_without_a_real_state_dict():
    """The benchmark's builder (meta-device detection, model built in place) on a tiny FLUX."""
    built = build_model("flux", blocks=(1, 1), device="cpu", dtype=torch.float32)
    loaded_sd = state_dict("flux", (1, 1))
    assert type(built.model).__name__ == "Flux"
    assert built.model.model_config.unet_config["depth"] == 1
    built_sd = built.model.diffusion_model.state_dict()
    assert {k: v.shape for k, v in built_sd.items()} == {k: v.shape for k, v in loaded_sd.items()}
    assert all(v.device.type == "cpu" and not v.is_meta for v in built_sd.values())
    # The q/k norm's weight: `scale` in ComfyUI 0.3.x, `weight` (torch.nn.RMSNorm) later.
    norm_weight = next(v for k, v in built_sd.items() if k.startswith("double_blocks.0.img_attn.norm.key_norm."))
    assert norm_weight.eq(1).all()
    out = sample(sparsify(built), size=(10, 14), batch=2)
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_fp8_weights_sample_with_lynx_close_to_dense():
    sd = state_dict("flux", (1, 1))
    fp32 = load_model("flux", sd=sd)
    fp8 = load_model("flux", dtype=torch.float8_e4m3fn, sd=sd)
    qkv = fp8.model.diffusion_model.get_submodule("double_blocks.0.img_attn.qkv")
    assert qkv.weight.dtype == torch.float8_e4m3fn
    kwargs = dict(size=(18, 18), tokens=40, steps=2)
    dense32, dense8 = sample(fp32, **kwargs), sample(fp8, **kwargs)
    lynx8 = sample(sparsify(fp8), **kwargs)
    lynx32 = sample(sparsify(fp32), **kwargs)
    assert torch.isfinite(lynx8).all()
    assert not torch.equal(lynx8, dense8)
    fp8_error = relative_error(dense8, dense32)   # what storing weights in fp8 alone costs
    lynx_error = relative_error(lynx32, dense32)  # what 2:4 activations alone cost
    assert 0 < fp8_error < 0.2 and 0 < lynx_error < 0.5
    # Both together stay within the sum of the two, with slack for their interaction.
    assert relative_error(lynx8, dense32) < 1.5 * (fp8_error + lynx_error)
    # fp8 precision takes the stored e4m3 weights as they are (no copy), sparse and kept-dense layers.
    lynx8_fp8 = sparsify(fp8, precision="fp8")
    forwards = lynx8_fp8.get_attachment("rt_lynx").installed_forwards
    taken_as_stored = watch_each_step(lynx8_fp8, lambda: {
        name for name, f in forwards.items()
        if f.fp8_weight is not None and f.fp8_weight[0].data_ptr() == f.module.weight.data_ptr()})
    out = sample(lynx8_fp8, **kwargs)
    assert taken_as_stored and all(names == forwards.keys() for names in taken_as_stored)
    assert torch.isfinite(out).all()
    assert relative_error(out, dense32) < 1.5 * (fp8_error + lynx_error) + 0.05
    # The stored bytes are trusted only with the scale ComfyUI's cast applies.
    from rt_lynx_pack.nodes.comfy_glue import _probe, _stored_scale_is_complete, comfy_linear_weights
    computed = comfy_linear_weights(qkv, _probe(qkv, torch.float32))[0]
    assert _stored_scale_is_complete(qkv.weight, None, computed)
    assert not _stored_scale_is_complete(qkv.weight, torch.tensor(2.0), computed)
    assert not _stored_scale_is_complete(qkv.weight, torch.ones(5), computed)


def scaled_fp8_state_dict(sd):
    """ComfyUI's scaled fp8 checkpoint format: every linear weight in e4m3 with its per-tensor
    scale_weight, and the scaled_fp8 marker (later releases load it into quantized linears that
    are not nn.Linear subclasses)."""
    out = dict(sd)
    for key, weight in sd.items():
        if key.endswith(".weight") and weight.dim() == 2:
            scale = weight.abs().amax().float() / 448
            out[key] = (weight.float() / scale).to(torch.float8_e4m3fn)
            out[key[:-len("weight")] + "scale_weight"] = scale.reshape(())
    out["scaled_fp8"] = torch.tensor([], dtype=torch.float8_e4m3fn)
    return out


def test_scaled_fp8_checkpoint_is_sparsified_like_the_full_one_and_its_e4m3_weights_are_used_as_stored(capsys):
    from rt_lynx_pack.nodes.comfy_glue import _stored_e4m3
    sd = state_dict("flux", (1, 1))
    full = load_model("flux", sd=sd)
    scaled = load_model("flux", sd=scaled_fp8_state_dict(sd))
    capsys.readouterr()
    lynx = sparsify(scaled)
    summary = capsys.readouterr().out
    plan = installed_plan(lynx)
    sparse = {d.name for d in plan.decisions if d.sparse}
    assert sparse and sparse == {d.name for d in installed_plan(sparsify(full)).decisions if d.sparse}
    assert f"RT-Lynx: flux, {len(sparse)} linears sparsified" in summary, summary
    kwargs = dict(size=(18, 18), tokens=40, steps=2)
    dense, dense_full = sample(scaled, **kwargs), sample(full, **kwargs)
    out = sample(lynx, **kwargs)
    assert torch.isfinite(out).all() and not torch.equal(out, dense)
    assert relative_error(dense, dense_full) < 0.2 and relative_error(out, dense) < 0.5
    # fp8 precision: each layer's stored e4m3 bytes with their scale, no copy.
    lynx8 = sparsify(scaled, precision="fp8")
    forwards = installed_plan(lynx8).installed_forwards
    stored = {name: _stored_e4m3(f.module) for name, f in forwards.items()}
    assert all(s is not None for s in stored.values())
    taken_as_stored = watch_each_step(lynx8, lambda: {
        name for name, f in forwards.items()
        if f.fp8_weight is not None and f.fp8_weight[0].data_ptr() == stored[name][0].data_ptr()})
    out8 = sample(lynx8, **kwargs)
    assert taken_as_stored and all(names == forwards.keys() for names in taken_as_stored)
    assert torch.isfinite(out8).all() and relative_error(out8, dense) < 0.5


def test_stored_fp8_layer_with_a_scale_kept_elsewhere_is_requantised_within_the_room_asked(monkeypatch):
    # A stored e4m3 layer whose bytes times scale_weight are not what ComfyUI computes with (here its
    # cast doubles them, as a scale kept elsewhere would) gets a copy of what it computes with; the
    # copy's bytes are part of the room asked of ComfyUI up front.
    from rt_lynx_pack.nodes import comfy_glue
    fp8 = load_model("flux", dtype=torch.float8_e4m3fn, sd=state_dict("flux", (1, 1)))
    odd = fp8.model.diffusion_model.get_submodule("double_blocks.0.img_attn.qkv")
    cast = comfy_glue.comfy_linear_weights

    def cast_doubling_odd(module, x):
        weight, bias, release = cast(module, x)
        return (weight * 2 if module is odd else weight), bias, release
    monkeypatch.setattr(comfy_glue, "comfy_linear_weights", cast_doubling_odd)
    asked = []
    room_for = comfy_glue._room_for_fp8_copies
    monkeypatch.setattr(comfy_glue, "_room_for_fp8_copies", lambda device, needed: asked.append(needed) or
                        room_for(device, needed))
    lynx = sparsify(fp8, precision="fp8")
    forwards = installed_plan(lynx).installed_forwards
    odd_name = next(name for name, f in forwards.items() if f.module is odd)
    copies = watch_each_step(lynx, lambda: {
        name: (f.fp8_weight[0].float() * f.fp8_weight[1][:, None]).clone() for name, f in forwards.items()
        if f.fp8_weight is not None and f.fp8_weight[0].data_ptr() != f.module.weight.data_ptr()})
    out = sample(lynx, size=(18, 18), tokens=40, steps=2)
    assert torch.isfinite(out).all()
    assert asked and all(needed == comfy_glue._fp8_copy_bytes(odd) for needed in asked)
    assert copies and all(set(step) == {odd_name} for step in copies)
    # Made from what ComfyUI computes with, not from the stored bytes.
    assert relative_error(copies[0][odd_name], 2 * odd.weight.float()) < 0.07


@pytest.mark.parametrize("arch", ["flux", "qwen_image", "lumina2"])
def test_rope_table_op_gives_each_models_own_table_while_sampling_on_the_clone_only(arch, capsys):
    model = load_model(arch)
    lynx = sparsify(model)
    assert "RoPE table in one op" in capsys.readouterr().out
    (key,) = [k for k in lynx.object_patches if k.endswith("embedder.forward")]
    embedder = model.model.diffusion_model.get_submodule(key.removeprefix("diffusion_model.").removesuffix(".forward"))
    installed_forward = lynx.object_patches[key]
    calls = []

    def comparing(ids):
        got = installed_forward(ids)
        calls.append((ids.dtype, torch.equal(got, type(embedder).forward(embedder, ids))))
        return got
    lynx.object_patches[key] = comparing
    sample(lynx, arch=arch, size=(18, 14), batch=2, cfg=2.0, tokens=40, steps=2)
    assert calls and all(same for _, same in calls), calls
    assert key not in model.object_patches
    comfy.model_management.unload_all_models()   # ComfyUI's unpatching puts the module's own forward back
    assert getattr(embedder.forward, "__func__", None) is type(embedder).forward
    assert key not in sparsify(model, fused_blocks=False).object_patches


def test_an_embedder_another_node_patches_keeps_that_patch_and_other_devices_keep_comfyuis_table():
    from rt_lynx_pack.nodes.comfy_glue import install_rope_tables
    model = load_model("flux")
    diffusion_model = model.get_model_object("diffusion_model")
    for key, value in (("diffusion_model.pe_embedder", torch.nn.Identity()), ("diffusion_model.pe_embedder.theta", 5),
                       ("diffusion_model.pe_embedder.forward", lambda ids: ids)):
        other = model.clone()
        other.add_object_patch(key, value)
        assert install_rope_tables(other, diffusion_model) == "RoPE table kept as it is (patched by another node)"
        assert other.object_patches == {key: value}
    elsewhere = model.clone()
    elsewhere.load_device = torch.device("mps")   # ComfyUI computes the table on the CPU there
    assert install_rope_tables(elsewhere, diffusion_model) == "" and not elsewhere.object_patches
    assert install_rope_tables(model.clone(), diffusion_model) == "RoPE table in one op"
