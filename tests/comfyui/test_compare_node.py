"""RT-Lynx Compare inside ComfyUI: tiny FLUX (real width, 1+1 blocks) and ComfyUI's own VAE class.

ComfyUI's VAE detection fixes the FLUX VAE's width (ch 128, ch_mult 1-2-4-4) from the key layout,
so no smaller VAE is detected as one: the test builds that VAE with random weights (16 latent
channels, the FLUX layout) and loads it through comfy.sd.VAE as VAELoader does.
"""
import math

import pytest
import torch

from comfyui_env import import_comfyui

import_comfyui()

import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402

from comfyui_models import conditioning, randomize_  # noqa: E402
from rt_lynx_pack.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, RTLynxSparsifyModel  # noqa: E402
from rt_lynx_pack.nodes.compare import RTLynxCompare  # noqa: E402

LATENT = 16   # latent pixels per side (128 x 128 images): 64 image tokens, above min_tokens


@pytest.fixture(scope="module")
def vae():
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    engine = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    model = comfy.sd.VAE(sd=randomize_(engine).state_dict())
    assert model.latent_channels == 16
    return model


def compare(dense, lynx, vae, seed=3):
    return RTLynxCompare().compare(dense, lynx, conditioning("flux", 8), conditioning("flux", 8, seed=1),
                                   {"samples": torch.zeros(1, 16, LATENT, LATENT)}, seed=seed, steps=2, cfg=1.0,
                                   sampler_name="euler", scheduler="simple", vae=vae)


def test_registered_with_display_name_and_ksampler_options():
    assert NODE_CLASS_MAPPINGS["RTLynxCompare"] is RTLynxCompare
    assert NODE_DISPLAY_NAME_MAPPINGS["RTLynxCompare"] == "RT-Lynx Compare"
    required = RTLynxCompare.INPUT_TYPES()["required"]
    assert required["sampler_name"][0] == comfy.samplers.KSampler.SAMPLERS
    assert required["scheduler"][0] == comfy.samplers.KSampler.SCHEDULERS
    assert [t[0] for t in required.values()][:5] == ["MODEL", "MODEL", "CONDITIONING", "CONDITIONING", "LATENT"]


def test_identical_models_match_exactly(flux, vae):
    image, report = compare(flux, flux, vae)
    size = LATENT * 8
    assert image.shape == (1, size, 2 * size, 3)
    assert torch.equal(image[:, :, :size], image[:, :, size:])
    assert report == "PSNR inf dB, SSIM 1.0000 (dense vs Lynx, seed 3)"


def test_lynx_model_gives_a_finite_psnr(flux, vae):
    lynx = RTLynxSparsifyModel().patch(flux, pattern="2:4", compensation=True, skip_first_blocks=0,
                                       skip_last_blocks=0, dense_warmup_steps=0, default_dense_layers=True,
                                       include_layers="", exclude_layers="", backend="reference")[0]
    image, report = compare(flux, lynx, vae)
    size = LATENT * 8
    assert image.shape == (1, size, 2 * size, 3) and torch.isfinite(image).all()
    dense_half, lynx_half = image[:, :, :size], image[:, :, size:]
    assert not torch.equal(dense_half, lynx_half)
    # The dense half is what the dense model alone gives: sampling the Lynx clone left it untouched.
    again, _ = compare(flux, flux, vae)
    assert torch.equal(again[:, :, :size], dense_half)
    value = float(report.split()[1])
    assert math.isfinite(value) and value > 0, report
    assert report.endswith("(dense vs Lynx, seed 3)")
    ssim_value = float(report.split("SSIM ")[1].split()[0])
    assert 0 < ssim_value < 1, report
