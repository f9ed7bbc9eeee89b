"""FLUX and Qwen-Image blocks with fused elementwise work inside a real ComfyUI: each fused forward
computes what ComfyUI's own block computes, the sampler reaches them through ComfyUI's
block-replace patches on the patched clone only, and a block another node replaces is left to
that node."""
import copy

import pytest
import torch

from comfyui_env import import_comfyui

import_comfyui()

import comfy.ldm.flux.math as flux_math  # noqa: E402
import comfy.ldm.qwen_image.model as qwen_image_model  # noqa: E402
import comfy.model_management  # noqa: E402

from comfyui_models import load_model, sample, sparsify, watch_each_step  # noqa: E402
from rt_lynx_pack.lynx import LynxConfig, installed, plan_model  # noqa: E402
from rt_lynx_pack.lynx import fused_blocks, patching  # noqa: E402
from rt_lynx_pack.lynx.batched_modulation import BatchedModulation  # noqa: E402
from rt_lynx_pack.nodes.comfy_glue import installed_plan  # noqa: E402
from rt_lynx_pack.lynx.fused_blocks import (flux_double_block, flux_single_block, fused_block_kind,  # noqa: E402
                                            qwen_image_block)
from rt_lynx_pack.lynx.linear import fp8_dense_linear, lynx_linear_after_gelu, lynx_linear_modulated  # noqa: E402


def attention(q, k, v, heads, mask, transformer_options):
    return flux_math.optimized_attention(q, k, v, heads, skip_reshape=True, mask=mask,
                                         transformer_options=transformer_options)


def own_copy(block, dtype):
    # A copy, so the module-scoped model the sampling tests use keeps its fp32 weights (a bf16
    # round trip would round them, and the fused and unfused samples' 2:4 choices would then
    # part on different near-ties).
    return copy.deepcopy(block).to(dtype)


def assert_same_up_to_rounding(got, want):
    """fp32: the same operations up to the residuals' single rounding (addcmul). bf16: plus one
    rounding of each gated product that ComfyUI's separate multiply makes, one ulp of a term as
    large as the output's largest (a residual that cancels it keeps that absolute error)."""
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        one_ulp_of_largest = want.abs().max().item() * 2.0 ** -7
        torch.testing.assert_close(got, want, rtol=2e-2, atol=max(2e-2, one_ulp_of_largest))


def assert_same_sample(got, want, sparse=True):
    """Fused and unfused blocks round differently in the last fp32 bit. With no layer sparsified
    that is all (tight); with sparse layers a 2:4 choice between two near-equal values can go
    either way, so a few latent elements may differ visibly (Qwen-Image here: 2% of them, 1e-3 of
    the norm), the sample as a whole not (a block computing something else moves it by tens of
    percent)."""
    error = ((got - want).norm() / want.norm()).item()
    assert error < (5e-3 if sparse else 1e-5), f"fused vs unfused sample: relative error {error:.2e}"


# The sampling tests' selection that sparsifies no layer: the blocks alone.
NO_LAYER = "^no_such_layer$"


def block_inputs(model, txt_tokens=7, img_tokens=12, batch=2, dtype=torch.float32):
    generator = torch.Generator().manual_seed(3)
    hidden = model.params.hidden_size
    ids = torch.randint(0, 64, (batch, txt_tokens + img_tokens, 3), generator=generator).float()
    pe = model.pe_embedder(ids)
    img, txt = (torch.randn(batch, n, hidden, generator=generator).to(dtype) for n in (img_tokens, txt_tokens))
    return img, txt, torch.randn(batch, hidden, generator=generator).to(dtype), pe


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flipped", [False, True])
def test_fused_double_block_computes_comfyuis_double_block(flux, dtype, flipped):
    model = flux.model.diffusion_model
    block = own_copy(model.double_blocks[0], dtype)
    assert fused_block_kind(block) == ("double", "")
    img, txt, vec, pe = block_inputs(model, dtype=dtype)
    if flipped and not hasattr(block, "flipped_img_txt"):
        pytest.skip("this ComfyUI's DoubleStreamBlock always puts the text first (no flipped_img_txt)")
    if hasattr(block, "flipped_img_txt"):
        block.flipped_img_txt = flipped
    # ComfyUI's forward adds into txt in place: it gets copies.
    want_img, want_txt = block(img=img.clone(), txt=txt.clone(), vec=vec, pe=pe)
    got_img, got_txt = flux_double_block(block, img, txt, vec, pe, None, {}, attention)
    assert_same_up_to_rounding(got_img, want_img)
    assert_same_up_to_rounding(got_txt, want_txt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_single_block_computes_comfyuis_single_block(flux, dtype):
    model = flux.model.diffusion_model
    block = own_copy(model.single_blocks[0], dtype)
    assert fused_block_kind(block) == ("single", "")
    img, txt, vec, pe = block_inputs(model, dtype=dtype)
    x = torch.cat((txt, img), 1)
    want = block(x.clone(), vec=vec, pe=pe)
    got = flux_single_block(block, x, vec, pe, None, {}, attention)
    assert_same_up_to_rounding(got, want)


def test_sampling_reaches_the_fused_blocks_on_the_patched_clone_only(flux, capsys):
    fused = sparsify(flux)
    assert "2 blocks with fused q/k norm + RoPE" in capsys.readouterr().out
    replaced = fused.model_options["transformer_options"]["patches_replace"]["dit"]
    assert set(replaced) == {("double_block", 0), ("single_block", 0)}
    assert "patches_replace" not in flux.model_options["transformer_options"]
    unfused = sparsify(flux, fused_blocks=False)
    assert "patches_replace" not in unfused.model_options["transformer_options"]
    calls = []
    for key, patch in replaced.items():
        def counting(args, extra, patch=patch, key=key):
            calls.append(key)
            return patch(args, extra)
        replaced[key] = counting
    out = sample(fused)
    assert set(calls) == {("double_block", 0), ("single_block", 0)}
    assert_same_sample(out, sample(unfused))
    blocks_only = sparsify(flux, include_layers=NO_LAYER)
    assert len(blocks_only.model_options["transformer_options"]["patches_replace"]["dit"]) == 2
    assert_same_sample(sample(blocks_only), sample(sparsify(flux, include_layers=NO_LAYER, fused_blocks=False)),
                       sparse=False)


def test_a_block_another_node_replaces_is_left_to_it(flux, capsys):
    other = flux.clone()

    def other_nodes_block(args, extra):
        return extra["original_block"](args)

    other.set_model_patch_replace(other_nodes_block, "dit", "double_block", 0)
    fused = sparsify(other)
    assert "1 blocks with fused q/k norm + RoPE" in capsys.readouterr().out
    replaced = fused.model_options["transformer_options"]["patches_replace"]["dit"]
    assert replaced[("double_block", 0)] is other_nodes_block and ("single_block", 0) in replaced


def test_calls_the_fused_forward_cannot_compute_go_to_the_blocks_own_forward(flux):
    from rt_lynx_pack.lynx import LynxRuntime
    from rt_lynx_pack.nodes.comfy_glue import _fused_block_patch, _sampling_step_wrapper
    model = flux.model.diffusion_model
    runtime = LynxRuntime()
    patch = _fused_block_patch("double", model.double_blocks[0], runtime, "double_blocks", 0)
    img, txt, vec, pe = block_inputs(model)
    calls = []

    def own_forward(args):
        calls.append("own")
        return {"img": args["img"], "txt": args["txt"]}

    def call(**changes):
        calls.clear()
        patch({"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": None, "transformer_options": {}, **changes},
              {"original_block": own_forward})
        return calls == ["own"]

    assert not call()   # fused
    # Later ComfyUI releases: attention patches run inside the block, a vec per token group (reference
    # tokens at timestep zero) or for the whole model (global modulation), a RoPE table for cached tokens.
    assert call(transformer_options={"patches": {"attn1_patch": [lambda q, k, v, **kwargs: {}]}})
    assert call(transformer_options={"patches": {"attn1_output_patch": [lambda attn, extra: attn]}})
    assert call(vec=torch.cat((vec, vec)))
    assert call(vec=(vec, vec))
    assert call(pe=torch.cat((pe, pe[:, :, :3]), 2))
    # A model call with a text attention mask (which later releases' Qwen-Image applies inside its
    # blocks, outside the replace arguments): the sampler-side wrapper tells the blocks, in eager code.
    seen = []
    wrapper = _sampling_step_wrapper(runtime)
    wrapper(lambda *args, **kwargs: seen.append(call()), None, None, attention_mask=torch.ones(1, 7))
    wrapper(lambda *args, **kwargs: seen.append(call()), None, None)
    assert seen == [True, False] and not runtime.blocks_as_they_are


@pytest.fixture(scope="module")
def qwen():
    patcher = load_model("qwen_image")
    yield patcher
    comfy.model_management.unload_all_models()


def qwen_attention(q, k, v, heads, mask, transformer_options):
    return qwen_image_model.optimized_attention_masked(q, k, v, heads, mask, transformer_options=transformer_options)


class _BlockReached(Exception):
    pass


def qwen_block_rope_table(model, batch, txt_tokens, img_tokens):
    """The RoPE table this ComfyUI's Qwen-Image model hands its first block for a prompt of
    `txt_tokens` and a latent of `img_tokens` patches (its layout differs between releases)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["pe"] = kwargs["image_rotary_emb"]
        raise _BlockReached

    handle = model.transformer_blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(batch, 16, 1, 2, 2 * img_tokens, generator=generator)   # 1 x img_tokens patches
    context = torch.randn(batch, txt_tokens, 3584, generator=generator)
    try:
        model(x, torch.full((batch,), 0.5), context)
    except _BlockReached:
        pass
    finally:
        handle.remove()
    return seen["pe"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qwen_image_block_computes_comfyuis_block(qwen, dtype):
    model = qwen.model.diffusion_model
    block = own_copy(model.transformer_blocks[0], dtype)
    assert fused_block_kind(block) == ("qwen_image", "")
    generator = torch.Generator().manual_seed(4)
    batch, txt_tokens, img_tokens, hidden = 2, 6, 10, model.inner_dim
    pe = qwen_block_rope_table(model, batch, txt_tokens, img_tokens).to(dtype)
    img, txt, temb = (torch.randn(batch, *shape, generator=generator).to(dtype)
                      for shape in ((img_tokens, hidden), (txt_tokens, hidden), (hidden,)))
    want_txt, want_img = block(hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=None,
                               temb=temb, image_rotary_emb=pe)
    got_txt, got_img = qwen_image_block(block, img, txt, temb, pe, {}, qwen_attention)
    assert_same_up_to_rounding(got_img, want_img)
    assert_same_up_to_rounding(got_txt, want_txt)


def test_qwen_image_samples_through_its_fused_blocks_with_cfg(qwen, capsys):
    fused = sparsify(qwen)
    assert "1 blocks with fused q/k norm + RoPE" in capsys.readouterr().out
    replaced = fused.model_options["transformer_options"]["patches_replace"]["dit"]
    calls = []
    patch = replaced[("double_block", 0)]

    def counting(args, extra):
        calls.append(args["img"].shape[0])
        return patch(args, extra)

    replaced[("double_block", 0)] = counting
    out = sample(fused, arch="qwen_image", cfg=2.0)
    assert calls and all(batch == 2 for batch in calls)   # cond and uncond in one batch
    assert_same_sample(out, sample(sparsify(qwen, fused_blocks=False), arch="qwen_image", cfg=2.0))
    blocks_only = sparsify(qwen, include_layers=NO_LAYER)
    assert len(blocks_only.model_options["transformer_options"]["patches_replace"]["dit"]) == 1
    assert_same_sample(sample(blocks_only, arch="qwen_image", cfg=2.0),
                       sample(sparsify(qwen, include_layers=NO_LAYER, fused_blocks=False), arch="qwen_image", cfg=2.0),
                       sparse=False)


def test_models_that_reuse_flux_blocks_keep_them(flux):
    # HunyuanVideo is made of FLUX's block classes but calls them with attention masks and
    # per-frame modulation: only FLUX's and Qwen-Image's own forwards get fused blocks.
    from rt_lynx_pack.nodes.comfy_glue import install_fused_blocks

    class HunyuanVideo(torch.nn.Module):
        pass

    other = HunyuanVideo()
    other.double_blocks = flux.model.diffusion_model.double_blocks
    other.single_blocks = flux.model.diffusion_model.single_blocks
    patched = flux.clone()
    assert install_fused_blocks(patched, other) == ""
    assert "patches_replace" not in patched.model_options["transformer_options"]


def test_a_call_with_arguments_the_fused_forward_does_not_know_runs_the_block(flux):
    fused = sparsify(flux)
    patch = fused.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]
    original_calls = []

    def original_block(args):
        original_calls.append(args)
        return {"img": args["img"], "txt": args["txt"]}

    img, txt, vec, pe = block_inputs(flux.model.diffusion_model)
    args = {"img": img, "txt": txt, "vec": vec, "pe": pe, "attention_mask": None, "transformer_options": {}}
    assert patch(args, {"original_block": original_block})["img"] is img and len(original_calls) == 1


def lynx_plan(model):
    # Every token count runs sparse (the test blocks have a few tokens), on the reference path.
    return plan_model(model, LynxConfig(backend="reference", min_tokens=1))


def counting_prologue_products(monkeypatch):
    """The weight shapes of the Lynx products that took a LayerNorm + modulation, and of those that
    took a GELU, into their sparsify pass."""
    modulated, after_gelu = [], []

    def counting_modulated(x, shift, scale1p, eps, weight, *args, **kwargs):
        modulated.append(tuple(weight.shape))
        return lynx_linear_modulated(x, shift, scale1p, eps, weight, *args, **kwargs)

    def counting_after_gelu(x, weight, *args, **kwargs):
        after_gelu.append(tuple(weight.shape))
        return lynx_linear_after_gelu(x, weight, *args, **kwargs)
    monkeypatch.setattr(patching, "lynx_linear_modulated", counting_modulated)
    monkeypatch.setattr(patching, "lynx_linear_after_gelu", counting_after_gelu)
    return modulated, after_gelu


def test_fused_flux_blocks_hand_their_lynx_layers_the_work_that_makes_their_input(flux, monkeypatch):
    model = flux.model.diffusion_model
    double, single = model.double_blocks[0], model.single_blocks[0]
    img, txt, vec, pe = block_inputs(model)
    x = torch.cat((txt, img), 1)
    calls, after_gelu = counting_prologue_products(monkeypatch)
    with installed(model, lynx_plan(model)):
        want_img, want_txt = double(img=img.clone(), txt=txt.clone(), vec=vec, pe=pe)
        want_x = single(x.clone(), vec=vec, pe=pe)
        assert not calls and not after_gelu
        got_img, got_txt = flux_double_block(double, img, txt, vec, pe, None, {}, attention)
        got_x = flux_single_block(single, x, vec, pe, None, {}, attention)
    hidden = model.params.hidden_size
    # Both streams' qkv and MLP up projections, and the single block's linear1.
    assert sorted(calls) == sorted([(3 * hidden, hidden)] * 2 + [(double.img_mlp[0].out_features, hidden)] * 2
                                   + [(single.linear1.out_features, hidden)])
    # Both streams' MLP down projections (the single block's linear2 stays dense by default).
    assert after_gelu == [(hidden, double.img_mlp[2].in_features)] * 2
    for got, want in ((got_img, want_img), (got_txt, want_txt), (got_x, want_x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_single_block_hands_an_fp8_dense_linear2_its_input_in_two_parts(flux, monkeypatch):
    # fp8 keeps linear2 dense in e4m3: its quantise pass takes the attention output and the MLP's
    # hidden state, and makes the GELU and the concatenation itself.
    model = flux.model.diffusion_model
    single = model.single_blocks[0]
    img, txt, vec, pe = block_inputs(model)
    x = torch.cat((txt, img), 1)
    linear2_calls = []

    def counting_fp8_dense_linear(x, weight, *args, gelu_tail=None, **kwargs):
        if weight.shape == single.linear2.weight.shape:
            linear2_calls.append(gelu_tail is not None)
        return fp8_dense_linear(x, weight, *args, gelu_tail=gelu_tail, **kwargs)
    monkeypatch.setattr(patching, "fp8_dense_linear", counting_fp8_dense_linear)
    plan = plan_model(model, LynxConfig(backend="reference", min_tokens=1, precision="fp8"))
    assert "single_blocks.0.linear2" in plan.installed_forwards
    with installed(model, plan):
        want = single(x.clone(), vec=vec, pe=pe)
        assert linear2_calls == [False]
        got = flux_single_block(single, x, vec, pe, None, {}, attention)
    assert linear2_calls == [False, True]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_qwen_image_block_hands_its_lynx_layers_the_work_that_makes_their_input(qwen, monkeypatch):
    model = qwen.model.diffusion_model
    block = model.transformer_blocks[0]
    generator = torch.Generator().manual_seed(5)
    batch, txt_tokens, img_tokens, hidden = 2, 6, 10, model.inner_dim
    pe = qwen_block_rope_table(model, batch, txt_tokens, img_tokens)
    img, txt, temb = (torch.randn(batch, *shape, generator=generator)
                      for shape in ((img_tokens, hidden), (txt_tokens, hidden), (hidden,)))
    calls, after_gelu = counting_prologue_products(monkeypatch)
    with installed(model, lynx_plan(model)):
        want_txt, want_img = block(hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=None,
                                   temb=temb, image_rotary_emb=pe)
        assert not calls and not after_gelu
        got_txt, got_img = qwen_image_block(block, img, txt, temb, pe, {}, qwen_attention)
    # q, k, v of both streams and both MLP up projections; both MLP down projections.
    assert len(calls) == 8 and len(after_gelu) == 2
    torch.testing.assert_close(got_img, want_img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_txt, want_txt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["flux", "qwen_image"])
def test_fp8_blocks_take_their_modulation_from_one_product_per_model_call(arch, request, monkeypatch, capsys):
    model = request.getfixturevalue("flux" if arch == "flux" else "qwen")
    lynx = sparsify(model, precision="fp8")
    assert "one modulation product per call" in capsys.readouterr().out
    sparsify(model, precision="bf16")
    assert "one product" not in capsys.readouterr().out
    batch = installed_plan(lynx).modulation_batch
    blocks = {"flux": ["double_blocks.0.img_mod.lin", "double_blocks.0.txt_mod.lin", "single_blocks.0.modulation.lin"],
              "qwen_image": ["transformer_blocks.0.img_mod.1", "transformer_blocks.0.txt_mod.1"]}
    assert [f.name for f in batch.forwards] == blocks[arch]
    ready = watch_each_step(lynx, lambda: batch.ready)
    products = []
    product = BatchedModulation.product
    monkeypatch.setattr(BatchedModulation, "product", lambda self, vec: products.append(vec) or product(self, vec))
    options = dict(arch=arch, cfg=2.0 if arch == "qwen_image" else 1.0)   # Qwen-Image: cond and uncond in one call
    batched = sample(lynx, **options)
    calls = len(ready)
    assert calls and all(ready) and len(products) == calls   # one product per model call
    assert not batch.ready and batch.weight is None   # dropped with the run's other e4m3 weights
    # Each block computing its own modulation from the same e4m3 weights gives the same sample.
    monkeypatch.setattr(fused_blocks, "modulation_output", lambda *args: None)
    per_block = sample(lynx, **options)
    assert len(products) == calls and len(ready) == 2 * calls
    assert_same_sample(batched, per_block)
