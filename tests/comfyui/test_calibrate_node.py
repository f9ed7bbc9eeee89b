"""RT-Lynx Calibrate LoRA inside ComfyUI on a real-width FLUX (1 double + 1 single block, CPU)."""
import os
import zlib

import pytest
import torch

from comfyui_env import import_comfyui

import_comfyui()

import folder_paths  # noqa: E402

from comfyui_models import flux_conditioning, sample  # noqa: E402
from rt_lynx_pack.lynx import load_lynx_lora  # noqa: E402
from rt_lynx_pack.lynx.calibration import _StatisticsCapture  # noqa: E402
from rt_lynx_pack.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, RTLynxLoadLoRA, RTLynxSparsifyModel  # noqa: E402
from rt_lynx_pack.nodes.calibrate import RTLynxCalibrateLoRA  # noqa: E402
from rt_lynx_pack.nodes.comfy_glue import installed_plan, lynx_lora_folder  # noqa: E402

STEPS = 3


@pytest.fixture
def loras_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(tmp_path / "loras")], folder_paths.supported_pt_extensions))
    return tmp_path / "loras"


def sparsified(flux):
    # Attention layers of the double block only: each fit of a K = 3072 layer is seconds of fp64 on a
    # CPU (mlp.2 has K = 12288, linear1 N = 21504); the image and text streams are both represented.
    return RTLynxSparsifyModel().patch(flux, pattern="2:4", compensation=True, skip_first_blocks=0, skip_last_blocks=0,
                                       dense_warmup_steps=0, default_dense_layers=True, include_layers=r"_attn\.",
                                       exclude_layers="", backend="reference")[0]


def test_registered_with_display_name():
    assert NODE_CLASS_MAPPINGS["RTLynxCalibrateLoRA"] is RTLynxCalibrateLoRA
    assert NODE_DISPLAY_NAME_MAPPINGS["RTLynxCalibrateLoRA"] == "RT-Lynx Calibrate LoRA"


def test_refuses_a_model_not_sparsified(flux, loras_folder):
    with pytest.raises(ValueError, match="needs a model from RT-Lynx Sparsify Model"):
        RTLynxCalibrateLoRA().calibrate(flux, flux_conditioning(), {"samples": torch.zeros(1, 16, 16, 16)}, 8, 1, 2,
                                        0, 1.0, 16.0, "x")


@pytest.mark.parametrize("folded_rank", [0, 8])
def test_calibrated_file_loads_and_reduces_the_sparse_error(flux, loras_folder, caplog, monkeypatch, folded_rank):
    lynx = sparsified(flux)
    plan = installed_plan(lynx)
    assert sorted(plan.forwards) == ["double_blocks.0.img_attn.proj", "double_blocks.0.img_attn.qkv",
                                     "double_blocks.0.txt_attn.proj", "double_blocks.0.txt_attn.qkv"]
    # Sampled before calibrating: ComfyUI has the Lynx object patches applied to the loaded model.
    dense, sparse = (sample(m, steps=STEPS, seed=0) for m in (flux, lynx))
    latent = {"samples": torch.zeros(1, 16, 16, 16)}
    # Each fit's view of its layer: the runtime branch must be fitted with the folded part in the weight.
    fits, fit = [], _StatisticsCapture.fit

    def recording_fit(capture, rank, ridge):
        folded = None if capture.folded is None else capture.folded.weight_delta()
        fits.append((capture.name, capture.for_folded_part, capture.layer_weight(), folded))
        return fit(capture, rank, ridge)
    monkeypatch.setattr(_StatisticsCapture, "fit", recording_fit)
    original = {n: flux.model.diffusion_model.get_submodule(n).weight.detach().clone() for n in plan.forwards}
    with caplog.at_level("WARNING", logger="rt_lynx"):
        model, name = RTLynxCalibrateLoRA().calibrate(lynx, flux_conditioning(), latent, rank=16, samples=2,
                                                      timesteps=STEPS, seed=0, cfg=1.0, stats_memory_gb=0.2,
                                                      filename="flux test", folded_rank=folded_rank)
    assert name == "lynx/flux_test.safetensors"
    path = os.path.join(lynx_lora_folder(), "flux_test.safetensors")
    assert os.path.isfile(path) and path.startswith(str(loras_folder))
    lora = load_lynx_lora(path)
    # 8 prompt tokens < min_tokens: the text stream ran dense, so only the image stream is fitted.
    image_stream = ["double_blocks.0.img_attn.proj", "double_blocks.0.img_attn.qkv"]
    assert sorted(lora.layers) == image_stream and sorted(lora.folded_layers) == image_stream[:2 * (folded_rank > 0)]
    assert (lora.rank, lora.folded_rank) == (16, folded_rank)
    assert "2 of 4 sparsified layers never ran sparse" in caplog.text
    for layer, fwd in installed_plan(model).forwards.items():
        assert (fwd.lora is None, fwd.folded is None) == (".txt_" in layer, ".txt_" in layer or not folded_rank)
    assert all(torch.isfinite(t).all() for part in (lora.layers, lora.folded_layers) for pair in part.values()
               for t in pair)
    # The folded part's fits first, then the runtime branch's.
    assert [for_folded for _, for_folded, _, _ in fits] == [True] * 2 * (folded_rank > 0) + [False] * 2
    assert sorted(n for n, _, _, _ in fits) == sorted(image_stream * (1 + (folded_rank > 0)))
    for layer, for_folded, weight, folded in fits:
        want = original[layer] if for_folded or folded is None else original[layer] + folded
        torch.testing.assert_close(weight, want, rtol=1e-5, atol=1e-6)
        assert (folded is not None) == (not for_folded and folded_rank > 0)

    loaded = RTLynxLoadLoRA().load(lynx, name, 1.0)[0]
    calibrated = sample(loaded, steps=STEPS, seed=0)
    sparse_error = (sparse - dense).square().mean().item()
    calibrated_error = (calibrated - dense).square().mean().item()
    assert calibrated_error < sparse_error, (sparse_error, calibrated_error)
    # The node's own output model computes exactly like the file it wrote.
    assert torch.equal(sample(model, steps=STEPS, seed=0), calibrated)
    # Sampling the sparse model again after all that gives what it gave before: nothing leaked.
    assert torch.equal(sample(lynx, steps=STEPS, seed=0), sparse)


class PromptEncoder:
    """Stands in for a model's CLIP: a prompt's conditioning is random, seeded by its text."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, text):
        ctx, extra = flux_conditioning(seed=zlib.crc32(text.encode()))[0]
        return [[ctx, {"pooled_output": extra["pooled_output"]}]]


def test_more_prompts_are_sampled_in_turn_with_the_positive_options(flux, loras_folder, monkeypatch):
    import nodes

    runs, ksampler = [], nodes.common_ksampler

    def recording_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, *args, **kwargs):
        runs.append((seed, positive))
        return ksampler(model, seed, steps, cfg, sampler, scheduler, positive, *args, **kwargs)
    monkeypatch.setattr(nodes, "common_ksampler", recording_ksampler)
    positive = flux_conditioning()
    positive[0][1] |= {"guidance": 2.5, "start_percent": 0.5, "end_percent": 1.0}   # the last two its own
    RTLynxCalibrateLoRA().calibrate(sparsified(flux), positive, {"samples": torch.zeros(1, 16, 16, 16)}, rank=4,
                                    samples=4, timesteps=1, seed=7, cfg=1.0, stats_memory_gb=16.0, filename="prompts",
                                    clip=PromptEncoder(), more_prompts="a red cat\n\n  a blue dog  \n")
    assert [seed for seed, _ in runs] == [7, 8, 9, 10]
    assert runs[0][1] is positive and runs[3][1] is positive
    for (_, run_positive), prompt in zip(runs[1:3], ["a red cat", "a blue dog"]):
        encoded = PromptEncoder().encode_from_tokens_scheduled(prompt)[0]
        assert torch.equal(run_positive[0][0], encoded[0])
        assert torch.equal(run_positive[0][1]["pooled_output"], encoded[1]["pooled_output"])
        assert run_positive[0][1]["guidance"] == 2.5   # carried over from the positive conditioning
        assert "start_percent" not in run_positive[0][1] and "end_percent" not in run_positive[0][1]


@pytest.mark.parametrize("clip, samples, combined, message", [
    (None, 4, False, "needs the clip input"), (PromptEncoder(), 2, False, "3 calibration prompts but samples is 2"),
    (PromptEncoder(), 4, True, "one prompt \\(this one combines 2\\)")])
def test_more_prompts_refused_without_their_encoder_enough_samples_or_one_positive(flux, loras_folder, clip, samples,
                                                                                   combined, message):
    positive = flux_conditioning() + (flux_conditioning(seed=5) if combined else [])
    with pytest.raises(ValueError, match=message):
        RTLynxCalibrateLoRA().calibrate(sparsified(flux), positive, {"samples": torch.zeros(1, 16, 16, 16)},
                                        rank=4, samples=samples, timesteps=1, seed=0, cfg=1.0, stats_memory_gb=16.0,
                                        filename="x", clip=clip, more_prompts="one\ntwo")
